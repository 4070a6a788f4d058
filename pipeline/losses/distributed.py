"""InfoNCE of local queries against keys gathered from all ranks, gradients returned to each key's owner.

Loss scaling: each rank takes the mean over its own B rows; every rank's loss reaches every key, so the
gather's backward sums the key gradients over ranks and hands each its own slice (reduce-scatter). With the
gradient averaging of DDP or DeepSpeed on top, parameter gradients equal those of one process taking the
mean over the concatenated batch (N = W·B rows against N keys). Averaging in the gather's backward, or
returning only the local part of the key gradient, are the classic mistakes (open_clip issues 616, 894).
Without a process group (or with one rank) everything here is the identity: the single-process twin.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .infonce import info_nce


def rank_and_world(group=None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        world = rank_and_world(group)[1]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.world = group, world
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # Each rank's slice, summed over the ranks whose losses used it.
        parts = list(grad.contiguous().chunk(ctx.world))
        own = torch.empty_like(parts[0])
        dist.reduce_scatter(own, parts, group=ctx.group)
        return own, None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Rows of x from every rank, in rank order (every rank must pass the same shape)."""
    return x if rank_and_world(group)[1] == 1 else _GatherWithGrad.apply(x, group)


def gathered_info_nce(q, k, temperature, targets=None, target_weights=None, queue=None, in_batch_negatives=True,
                      mask_self=False, reduction="mean", impl="auto", group=None) -> torch.Tensor:
    """`info_nce` of local queries q [B, D] against k [N, D] gathered from all ranks ([W·N, D]).

    targets and an index-per-row mask_self address the gathered keys. By default local row i's positive,
    and with mask_self=True its masked key, is the key at rank·N + i: its own key, when q and k come from
    the same local batch. The queue is the same on every rank and is not gathered.
    """
    rank, _ = rank_and_world(group)
    keys = gather_with_grad(k, group)
    if (targets is None or mask_self is True) and q.shape[0] > k.shape[0]:
        raise ValueError(f"a row's own key is key i of this rank, which needs N >= B (B={q.shape[0]}, N={k.shape[0]})")
    own = torch.arange(q.shape[0], device=q.device) + rank * k.shape[0]
    return info_nce(
        q, keys, temperature,
        targets=own if targets is None else targets,
        target_weights=target_weights,
        queue=queue,
        in_batch_negatives=in_batch_negatives,
        mask_self=own if mask_self is True else mask_self,
        reduction=reduction,
        impl=impl,
    )
