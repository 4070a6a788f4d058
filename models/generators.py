"""Feature generators: small networks that turn a batch of features into augmented features.

MetAug's generator (MAG) is an MLP on projector outputs, dim → hidden → hidden → dim with BatchNorm + ReLU
between layers (released sizes 128 → 2048 → 2048 → 128). It knows nothing of training: the method that
owns it decides how it is updated (MetAug: a meta step of its own, outside the engine's optimizer).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class FeatureGenerator(nn.Module):
    """MLP dim → hidden → hidden → dim on [B, dim] features; BatchNorm + ReLU after each hidden layer
    (`batch_norm=False`: ReLU only, so the output of a row depends on that row alone). The output is not
    normalised: the method L2-normalises it like its other features."""

    def __init__(self, dim: int, hidden: int, batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in ((dim, hidden), (hidden, hidden)):
            layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU())  # not in place: the meta step differentiates through it twice
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def feature_generators(count: int, dim: int, hidden: int, batch_norm: bool = True) -> nn.ModuleList:
    """One generator per view."""
    return nn.ModuleList(FeatureGenerator(dim, hidden, batch_norm) for _ in range(count))
