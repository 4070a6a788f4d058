"""The shared core of the fused losses: a masked row log-sum-exp over many keys, and the few-column terms.

    lse_i = log Σ_j exp(z(q_i·k_j)),  j over the keys not in exclude[i], then over every queue row,

computed without materialising the B×N logits (chunked PyTorch or Triton), in fp32 (the chunked path
keeps fp64 inputs in fp64), with gradients to q and keys (never to the queue). A loss adds its positive
terms analytically: a row has only a few positive keys, so they are a gather and a row-wise dot
(`pair_dots`), not a dense matrix.
"""

from __future__ import annotations

import torch

from .chunked import ChunkedRowLSE
from .logits import Logits


def row_log_sum_exp(
    q: torch.Tensor,
    keys: torch.Tensor | None,
    queue: torch.Tensor | None,
    exclude: torch.Tensor | None,
    logits: Logits,
    impl: str,
) -> torch.Tensor:
    """lse [B] for impl "chunked" or "triton"; `exclude` [B, E] holds the key indices row i leaves out."""
    queue = None if queue is None else queue.detach()
    if impl == "triton":
        # Imported here: triton is optional, and TRITON_INTERPRET must be set before the kernels are defined.
        from .triton_lse import TritonRowLSE

        return TritonRowLSE.apply(q, keys, queue, exclude, logits)
    return ChunkedRowLSE.apply(q, keys, queue, exclude, logits)


def pair_dots(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, P] dot products q_i·k_{index[i, p]} in fp32 (fp64 for fp64 inputs), with autograd."""
    work = torch.promote_types(q.dtype, torch.float32)
    return torch.einsum("bd,bpd->bp", q.to(work), k[index].to(work))


def repeated(index: torch.Tensor) -> torch.Tensor:
    """[B, P] bool: the entry repeats an earlier one of its row, so a sum over a set of keys skips it."""
    same = index[:, :, None] == index[:, None, :]
    return same.tril(-1).any(2)
