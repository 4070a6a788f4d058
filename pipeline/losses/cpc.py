"""CPC's loss over a grid of patches (van den Oord et al. 2018; Hénaff et al. 2020, appendix `CPC`).

For each offset k, the prediction made from the context at (image b, row i, column j) is a query; its
positive is the target at (b, i + k, j), its negatives every other target of the global batch (all rows,
columns and images on all ranks, gathered with their gradient). Rows i < H − k have a target k rows
below; the others make no query. Scores are `scale`·q·t (CPC's emb_scale 0.1). The loss is, for each
offset, the mean cross-entropy over its queries, summed over the offsets:

    L = Σ_k mean_{b, i < H−k, j} [ log Σ_t exp(scale·q_kbij·t) − scale·q_kbij·t_{b, i+k, j} ]

All offsets' queries go through one `info_nce` call against the gathered targets (the fused masked row
log-sum-exp plus `pair_dots`: never the queries × B·H·W logits on the chunked and Triton paths); the
"reference" impl builds the dense logits. Scaling across ranks is `gathered_info_nce`'s: each rank means
over its own queries (every rank has as many per offset), so the engine's gradient averaging gives the
global loss's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.distributed import rank

from .distributed import gathered_info_nce


def cpc_loss(predictions: torch.Tensor, targets: torch.Tensor, offsets: Sequence[int], scale: float = 0.1,
             impl: str = "auto") -> torch.Tensor:
    """predictions [K, B, H, W, D]: offset `offsets[k]`'s prediction from every context position;
    targets [B, H, W, D]: this rank's patch targets. The loss is fp32 (fp64 for fp64 inputs)."""
    if targets.ndim != 4 or predictions.ndim != 5 or predictions.shape[1:] != targets.shape:
        raise ValueError(f"predictions must be [K, B, H, W, D] and targets [B, H, W, D] alike; got "
                         f"{tuple(predictions.shape)} and {tuple(targets.shape)}")
    images, rows, cols = targets.shape[:3]
    if len(offsets) != predictions.shape[0] or any(not 0 < k < rows for k in offsets):
        raise ValueError(f"offsets must give one row offset in 1..{rows - 1} per prediction set "
                         f"({predictions.shape[0]}); got {list(offsets)}")
    device = targets.device
    first = (rank() * images + torch.arange(images, device=device)) * rows * cols  # the image's first target
    queries, positives, counts = [], [], []
    for prediction, k in zip(predictions, offsets):
        queries.append(prediction[:, : rows - k].flatten(0, 2))
        below = torch.arange(k, rows, device=device)[:, None] * cols + torch.arange(cols, device=device)
        positives.append((first[:, None, None] + below).flatten())
        counts.append(images * (rows - k) * cols)
    per_query = gathered_info_nce(torch.cat(queries), targets.flatten(0, 2), 1.0 / scale, targets=torch.cat(positives),
                                  reduction="none", impl=impl)
    return sum(part.mean() for part in per_query.split(counts))
