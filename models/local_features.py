"""A backbone's pooled global vector and the feature maps of chosen stages, from one forward pass.

Built on timm's `forward_intermediates`, so the module that trains (and is exported) stays the plain timm
model: ResNets give the maps of their stages (0 the stem, then one per residual stage), ViTs the patch
tokens of their blocks reshaped to [B, D, H/p, W/p] (prefix tokens left out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def stage_count(backbone: nn.Module) -> int:
    """How many stages (ResNet) or blocks (ViT) `forward_intermediates` indexes."""
    if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "feature_info"):
        raise ValueError(f"{type(backbone).__name__} has no timm forward_intermediates: local features need a timm ResNet or ViT")
    return len(backbone.feature_info)


def stage_channels(backbone: nn.Module, stages: Sequence[int]) -> list[int]:
    """Channels of each chosen stage's map."""
    check_stages(backbone, stages)
    return [backbone.feature_info[s]["num_chs"] for s in stages]


def check_stages(backbone: nn.Module, stages: Sequence[int]) -> None:
    count = stage_count(backbone)
    if not stages or any(not 0 <= s < count for s in stages) or sorted(set(stages)) != list(stages):
        raise ValueError(f"stages must be increasing indices in 0..{count - 1} of {type(backbone).__name__}'s "
                         f"stages; got {list(stages)}")


def global_and_maps(backbone: nn.Module, x: torch.Tensor, stages: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the backbone's pooled features [B, num_features], exactly `backbone(x)`; the maps [B, C_s, H_s, W_s]
    of `stages`). Stages past the last chosen one still run: the global vector comes from the top."""
    check_stages(backbone, stages)
    final, maps = backbone.forward_intermediates(x, indices=list(stages), output_fmt="NCHW")
    return backbone.forward_head(final), maps


def map_rows(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H·W, C]: one row per location, in row-major order."""
    return feature_map.flatten(2).transpose(1, 2)
