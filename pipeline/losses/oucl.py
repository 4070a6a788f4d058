"""OUCL (MetAug's optimisation-driven unified contrastive loss) on the row log-sum-exp kernels.

With s = (cos + 1)/2 on L2-normalised features, for each anchor:

    L = log[1 + Σ_neg exp(β·Γ⁻·(s⁻ − γ⁻)) · Σ_pos exp(−β·Γ⁺·(s⁺ − γ⁺))] = softplus(LSE_neg + LSE_pos)
    Γ⁺ = [O⁺ − s⁺]₊, Γ⁻ = [s⁻ − O⁻]₊, O⁺ = 1 + γ, O⁻ = −γ, γ⁺ = 1 − γ, γ⁻ = γ.

LSE_neg runs over every key that is not one of the anchor's positives (nor the anchor itself with
mask_self): it is the big sum, done by the kernels with the circle epilogue. LSE_pos runs over the few
positives, a gather. weighting=False and margins=False give the released code's behaviour (Γ = 1, no
margins): L = log[1 + Σ_neg Σ_pos exp((cos⁻ − cos⁺)/T)], T = 2/β.
"""

from __future__ import annotations

import torch

from . import checks
from .logits import CircleNegativeLogits, ScaledLogits, circle_logits
from .row_lse import pair_dots, repeated, row_log_sum_exp

REDUCTIONS = ("mean", "sum", "none")


