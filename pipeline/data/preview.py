"""The view grid: a batch's views as its method shows them (`Method.preview`: a caption and images in
[0, 1] per column), one row per image, each column captioned above. Small views are enlarged by nearest
neighbour with one integer factor for the whole grid, so that views keep their relative sizes (a local crop
stays smaller than its global view) and the smallest column is at least MIN_SIDE px (a 32-px view shows at
96 px); smaller images are centred in their cell. `python launch/preview.py` writes it, and the loop logs
it to TensorBoard at its first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import ViewRecipe

PAD, MIN_SIDE = 2, 96
Column = tuple[str, torch.Tensor]  # a caption and images [B, 1 or 3, H, W] in [0, 1]


def unnormalise(view: torch.Tensor, recipe: ViewRecipe) -> torch.Tensor:
    """A normalised view [B, 3, H, W] -> its pixels in [0, 1] (fp32)."""
    mean = torch.tensor(recipe.mean, device=view.device).view(3, 1, 1)
    std = torch.tensor(recipe.std, device=view.device).view(3, 1, 1)
    return (view.float() * std + mean).clamp(0, 1)


def tile(patches: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """Patches [B, H, W, C, p, p] -> one image per sample [B, C, H·p + (H−1)·gap, W·p + (W−1)·gap], the
    patches `gap` white pixels apart."""
    b, h, w, c, p, _ = patches.shape
    padded = F.pad(patches.float(), (0, gap, 0, gap), value=1.0)  # a white gap right of and below each patch
    image = padded.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * (p + gap), w * (p + gap))
    return image[..., : h * (p + gap) - gap, : w * (p + gap) - gap]


@dataclass(frozen=True)
class Layout:
    scale: int  # the enlargement of every image
    widths: tuple[int, ...]  # each column's width in px, its caption's included, PAD on its left
    caption_height: int
    row_height: int  # PAD above each row of images

    def left(self, column: int) -> int:
        return sum(self.widths[:column])


def layout(columns: list[Column], font: ImageFont.ImageFont) -> Layout:
    smallest = min(max(images.shape[-2:]) for _, images in columns)
    scale = max(1, math.ceil(MIN_SIDE / smallest))
    widths = tuple(max(images.shape[-1] * scale, math.ceil(font.getlength(caption))) + PAD for caption, images in columns)
    caption_height = font.getbbox("Ag(")[3] + 2 * PAD
    row_height = max(images.shape[-2] for _, images in columns) * scale + PAD
    return Layout(scale, widths, caption_height, row_height)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 1 or 3, H, W] in [0, 1] -> [B, H, W, 3] uint8 (one channel is grey)."""
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def view_grid(columns: list[Column], rows: int) -> Image.Image:
    """The captioned grid of `columns` (each a caption and images [B, 1 or 3, H, W] in [0, 1]), `rows` images."""
    if not columns:
        raise ValueError("the preview has no columns to show")
    for caption, images in columns:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"preview column {caption!r}: images must be [B, 1 or 3, H, W], got {list(images.shape)}")
    font = ImageFont.load_default()
    at = layout(columns, font)
    rows = min(rows, *(images.shape[0] for _, images in columns))
    grid = Image.new("RGB", (sum(at.widths) + PAD, at.caption_height + rows * at.row_height + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for col, (caption, images) in enumerate(columns):
        left, width = at.left(col) + PAD, at.widths[col] - PAD
        draw.text((left + (width - font.getlength(caption)) / 2, PAD), caption, fill=(0, 0, 0), font=font)
        h, w = images.shape[-2] * at.scale, images.shape[-1] * at.scale
        for row, pixels in enumerate(to_uint8(images[:rows])):
            image = Image.fromarray(pixels).resize((w, h), Image.Resampling.NEAREST)
            top = at.caption_height + row * at.row_height + PAD
            grid.paste(image, (left + (width - w) // 2, top + (at.row_height - PAD - h) // 2))
    return grid
