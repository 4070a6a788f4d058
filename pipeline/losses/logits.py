"""Epilogues: how a dot product x = q·k becomes a logit z, and its slope dz/dx for the backward pass.

The row log-sum-exp kernels (chunked and Triton) are generic over these, so InfoNCE and OUCL share them.
Triton mirrors `value_and_slope` in `triton_lse._logits_and_slope`; the two are tested against each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScaledLogits:
    """z = scale·x (InfoNCE: scale = 1/τ)."""

    scale: float

    def value_and_slope(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        return x * self.scale, self.scale


def circle_logits(s: torch.Tensor, sign: float, beta: float, optimum: float, margin: float, detach_weight: bool):
    """OUCL's self-paced logit sign·β·Γ·(s − margin), with Γ = [sign·(s − optimum)]₊.

    sign = +1 for negatives (Γ⁻ = [s − O⁻]₊), −1 for positives (Γ⁺ = [O⁺ − s]₊). With `detach_weight`, Γ is
    a constant in the backward pass, the convention of circle-loss-style weightings.
    """
    weight = (sign * (s - optimum)).clamp_min(0)
    if detach_weight:
        weight = weight.detach()
    return sign * beta * weight * (s - margin)


@dataclass(frozen=True)
class CircleNegativeLogits:
    """OUCL negatives on features in [-1, 1]: z = β·[s − optimum]₊·(s − margin), s = (x + 1)/2."""

    beta: float
    optimum: float
    margin: float
    detach_weight: bool

    def value_and_slope(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = (x + 1) * 0.5
        value = circle_logits(s, 1.0, self.beta, self.optimum, self.margin, detach_weight=False)
        weight = (s - self.optimum).clamp_min(0)
        dz_ds = weight if self.detach_weight else weight + (s > self.optimum) * (s - self.margin)
        return value, 0.5 * self.beta * dz_ds


Logits = ScaledLogits | CircleNegativeLogits
