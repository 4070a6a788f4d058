"""Prototypes of a feature memory and attention over them (FeatMatch's feature augmentation, AugF).

- `kmeans(x, k)`: Lloyd's k-means in torch on the features' device, k-means++ (or random) seeding from a
  CPU generator, a fixed number of iterations, no host synchronisation; the same seed gives the same
  centres (sums are one-hot matmuls, not atomics, so this also holds on a GPU). `metric="cosine"` is
  spherical k-means (unit-norm features and centres).
- `FeatureMemory`: one row per sample of a data set (by global sample index): a feature, a label (true or
  pseudo; -1 = none) and a confidence. `class_prototypes()` runs k-means per class over the rows that
  carry that label (FeatMatch: labeled images and confidently pseudo-labeled ones), `prototypes()` over
  all rows (no labels: prototypes for feature augmentation in contrastive pretraining).
- `PrototypeAttention`: refines features [..., D] by multi-head attention over prototypes [P, D];
  output shape = input shape, in residual form gₓ = relu(fₓ + φᵣ(fₐ)).

Nothing here knows of training: the caller decides what goes into the memory and when prototypes are
recomputed (FeatMatch: every epoch).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
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


class FeatureMemory:
    """Features of a data set by global sample index, with a label (-1: none) and a confidence per row.

    Rows start empty (label -1, never written). `update` overwrites rows (features detached, stored in
    `dtype`); rows not written keep their previous contents, so a memory filled during an epoch holds
    each sample's most recent feature. Lives on `device`; no host synchronisation in `update`.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.features = torch.zeros(size, dim, device=device, dtype=dtype)
        self.labels = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.confidence = torch.zeros(size, device=device)
        self.written = torch.zeros(size, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def update(
        self,
        indices: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        confidence: torch.Tensor | None = None,
    ) -> None:
        """Write rows `indices` [B]; `labels` [B] (-1: none) and `confidence` [B] are kept when given."""
        device = self.features.device
        indices = indices.to(device)
        self.features[indices] = features.detach().to(device, self.features.dtype)
        self.written[indices] = True
        if labels is not None:
            self.labels[indices] = labels.to(device)
        if confidence is not None:
            self.confidence[indices] = confidence.detach().to(device, self.confidence.dtype)

    def class_prototypes(
        self,
        num_classes: int,
        per_class: int,
        *,
        iters: int = 20,
        seed: int = 0,
        metric: str = "cosine",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k-means per class over the rows labeled with that class: (prototypes [P, D], their class [P]).

        A class gets min(`per_class`, its rows) prototypes (a class with fewer rows: the rows themselves;
        with none: no prototype). Prototypes are the mean features of each cluster (see `cluster_means`),
        so they live where the memory's features live. Class c's k-means is seeded with `seed + c`.
        One host sync per class (its row count).
        """
        keep = self.written & (self.labels >= 0)
        features, labels = self.features[keep], self.labels[keep]
        counts = torch.bincount(labels, minlength=num_classes).tolist()
        protos, owners = [], []
        for c, count in enumerate(counts[:num_classes]):
            if count == 0:
                continue
            rows = features[labels == c]
            if count <= per_class:
                centres = rows.float()
            else:
                _, assignments = kmeans(rows, per_class, iters=iters, seed=seed + c, metric=metric)
                centres = cluster_means(rows, assignments, per_class)
            protos.append(centres)
            owners.append(torch.full((centres.shape[0],), c, dtype=torch.int64, device=centres.device))
        if not protos:
            raise ValueError("the memory holds no labeled rows: no class prototypes")
        return torch.cat(protos), torch.cat(owners)

    def prototypes(self, k: int, *, iters: int = 20, seed: int = 0, metric: str = "cosine") -> torch.Tensor:
        """k-means over every written row, ignoring labels: [k, D] cluster means (unlabeled prototypes)."""
        rows = self.features[self.written]
        _, assignments = kmeans(rows, k, iters=iters, seed=seed, metric=metric)
        return cluster_means(rows, assignments, k)


class PrototypeAttention(nn.Module):
    """FeatMatch's AugF: refine features fₓ [..., dim] by attention over prototypes fₚ [P, dim].

    Per head h (the embedding φₑ is shared by features and prototypes):
        eₓ = φₑ(fₓ)ₕ, eₚ = φₑ(fₚ)ₕ                         (head_dim each)
        w = softmax(scale · eₓ·eₚᵀ) over the P prototypes   (scale = 1/√head_dim by default)
        fₐₕ = relu(φₐₕ([eₓ, Σₚ w·eₚ]))                       (2·head_dim -> head_dim, own weights per head)
    and for all heads together
        gₓ = relu(fₓ + φᵣ([fₐ₁, ..., fₐ_H]))                 (heads·head_dim -> dim)
    The output has the input's shape. `final_relu=False` drops the outer relu (gₓ = fₓ + φᵣ(fₐ)), for
    features that may be negative (projector outputs in contrastive pretraining). `zero_init=True` starts
    φᵣ at zero, so that the module starts as relu(fₓ) (or the identity without the final relu): a
    pretrained backbone's features reach the classifier unchanged until AugF has learned something.
    `forward(..., return_weights=True)` also returns the attention weights [..., heads, P].
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int | None = None,
        *,
        scale: float | None = None,
        dropout: float = 0.0,
        final_relu: bool = True,
        zero_init: bool = False,
    ):
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        head_dim = head_dim or max(1, dim // heads)
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.final_relu = final_relu
        self.embed = nn.Linear(dim, heads * head_dim)  # φₑ
        # φₐ: one Linear(2·head_dim -> head_dim) per head, held as one batched weight.
        self.aggregate_weight = nn.Parameter(torch.empty(heads, 2 * head_dim, head_dim))
        self.aggregate_bias = nn.Parameter(torch.empty(heads, head_dim))
        self.residual = nn.Linear(heads * head_dim, dim)  # φᵣ
        self.dropout = nn.Dropout(dropout)
        self.reset_aggregate()
        if zero_init:
            nn.init.zeros_(self.residual.weight)
            nn.init.zeros_(self.residual.bias)

    def reset_aggregate(self) -> None:
        """nn.Linear's default initialisation, per head."""
        bound = 1.0 / math.sqrt(2 * self.head_dim)
        nn.init.uniform_(self.aggregate_weight, -bound, bound)
        nn.init.uniform_(self.aggregate_bias, -bound, bound)

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor, return_weights: bool = False):
        if features.shape[-1] != self.dim or prototypes.ndim != 2 or prototypes.shape[1] != self.dim:
            raise ValueError(
                f"expected features [..., {self.dim}] and prototypes [P, {self.dim}], "
                f"got {tuple(features.shape)} and {tuple(prototypes.shape)}"
            )
        if prototypes.shape[0] == 0:
            raise ValueError("no prototypes to attend to")
        lead = features.shape[:-1]
        fx = features.reshape(-1, self.dim)
        h, d = self.heads, self.head_dim
        ex = self.embed(fx).view(-1, h, d)  # [B, H, d]
        ep = self.embed(prototypes.to(fx.dtype)).view(-1, h, d)  # [P, H, d]
        logits = torch.einsum("bhd,phd->bhp", ex, ep) * self.scale
        weights = self.dropout(logits.softmax(dim=-1))  # [B, H, P]
        attended = torch.einsum("bhp,phd->bhd", weights, ep)
        joined = torch.cat([ex, attended], dim=-1)  # [B, H, 2d]
        fa = F.relu(torch.einsum("bhi,hio->bho", joined, self.aggregate_weight.to(joined.dtype)) + self.aggregate_bias.to(joined.dtype))
        out = fx + self.residual(fa.reshape(-1, h * d))
        if self.final_relu:
            out = F.relu(out)
        out = out.reshape(*lead, self.dim)
        if return_weights:
            return out, weights.reshape(*lead, h, -1)
        return out
