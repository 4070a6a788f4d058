"""Epilogues: how a dot product x = q·k becomes a logit z, and its slope dz/dx for the backward pass.

The row log-sum-exp kernels (chunked and Triton) are generic over these, so InfoNCE, OUCL and AMDIM share them.
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


def circle_weight(s: torch.Tensor, sign: float, optimum: float, detach: bool) -> torch.Tensor:
    """OUCL's Γ = [sign·(s − optimum)]₊; with `detach`, a constant to autograd in every derivative (the
    convention of circle-loss-style weightings, and of the released code's meta step)."""
    weight = (sign * (s - optimum)).clamp_min(0)
    return weight.detach() if detach else weight


def circle_logits(s: torch.Tensor, sign: float, beta: float, optimum: float, margin: float, detach_weight: bool):
    """OUCL's self-paced logit sign·β·Γ·(s − margin), with Γ = `circle_weight(s, sign, optimum, detach_weight)`.

    sign = +1 for negatives (Γ⁻ = [s − O⁻]₊), −1 for positives (Γ⁺ = [O⁺ − s]₊).
    """
    return sign * beta * circle_weight(s, sign, optimum, detach_weight) * (s - margin)


@dataclass(frozen=True)
class CircleNegativeLogits:
    """OUCL negatives on features in [-1, 1]: z = β·[s − optimum]₊·(s − margin), s = (x + 1)/2."""

    beta: float
    optimum: float
    margin: float
    detach_weight: bool

    def value_and_slope(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and dz/dx from one Γ, so that a backward differentiated again (create_graph) sees Γ exactly
        as the reference's autograd does: a constant with `detach_weight`, a function of x without."""
        s = (x + 1) * 0.5
        weight = circle_weight(s, 1.0, self.optimum, self.detach_weight)
        dz_ds = weight if self.detach_weight else weight + (s > self.optimum) * (s - self.margin)
        return self.beta * weight * (s - self.margin), 0.5 * self.beta * dz_ds


@dataclass(frozen=True)
class TanhClipLogits:
    """AMDIM's scores: s = scale·x (scale = 1/√d), soft-clipped to z = clip·tanh(s/clip) (amdim-public's tanh_clip)."""

    scale: float
    clip: float

    def value_and_slope(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tanh(x * (self.scale / self.clip))
        return self.clip * t, self.scale * (1 - t * t)


Logits = ScaledLogits | CircleNegativeLogits | TanhClipLogits
