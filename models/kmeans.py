"""Lloyd's k-means in torch on the features' device: k-means++ (or random) seeding from a CPU generator, a
fixed number of iterations, no host synchronisation. The same seed gives the same centres: sums are
one-hot matmuls, not atomics, so this also holds on a GPU. `metric="cosine"` is spherical k-means
(unit-norm features and centres).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one [rows, k] distance block (256 MiB in fp32): memory stays bounded for large memories.
DISTANCE_BUDGET = 2**26


def _prepare(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    x = x.float()
    return F.normalize(x, dim=1) if metric == "cosine" else x


def _squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """||x - c||² for every row and centre, [N, K], clamped at 0 (the expanded form can go slightly negative)."""
    d = x.pow(2).sum(1, keepdim=True) - 2 * x @ centres.T + centres.pow(2).sum(1)
    return d.clamp_(min=0)


def _assign(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of each row and its squared distance, in blocks of rows."""
    chunk = max(1, DISTANCE_BUDGET // max(1, centres.shape[0]))
    labels, dists = [], []
    for block in x.split(chunk):
        d, i = _squared_distances(block, centres).min(1)
        labels.append(i)
        dists.append(d)
    return torch.cat(labels), torch.cat(dists)


def _cluster_sums(x: torch.Tensor, assignments: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums [K, D] and counts [K] as one-hot matmuls: a fixed order of additions on every device
    (index_add_ uses atomics on a GPU, whose order varies from run to run)."""
    chunk = max(1, DISTANCE_BUDGET // max(1, k))
    sums = x.new_zeros(k, x.shape[1])
    counts = x.new_zeros(k)
    for block, labels in zip(x.split(chunk), assignments.split(chunk)):
        onehot = F.one_hot(labels, k).to(x.dtype)
        sums += onehot.T @ block
        counts += onehot.sum(0)
    return sums, counts


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: the first centre uniformly, each next one with probability ∝ squared distance to
    the nearest centre chosen so far. Random numbers come from the CPU generator (same draws on any
    device); the choice itself is a searchsorted on the device, so nothing waits for the host."""
    n = x.shape[0]
    draws = torch.rand(k, generator=generator, dtype=torch.float64).to(x.device)
    first = (draws[:1] * n).long().clamp(max=n - 1)
    centres = x.new_empty(k, x.shape[1])
    centres[:1] = x.index_select(0, first)
    nearest = _squared_distances(x, centres[:1]).squeeze(1).double()
    for j in range(1, k):
        cumulative = nearest.cumsum(0)
        # A uniform draw on [0, total); rows at distance 0 (chosen centres, duplicates) cannot be drawn.
        pick = torch.searchsorted(cumulative, (draws[j] * cumulative[-1]).unsqueeze(0), right=True).clamp(max=n - 1)
        centres[j : j + 1] = x.index_select(0, pick)
        nearest = torch.minimum(nearest, _squared_distances(x, centres[j : j + 1]).squeeze(1).double())
    return centres


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    init: str = "k-means++",
    metric: str = "euclidean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of `x` [N, D] into `k` groups: (centres float32 [k, D], assignments int64 [N]).

    Runs on `x`'s device for exactly `iters` Lloyd iterations (no convergence test, so no host sync);
    the returned assignments are those of the returned centres. `init`: "k-means++" or "random" (k
    distinct rows). `metric="cosine"`: rows are L2-normalised and centres re-normalised after each update
    (spherical k-means); centres are then unit vectors. A cluster that loses all its rows keeps its
    previous centre. Deterministic for a given seed (the CPU generator drives every random choice).
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans needs [N, D] features, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    x = _prepare(x, metric)
    generator = torch.Generator().manual_seed(seed)
    if init == "k-means++":
        centres = _kmeans_pp(x, k, generator)
    elif init == "random":
        centres = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    else:
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    for _ in range(iters):
        assignments, _ = _assign(x, centres)
        sums, counts = _cluster_sums(x, assignments, k)
        updated = sums / counts.clamp(min=1).unsqueeze(1)
        if metric == "cosine":
            updated = F.normalize(updated, dim=1)
        centres = torch.where((counts > 0).unsqueeze(1), updated, centres)
    assignments, _ = _assign(x, centres)
    return centres, assignments


def cluster_means(x: torch.Tensor, assignments: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the rows of `x` in each cluster, float32 [k, D] (zeros for an empty cluster). With
    `kmeans(..., metric="cosine")` this gives prototypes at the features' own scale."""
    sums, counts = _cluster_sums(x.float(), assignments, k)
    return sums / counts.clamp(min=1).unsqueeze(1)
