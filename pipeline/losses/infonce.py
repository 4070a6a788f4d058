"""InfoNCE with one API for SimCLR (NT-Xent), MoCo v2/v3 and SDMP's soft targets.

    loss_i = lse_j(q_i·k_j/τ) − Σ_p w_ip · q_i·k_{t_ip}/τ

j runs over the in-batch keys (only row i's own positive keys when in_batch_negatives=False), minus the
key masked by mask_self, plus every queue row. impl "reference" builds the dense B×(N+K) logits (the
definition the others are tested against); "chunked" and "triton" never do (see `row_lse`).
"""

from __future__ import annotations

import torch

from . import checks
from .logits import ScaledLogits
from .row_lse import pair_dots, repeated, row_log_sum_exp

REDUCTIONS = ("mean", "sum", "none")


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: float,
    targets: torch.Tensor | None = None,
    target_weights: torch.Tensor | None = None,
    queue: torch.Tensor | None = None,
    in_batch_negatives: bool = True,
    mask_self: bool | torch.Tensor = False,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """InfoNCE of queries q [B, D] against keys k [N, D] (and queue [K, D], which gets no gradient).

    targets: None (row i's positive is key i), an index per row [B], or a few positives per row [B, P]
    with target_weights [B, P] (non-negative, summing to 1 per row; uniform when omitted).
    in_batch_negatives=False: row i's denominator holds only its own positive keys and the queue (MoCo v2).
    mask_self: True removes key i from row i's denominator (NT-Xent, q and k the same set); an index per
    row [B] removes that key instead (a row's own key at an offset among gathered keys); [B, M] removes M
    keys per row (e.g. a row's own key and its feature-space augmentation).
    reduction: "mean", "sum", or "none" (per-row losses [B]). The loss is fp32 (fp64 for fp64 inputs).
    impl: "auto" (Triton on CUDA, chunked PyTorch otherwise), "reference", "chunked" or "triton".
    Value checks (non-finite inputs, index ranges, weight sums) run on CPU inputs and, on the GPU, under
    torch.autograd.detect_anomaly() only: see `checks`.
    """
    checks.check_features("q", q)
    checks.check_features("k", k, like=q)
    if queue is not None:
        checks.check_features("queue", queue, like=q)
    scale = 1.0 / checks.check_temperature(temperature)
    checks.check_choice("reduction", reduction, REDUCTIONS)
    impl = checks.resolve_impl(impl, q)
    index, weights = _positives(q, k, targets, target_weights)
    own = checks.self_index(mask_self, q.shape[0], k.shape[0], q.device, many=True)  # [B, M]
    if own is not None and not in_batch_negatives:
        raise ValueError("mask_self takes a key out of the in-batch negatives; with in_batch_negatives=False there are none")
    if own is not None and k.shape[0] == 1 and queue is None:
        raise ValueError("with mask_self, one key and no queue, a row has no key left in its denominator")
    if checks.value_checks_enabled(q, k, queue, index):
        _check_values(q, k, queue, index, target_weights, own)

    if impl == "reference":
        rows = reference_rows(q, k, scale, index, weights, queue, in_batch_negatives, own)
    else:
        rows = _fused_rows(q, k, scale, index, weights, queue, in_batch_negatives, own, impl)
    if reduction == "none":
        return rows
    return rows.mean() if reduction == "mean" else rows.sum()


def _positives(q, k, targets, target_weights) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, P] int64, weights [B, P] in the working dtype)."""
    work = torch.promote_types(q.dtype, torch.float32)
    if target_weights is not None and (targets is None or targets.ndim != 2):
        raise ValueError("target_weights [B, P] needs targets [B, P]: the keys they weight")
    if targets is None:
        if q.shape[0] > k.shape[0]:
            raise ValueError(f"default targets pair row i with key i, which needs N >= B (B={q.shape[0]}, N={k.shape[0]}); pass targets")
        index = torch.arange(q.shape[0], device=q.device)[:, None]
    else:
        index = checks.index_per_row("targets", targets, q.shape[0], q.device)
    if target_weights is None:
        return index, torch.full(index.shape, 1.0 / index.shape[1], dtype=work, device=q.device)
    if not isinstance(target_weights, torch.Tensor) or not target_weights.is_floating_point():
        raise TypeError("target_weights must be a floating-point tensor [B, P]")
    if target_weights.shape != index.shape or target_weights.device != q.device:
        raise ValueError(f"target_weights must match targets: shape {tuple(index.shape)} on {q.device}; "
                         f"got {tuple(target_weights.shape)} on {target_weights.device}")
    return index, target_weights.to(work)


def _check_values(q, k, queue, index, target_weights, own) -> None:
    checks.check_finite("q", q)
    checks.check_finite("k", k)
    checks.check_finite("queue", queue)
    checks.check_index_range("targets", index, k.shape[0])
    checks.check_index_range("mask_self", own, k.shape[0])
    if target_weights is not None:
        checks.check_finite("target_weights", target_weights)
        weights = target_weights.double()
        tolerance = max(1e-5, 4 * torch.finfo(target_weights.dtype).eps * weights.shape[1])
        if (weights < 0).any() or ((weights.sum(1) - 1).abs() > tolerance).any():
            raise ValueError("target_weights must be non-negative and sum to 1 in every row")
    if own is not None and (index[:, :, None] == own[:, None, :]).any():
        raise ValueError("mask_self removes a row's own positive key from its denominator")


def reference_rows(q, k, scale, index, weights, queue, in_batch_negatives, own) -> torch.Tensor:
    """Per-row losses from the dense logits: the definition, written for clarity, not memory."""
    work = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(work), k.to(work)
    logits = q @ k.T * scale
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if not in_batch_negatives:
        allowed = torch.zeros_like(allowed).scatter_(1, index, True)
    if own is not None:
        allowed.scatter_(1, own, False)
    columns = [logits.masked_fill(~allowed, float("-inf"))]
    if queue is not None:
        columns.append(q @ queue.detach().to(work).T * scale)
    lse = torch.logsumexp(torch.cat(columns, 1), 1)
    return lse - (weights * logits.gather(1, index)).sum(1)


def _fused_rows(q, k, scale, index, weights, queue, in_batch_negatives, own, impl) -> torch.Tensor:
    logits = ScaledLogits(scale)
    positive = pair_dots(q, k, index) * scale
    if in_batch_negatives:
        lse = row_log_sum_exp(q, k, queue, own, logits, impl)
    else:
        # The denominator's in-batch part is the set of the row's positive keys: a few columns, in closed form.
        lse = torch.logsumexp(positive.masked_fill(repeated(index), float("-inf")), 1)
        if queue is not None:
            lse = torch.logaddexp(lse, row_log_sum_exp(q, None, queue, None, logits, impl))
    return lse - (weights * positive).sum(1)
