"""Frozen-backbone features of an evaluation epoch, identical and in sample order on every rank."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised features of `views[0]` for the `valid` rows of every batch.

    `batches` yields objects with `views`, `labels`, `indices` and `valid` (the loader's `Batch`). `model`
    maps [B, 3, H, W] to [B, D]; `dtype` runs it under autocast. Returns (features float32 [N, D],
    labels int64 [N], indices int64 [N]) on `device`, sorted by index. Under torch.distributed with more
    than one rank, every rank returns the rows of all ranks.
    """
    device = torch.device(device)
    param = next(model.parameters(), None)
    input_dtype = param.dtype if param is not None else torch.float32
    # Restore each module's own mode: a model may keep some parts (frozen BatchNorm) in eval on purpose.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    feats, labels, indices, valid = [], [], [], []
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for batch in batches:
                out = model(batch.views[0].to(device, input_dtype, non_blocking=True))
                if out.ndim != 2:
                    raise ValueError(f"the model must return [batch, dim] features, got shape {tuple(out.shape)}")
                # Padding rows are kept until the end: masking here would sync with the host every batch.
                feats.append(F.normalize(out.float(), dim=1))
                labels.append(batch.labels)
                indices.append(batch.indices)
                valid.append(batch.valid)
    finally:
        for module, training in modes:
            module.training = training

    if feats:
        keep = torch.cat(valid).to(device)
        features = torch.cat(feats)[keep]
        labels, indices = (torch.cat(t).to(device)[keep] for t in (labels, indices))
    else:
        features = torch.empty(0, 0, device=device)
        labels = indices = torch.empty(0, dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        features, labels, indices = _gather_rows(features, labels, indices)
    elif not feats:
        raise ValueError("extract_features got no batches")
    order = indices.argsort()
    return features[order], labels[order], indices[order]


def _gather_rows(features, labels, indices):
    """Concatenate every rank's rows; ranks may hold different counts (or no batches at all)."""
    world = dist.get_world_size()
    # NCCL only moves CUDA tensors; gloo is given CPU tensors.
    nccl = "nccl" in str(dist.get_backend())
    comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    shape = torch.tensor(features.shape, dtype=torch.int64, device=comm)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    counts, dims = zip(*torch.stack(shapes).tolist())  # one host sync per extraction
    dim = max(dims)
    # Every rank sees the same shapes, so every rank raises together instead of hanging in a collective.
    if dim == 0:
        raise ValueError("extract_features got no batches on any rank")
    if any(d not in (0, dim) for d in dims):
        raise ValueError(f"ranks returned features of different widths: {list(dims)}")

    rows, mine = max(counts), counts[dist.get_rank()]
    padded_feats = torch.zeros(rows, dim, device=comm)
    padded_ids = torch.zeros(rows, 2, dtype=torch.int64, device=comm)
    if mine:
        padded_feats[:mine] = features.to(comm)
        padded_ids[:mine] = torch.stack([labels, indices], 1).to(comm)
    all_feats = [torch.empty_like(padded_feats) for _ in range(world)]
    all_ids = [torch.empty_like(padded_ids) for _ in range(world)]
    dist.all_gather(all_feats, padded_feats)
    dist.all_gather(all_ids, padded_ids)

    device = features.device
    features = torch.cat([f[:n] for f, n in zip(all_feats, counts)]).to(device)
    ids = torch.cat([i[:n] for i, n in zip(all_ids, counts)]).to(device)
    return features, ids[:, 0], ids[:, 1]
