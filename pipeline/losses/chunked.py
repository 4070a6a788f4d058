"""Row log-sum-exp over key chunks in plain PyTorch: O(B·chunk) memory, recomputed in backward.

The CPU path and the fallback of the Triton kernels, with the same contract (see `row_lse`). Work happens
in fp32 (fp64 for fp64 inputs, which the tests use), whatever the input dtype.
"""

from __future__ import annotations

import torch

from .logits import Logits

# Elements of one [B, chunk] logit block: 2**24 fp32 is 64 MiB, whatever B is.
CHUNK_ELEMENTS = 2**24


def _chunks(keys: torch.Tensor | None, rows: int):
    if keys is None:
        return
    size = max(1, CHUNK_ELEMENTS // max(rows, 1))
    for start in range(0, keys.shape[0], size):
        yield start, keys[start : start + size]


def _excluded(exclude: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """[B, count] mask of the columns start..start+count that row i leaves out of its sum."""
    if exclude is None:
        return None
    # Scattered hits, O(B·(count + E)) for any E (a row may leave out many keys); indices outside the
    # chunk add zero at a clamped column, so there is no data-dependent shape and no host sync.
    column = exclude - start
    inside = (column >= 0) & (column < count)
    hits = torch.zeros(exclude.shape[0], count, dtype=torch.int32, device=exclude.device)
    return hits.scatter_add_(1, column.clamp(0, count - 1), inside.to(torch.int32)) > 0


class ChunkedRowLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, queue, exclude, logits: Logits):
        work = torch.promote_types(q.dtype, torch.float32)
        q_work = q.to(work)
        lse = torch.full((q.shape[0],), float("-inf"), dtype=work, device=q.device)
        for key_set, key_exclude in ((keys, exclude), (queue, None)):
            for start, block in _chunks(key_set, q.shape[0]):
                z, _ = logits.value_and_slope(q_work @ block.to(work).T)
                mask = _excluded(key_exclude, start, block.shape[0])
                if mask is not None:
                    z = z.masked_fill(mask, float("-inf"))
                lse = torch.logaddexp(lse, torch.logsumexp(z, 1))
        ctx.save_for_backward(q, keys, queue, exclude, lse)
        ctx.logits = logits
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        q, keys, queue, exclude, lse = ctx.saved_tensors
        want_q, want_keys = ctx.needs_input_grad[0], keys is not None and ctx.needs_input_grad[1]
        grad_q, grad_keys = row_lse_grads(q, keys, queue, exclude, ctx.logits, lse, grad_lse, want_q, want_keys)
        return grad_q, grad_keys, None, None, None


def row_lse_grads(q, keys, queue, exclude, logits: Logits, lse, grad_lse, want_q: bool, want_keys: bool):
    """(d/dq, d/dkeys) of Σ_i grad_lse_i·lse_i, each None unless wanted, in plain PyTorch ops: under
    create_graph autograd differentiates them again (MetAug's meta step), for the Triton path too; the
    graph then keeps every chunk's tensors, O(B·N) memory."""
    work = lse.dtype
    q_work, grad_lse = q.to(work), grad_lse.to(work)
    grad_q = torch.zeros_like(q_work) if want_q else None
    grad_keys = torch.zeros_like(keys, dtype=work) if want_keys else None
    for key_set, key_exclude, grad_set in ((keys, exclude, grad_keys), (queue, None, None)):
        for start, block in _chunks(key_set, q.shape[0]):
            block = block.to(work)
            z, slope = logits.value_and_slope(q_work @ block.T)
            # d lse_i / d z_ij = softmax_ij; the chain rule through z adds the slope.
            weights = torch.exp(z - lse[:, None]) * (grad_lse[:, None] * slope)
            mask = _excluded(key_exclude, start, block.shape[0])
            if mask is not None:  # also clears the NaNs of rows with no key left (lse = -inf)
                weights = weights.masked_fill(mask, 0.0)
            if grad_q is not None:
                grad_q += weights @ block
            if grad_set is not None:
                grad_set[start : start + block.shape[0]] = weights.T @ q_work
    return (
        grad_q.to(q.dtype) if want_q else None,
        grad_keys.to(keys.dtype) if want_keys else None,
    )
