"""Rank helpers, all-gather with gradient to the owning rank, cross-rank batch shuffling, and the queue.

Every operation is its own single-process twin: with no process group (or world size 1) it reduces to
the identity on the local batch, so tests compare world size W against one process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks in rank order (no gradient)."""
    if not is_distributed():
        return x
    out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return gather(x)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on this rank's rows: their gradients add up (a sum, not a mean; the
        # engine's averaging over ranks then gives the gradient of the global mean loss). The adjoint is
        # itself an autograd function, so gradients of gradients (MetAug's meta step) cross ranks too.
        return _ReduceScatter.apply(grad)


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        own = torch.empty((x.shape[0] // world_size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(own, x.contiguous(), op=dist.ReduceOp.SUM)
        return own

    @staticmethod
    def backward(ctx, grad):
        return _GatherWithGrad.apply(grad)


class _AllReduceMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        dist.all_reduce(out)
        return out.div_(world_size())

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceMean.apply(grad)  # the mean's adjoint is the mean


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather in rank order whose backward (of any order) returns to each rank the summed gradient
    of its own rows."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


def all_reduce_mean_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, differentiable (to any order)."""
    return _AllReduceMean.apply(x) if is_distributed() else x


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in place, in one flat collective."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


@torch.no_grad()
def shuffled_order(global_rows: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A permutation of the global batch, the same on every rank (drawn on rank 0, broadcast)."""
    perm = torch.randperm(global_rows, generator=generator, device=device)  # drawn where it is used: no host copy
    if is_distributed():
        dist.broadcast(perm, src=0)
    return perm


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """This rank's share of the global batch taken in the order `perm` (ShuffleBN)."""
    rows = x.shape[0]
    return gather(x)[perm[rank() * rows : (rank() + 1) * rows]]


@torch.no_grad()
def unshuffle_across_ranks(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of `shuffle_across_ranks` applied to outputs computed on the shuffled share."""
    rows = y.shape[0]
    return gather(y)[torch.argsort(perm)[rank() * rows : (rank() + 1) * rows]]


class FeatureQueue(nn.Module):
    """A FIFO ring of keys, fed with keys gathered from all ranks, so it is the same on every rank.

    Its contents and write position are buffers: they are saved with the model's state and load at any
    world size.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", nn.functional.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue `keys` (already gathered); the queue size is a multiple of their count (checked at start)."""
        size, rows = self.keys.shape[0], keys.shape[0]
        index = (self.position + torch.arange(rows, device=keys.device)) % size
        self.keys.index_copy_(0, index, keys.to(self.keys.dtype))
        self.position.copy_((self.position + rows) % size)
