"""CPC v2's context network (Hénaff et al. 2020, appendix pseudo-code `pixelCNN`): residual blocks of
masked convolutions over the grid of patch latents, so that the context at row i sees rows <= i only.

Each block: 1×1 conv to `hidden`, ReLU, 1×3 conv along the row ("same"), one row of zeros padded on top
and a 2×1 conv ("valid": output row i reads input rows i-1 and i), ReLU, 1×1 conv back to the latent
width, added to its input; a ReLU after the last block. No block reads a row below its output row, so
the stack does not either.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.along_row = nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))
        self.from_above = nn.Conv2d(hidden, hidden, (2, 1))
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = F.relu(self.reduce(x))
        c = F.pad(self.along_row(c), (0, 0, 1, 0))  # (left, right, top, bottom): the row above row 0 is zeros
        c = F.relu(self.from_above(c))
        return x + self.expand(c)


class CausalContext(nn.Module):
    """Latents [B, D, H, W] -> context [B, D, H, W], row i a function of latent rows 0..i."""

    def __init__(self, channels: int, hidden: int = 256, blocks: int = 5):
        super().__init__()
        self.blocks = nn.Sequential(*(CausalBlock(channels, hidden) for _ in range(blocks)))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(latents))
