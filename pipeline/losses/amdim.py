"""AMDIM's NCE cost of one task (Bachman, Hjelm & Buchwalter, NeurIPS 2019; Philip-Bachman/amdim-public,
costs.py `NCE_MI_MULTI`).

A task has one query per image (r1's global vector, or one r5 location) from view a, and as keys every
location of a target map (r5 or r7) from view b, for every image of the global batch (gathered from all
ranks, gradients back to their owners). Scores s = q·k/√d; a pair is positive when the key is a location
of the query's own image. Each positive gets its own softmax over itself and the negatives:

    nce = −mean_{b,m} [z_{b,bm} − logaddexp(z_{b,bm}, LSE_neg(b))],  z = clip·tanh(s/clip),

LSE_neg over the other images' locations (costs.py sets the positives to −clip and masks them out of
the sum). The regulariser is mean(s²) over every pair, positives included, of the raw scores before the
clip; the method weights it (0.05 in the code).

Fused path: LSE_neg is `row_lse.row_log_sum_exp` with the clip as the kernels' epilogue
(`logits.TanhClipLogits`), and Σ s² a chunked sum of squares with its own backward; both recompute key
chunks, O(B·chunk) memory, never the B × W·B·M logits. (The Gram form Σ s² = tr((QᵀQ)(KᵀK))/d needs no
chunks but costs (B + N)·d² against B·N·d: more whenever d exceeds about B, as at n_rkhs = 1024.)

Loss scaling across ranks is `gathered_info_nce`'s: each rank means over its own queries, the gathers'
backward sums over ranks, and the engine's averaging gives the gradient of the global mean.
"""

from __future__ import annotations

import math

import torch

from pipeline.distributed import gather_with_grad, rank

from . import checks
from .chunked import _chunks
from .logits import TanhClipLogits
from .row_lse import pair_dots, row_log_sum_exp


def amdim_nce(q: torch.Tensor, l: torch.Tensor, clip: float = 20.0, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(nce, mean(s²)) of this rank's queries q [B, D] (one per image) against the target locations
    l [B, M, D] of every image of the global batch.

    impl: "reference" (dense logits, the definition), "chunked", "triton" or "auto" (Triton on CUDA, chunked
    otherwise). Both values are fp32 (fp64 for fp64 inputs), under autocast too.
    """
    checks.check_queries_and_locals("q", q, l, "AMDIM")
    if not clip > 0:
        raise ValueError(f"clip must be positive; got {clip}")
    impl = checks.resolve_impl(impl, q)
    rows, locations = l.shape[:2]
    # fp32 throughout, under autocast too: the positives, the LSE kernels and the sum of squares alike.
    with torch.autocast(q.device.type, enabled=False):
        work = torch.promote_types(q.dtype, torch.float32)
        q = q.to(work)
        keys = gather_with_grad(l.flatten(0, 1)).to(work)  # [W·B·M, D], image-major
        first = (rank() * rows + torch.arange(rows, device=q.device)) * locations
        own = first[:, None] + torch.arange(locations, device=q.device)  # [B, M]: the query's own image
        logits = TanhClipLogits(1.0 / math.sqrt(q.shape[1]), float(clip))
        positive, _ = logits.value_and_slope(pair_dots(q, keys, own))  # [B, M]
        if impl == "reference":
            raw = q @ keys.T * logits.scale
            mean_square = raw.square().mean()
            negative_lse = torch.logsumexp((clip * torch.tanh(raw / clip)).scatter(1, own, float("-inf")), 1)
        else:
            negative_lse = row_log_sum_exp(q, keys, None, own, logits, impl)
            mean_square = _SquareSum.apply(q, keys) * (logits.scale**2 / (rows * keys.shape[0]))
        nce = -(positive - torch.logaddexp(positive, negative_lse[:, None])).mean()
        return nce, mean_square


class _SquareSum(torch.autograd.Function):
    """Σ_ij (q_i·k_j)² over key chunks; the backward recomputes each chunk's X = Q·K_cᵀ:
    d/dQ = 2·X·K_c summed over chunks, d/dK_c = 2·Xᵀ·Q."""

    @staticmethod
    def forward(ctx, q, keys):
        total = q.new_zeros(())
        for _, block in _chunks(keys, q.shape[0]):
            total += (q @ block.T).square().sum()
        ctx.save_for_backward(q, keys)
        return total

    @staticmethod
    def backward(ctx, grad):
        q, keys = ctx.saved_tensors
        grad_q = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        grad_keys = torch.empty_like(keys) if ctx.needs_input_grad[1] else None
        for start, block in _chunks(keys, q.shape[0]):
            x = (q @ block.T) * (2 * grad)
            if grad_q is not None:
                grad_q += x @ block
            if grad_keys is not None:
                grad_keys[start : start + block.shape[0]] = x.T @ q
        return grad_q, grad_keys
