"""CPC's patch grid: an image cut into overlapping square patches (van den Oord et al. 2018; Hénaff et al.
2020: 64-px patches at stride 32 on 256-px crops give 7×7), and CPC v2's augmentation of each patch on
its own, drawn on the device from a given generator."""

from __future__ import annotations

import torch
import torch.nn as nn


def grid_side(image_side: int, size: int, stride: int) -> int:
    """Patches along one side; the patches must tile the side exactly (no pixels silently left out)."""
    if size < 1 or stride < 1 or image_side < size or (image_side - size) % stride:
        raise ValueError(f"patches of {size} px at stride {stride} do not tile {image_side} px "
                         f"(needs side >= size and (side - size) divisible by the stride)")
    return (image_side - size) // stride + 1


def cut_patches(images: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """[B, C, S_h, S_w] -> [B, H, W, C, size, size]; patch (i, j) starts at pixel (i·stride, j·stride)."""
    for side in images.shape[-2:]:
        grid_side(side, size, stride)
    return images.unfold(2, size, stride).unfold(3, size, stride).permute(0, 2, 3, 1, 4, 5)


def augment_patches(patches: torch.Tensor, generator: torch.Generator, colour_drop: float, flip: float) -> torch.Tensor:
    """Patches [N, C, p, p], each on its own: with probability `colour_drop` all channels but one chosen
    uniformly are zeroed (CPC v2's colour dropping, "2 of 3 channels"; zero is the mean of normalised
    inputs, where Doersch et al. fill with faint noise), and with probability `flip` it is mirrored
    left-right."""
    n, channels = patches.shape[:2]
    draws = torch.rand(n, 2, generator=generator, device=patches.device)
    kept = torch.randint(channels, (n,), generator=generator, device=patches.device)
    keep = nn.functional.one_hot(kept, channels).to(torch.bool) | (draws[:, :1] >= colour_drop)  # [N, C]
    patches = patches * keep[:, :, None, None].to(patches.dtype)
    mirrored = (draws[:, 1] < flip)[:, None, None, None]
    return torch.where(mirrored, patches.flip(-1), patches)


class PatchFeatures(nn.Module):
    """CPC's evaluation features: the patch encoder's latents mean-pooled over the image's grid (the linear
    evaluation of Hénaff et al.), images [B, C, S, S] -> [B, D]."""

    def __init__(self, encoder: nn.Module, size: int, stride: int):
        super().__init__()
        self.encoder, self.size, self.stride = encoder, size, stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = cut_patches(images, self.size, self.stride)
        latents = self.encoder(patches.flatten(0, 2))
        return latents.unflatten(0, patches.shape[:3]).mean((1, 2))