def oucl_log_sum_exps(
    anchors: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    beta: float = 16.0,
    gamma: float = 0.25,
    weighting: bool = True,
    margins: bool = True,
    detach_weights: bool = True,
    mask_self: bool | torch.Tensor = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(LSE_neg [B], LSE_pos [B]) of anchors [B, D] against keys [N, D], both L2-normalised.

    positives: key indices per anchor, [B] or [B, P]; every other key is a negative. mask_self as in
    `info_nce` (True: key i is anchor i itself and is neither). detach_weights: Γ is a constant in
    every derivative (first and second), as in circle-loss-style weightings. impl as in `info_nce`.
    """
    checks.check_features("anchors", anchors)
    checks.check_features("keys", keys, like=anchors)
    impl = checks.resolve_impl(impl, anchors)
    index = checks.index_per_row("positives", positives, anchors.shape[0], anchors.device)
    own = checks.self_index(mask_self, anchors.shape[0], keys.shape[0], anchors.device)
    if checks.value_checks_enabled(anchors, keys, index):
        checks.check_finite("anchors", anchors)
        checks.check_finite("keys", keys)
        checks.check_index_range("positives", index, keys.shape[0])
        checks.check_index_range("mask_self", own, keys.shape[0])
        if own is not None and (index == own[:, None]).any():
            raise ValueError("mask_self removes an anchor's own key, but it is listed among its positives")
    shape = _Shape(beta, gamma, weighting, margins, detach_weights)
    if impl == "reference":
        return _reference(anchors, keys, index, own, shape)

    s_pos = (pair_dots(anchors, keys, index) + 1) * 0.5
    lse_pos = torch.logsumexp(shape.positive_logits(s_pos).masked_fill(repeated(index), float("-inf")), 1)
    exclude = index if own is None else torch.cat([index, own[:, None]], 1)
    if weighting:
        lse_neg = row_log_sum_exp(anchors, keys, None, exclude, shape.negative_epilogue(), impl)
    else:  # β·(s − γ⁻) is linear in the dot product: InfoNCE's epilogue at scale β/2, plus a constant
        lse_neg = row_log_sum_exp(anchors, keys, None, exclude, ScaledLogits(beta / 2), impl)
        lse_neg = lse_neg + beta * (0.5 - shape.margin_neg)
    return lse_neg, lse_pos


def oucl_loss(anchors, keys, positives, reduction: str = "mean", **options) -> torch.Tensor:
    """softplus(LSE_neg + LSE_pos) per anchor, reduced ("mean", "sum" or "none"); options as above."""
    checks.check_choice("reduction", reduction, REDUCTIONS)
    return _reduce(*oucl_log_sum_exps(anchors, keys, positives, **options), reduction)


def oucl_score_sets(s_pos: torch.Tensor, s_neg: torch.Tensor, beta: float = 16.0, gamma: float = 0.25,
                    weighting: bool = True, margins: bool = True, detach_weights: bool = True,
                    reduction: str = "mean") -> torch.Tensor:
    """OUCL of anchors that carry their own scores, already mapped to s = (x + 1)/2: positives s_pos [B, P]
    and negatives s_neg [B, Q] per anchor (MetAug's released CMC setting: the cross-view scores against a
    memory bank). Dense: each row holds only its own scores."""
    checks.check_choice("reduction", reduction, REDUCTIONS)
    if s_pos.ndim != 2 or s_neg.ndim != 2 or s_pos.shape[0] != s_neg.shape[0]:
        raise ValueError(f"s_pos and s_neg must be [B, P] and [B, Q] for the same B anchors; got "
                         f"{tuple(s_pos.shape)} and {tuple(s_neg.shape)}")
    shape = _Shape(beta, gamma, weighting, margins, detach_weights)
    lse_pos = torch.logsumexp(shape.positive_logits(s_pos), 1)
    return _reduce(torch.logsumexp(shape.negative_logits(s_neg), 1), lse_pos, reduction)


def _reduce(lse_neg: torch.Tensor, lse_pos: torch.Tensor, reduction: str) -> torch.Tensor:
    total = lse_neg + lse_pos
    rows = torch.logaddexp(total, torch.zeros_like(total))  # F.softplus is x above x = 20: 2e-9 off in fp64
    if reduction == "none":
        return rows
    return rows.mean() if reduction == "mean" else rows.sum()


class _Shape:
    """β, γ and the switches, turned into the optima O± and margins γ± of the formula."""

    def __init__(self, beta: float, gamma: float, weighting: bool, margins: bool, detach_weights: bool):
        self.beta, self.weighting, self.detach = float(beta), weighting, detach_weights
        self.optimum_pos, self.optimum_neg = 1 + gamma, -gamma
        self.margin_pos, self.margin_neg = (1 - gamma, gamma) if margins else (0.0, 0.0)

    def positive_logits(self, s: torch.Tensor) -> torch.Tensor:
        if not self.weighting:
            return -self.beta * (s - self.margin_pos)
        return circle_logits(s, -1.0, self.beta, self.optimum_pos, self.margin_pos, self.detach)

    def negative_logits(self, s: torch.Tensor) -> torch.Tensor:
        if not self.weighting:
            return self.beta * (s - self.margin_neg)
        return circle_logits(s, 1.0, self.beta, self.optimum_neg, self.margin_neg, self.detach)

    def negative_epilogue(self) -> CircleNegativeLogits:
        return CircleNegativeLogits(self.beta, self.optimum_neg, self.margin_neg, self.detach)


def _reference(anchors, keys, index, own, shape: _Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense: both sums read off the full B×N similarity matrix with a positive mask. An anchor with no
    negative gets LSE_neg = -inf here as in the fused paths, but NaN gradients (torch.logsumexp's)."""
    work = torch.promote_types(anchors.dtype, torch.float32)
    s = (anchors.to(work) @ keys.to(work).T + 1) * 0.5
    positive = torch.zeros_like(s, dtype=torch.bool).scatter_(1, index, True)
    negative = ~positive
    if own is not None:
        negative[torch.arange(s.shape[0]), own] = False
    lse_neg = torch.logsumexp(shape.negative_logits(s).masked_fill(~negative, float("-inf")), 1)
    lse_pos = torch.logsumexp(shape.positive_logits(s).masked_fill(~positive, float("-inf")), 1)
    return lse_neg, lse_pos
