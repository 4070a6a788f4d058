"""The momentum (EMA) encoder: an fp32 copy of online modules that follows them without gradients."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class MomentumEncoder(nn.Module):
    """`encoder` starts as a copy of `online` and moves towards it with `update(online, m)`.

    The update runs in fp32: in bf16 a step of (1 - m) <= 1% is mostly below the rounding step (2^-8
    relative), so most weights would never move. Under ZeRO-3 both modules are partitioned alike (same
    shapes, same engine), so each rank updates its own partitions (`ds_tensor`) with no communication.
    """

    def __init__(self, online: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(online).requires_grad_(False)

    def forward(self, x):
        return self.encoder(x)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        pairs = list(zip(self.encoder.parameters(), online.parameters()))
        local = [(getattr(m, "ds_tensor", m.data), getattr(o, "ds_tensor", o.data)) for m, o in pairs]
        targets = [m for m, _ in local]
        torch._foreach_lerp_(targets, [o.to(m.dtype) for m, o in local], 1.0 - momentum)
