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
        targets, sources = [], []
        for m, o in zip(self.encoder.parameters(), online.parameters()):
            if hasattr(m, "ds_tensor"):  # ZeRO-3: this rank's partition ...
                targets.append(m.ds_tensor)
                sources.append(o.ds_tensor)
                if getattr(m, "ds_persist", False):  # ... and the full copy ZeRO-3 keeps of small parameters
                    targets.append(m.data)
                    sources.append(o.data)
            else:
                targets.append(m.data)
                sources.append(o.data)
        torch._foreach_lerp_(targets, [s.to(t.dtype) for t, s in zip(targets, sources)], 1.0 - momentum)
