"""Intra-batch data mixing for SDMP: Mixup, CutMix and ResizeMix on a batch of views, on its own device.

Image i is mixed with its partner p(i) = B-1-i of the same local batch (no images cross ranks), with
lam_i ~ Beta(alpha, alpha) per image, optionally rescaled into a band [low, high] (SDMP's released code
draws in [0.1, 0.9]); `lam` is the share of image i in the result. For the box methods a box of area
~(1 - lam_i) receives the partner and lam_i is recomputed from the pixels actually pasted:
  cutmix     the partner's own pixels under the box; random centre, box clipped to the image.
  resizemix  the whole partner resized (bilinear, as F.interpolate) into the box; the box is placed fully
             inside the image, so nothing of the resized partner is cut off.
The middle image of an odd batch is its own partner: it is left clean with lam = 1.

Everything is drawn and computed on the views' device with tensor ops: no loop over images and no host
synchronisation, also for method="random", whose per-batch choice is a device tensor (the three results are
formed and one is selected; they are a few elementwise passes over the batch, small next to the encoders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("mixup", "cutmix", "resizemix")


def partner(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Local partner indices: partner(B)[i] = B-1-i."""
    return torch.arange(batch_size - 1, -1, -1, device=device)


def global_partner(batch_size: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Partner of local image i by its index in keys gathered over ranks (rank order): rank*B + B-1-i.
    The image itself is at rank*B + i."""
    return rank * batch_size + partner(batch_size, device)


def mix(
    views: torch.Tensor,
    method: str = "random",
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    lam: torch.Tensor | None = None,
    band: tuple[float, float] = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image of `views` [B, C, H, W] (floating point) with image B-1-i.

    Returns (mixed [B, C, H, W] in the views' dtype, lam [B] float32), `views` untouched. `method` is one of
    "mixup", "cutmix", "resizemix" or "random" (one of the three per call, uniformly). `generator`, when
    given, must live on the views' device; with the same generator state the result is the same, and
    "random" gives exactly what the chosen method gives alone. `lam` [B], when given, replaces the Beta draw
    (SDMP mixes both views of image i with the same lam_i); box methods still return the lam of the box
    actually pasted, which can differ from it by the rounding of the box sides. `band` (low, high): a drawn
    lam becomes low + (high - low) * lam before any box is drawn; a given `lam` is used as it is.
    """
    if method not in METHODS + ("random",):
        raise ValueError(f"mixing method must be one of {METHODS + ('random',)}, got {method!r}")
    if views.dim() != 4 or not views.is_floating_point():
        raise ValueError(f"views must be a floating-point [B, C, H, W] tensor, got {views.dtype} {tuple(views.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if not 0 <= band[0] <= band[1] <= 1:
        raise ValueError(f"band must be (low, high) with 0 <= low <= high <= 1, got {band}")
    if generator is not None and generator.device.type != views.device.type:
        raise ValueError(f"generator is on {generator.device}, views on {views.device}: draws must stay on the views' device")

    device, (B, _, H, W) = views.device, views.shape
    pairs = partner(B, device)
    other = views.index_select(0, pairs)
    if lam is None:
        lam = band[0] + (band[1] - band[0]) * _beta(alpha, B, device, generator)
    elif lam.shape != (B,):
        raise ValueError(f"lam must have shape ({B},), one value per image, got {tuple(lam.shape)}")
    lam = lam.to(device=device, dtype=torch.float32)
    lam = torch.where(pairs == torch.arange(B, device=device), 1.0, lam)  # odd batch: the middle stays clean
    if method == "mixup":
        return _mixup(views, other, lam), lam

    # Box methods draw their positions the same way, so "random" reproduces each fixed method exactly.
    position = torch.rand(2, B, device=device, generator=generator)
    h, w = _side(lam, H), _side(lam, W)
    if method == "cutmix":
        return _cutmix(views, other, h, w, position)
    if method == "resizemix":
        return _resizemix(views, other, h, w, position)

    # "random": one method for the whole batch, chosen on the device; the three are formed, one is kept.
    choice = torch.randint(len(METHODS), (), device=device, generator=generator)
    mixed, lam_out = _mixup(views, other, lam), lam
    boxed = (_cutmix(views, other, h, w, position), _resizemix(views, other, h, w, position))
    for k, (mixed_k, lam_k) in enumerate(boxed, start=1):  # k indexes METHODS
        mixed = torch.where(choice == k, mixed_k, mixed)
        lam_out = torch.where(choice == k, lam_k, lam_out)
    return mixed, lam_out


def _beta(alpha: float, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Beta(alpha, alpha) as G1 / (G1 + G2) with Gamma(alpha) draws (torch.distributions takes no generator)."""
    g = torch._standard_gamma(torch.full((2, n), float(alpha), device=device), generator=generator)
    return g[0] / (g[0] + g[1]).clamp_min(torch.finfo(g.dtype).tiny)


def _side(lam: torch.Tensor, size: int) -> torch.Tensor:
    """Box side for a box of area 1 - lam of the image, in whole pixels."""
    return torch.round((1 - lam).sqrt() * size).long()


def _mixup(views: torch.Tensor, other: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    lam = lam.view(-1, 1, 1, 1)  # blend in fp32 so half-precision inputs are rounded once, at the end
    return (lam * views.float() + (1 - lam) * other.float()).to(views.dtype)


def _span(start: torch.Tensor, stop: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size] bool: pixel index in [start, stop) per image."""
    idx = torch.arange(size, device=start.device)
    return (idx >= start[:, None]) & (idx < stop[:, None])


def _box_lam(rows: torch.Tensor, cols: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """lam from the pixels actually pasted (integer area, one correctly rounded division)."""
    area = rows.sum(1) * cols.sum(1)
    return (H * W - area).float() / (H * W)


def _cutmix(views: torch.Tensor, other: torch.Tensor, h: torch.Tensor, w: torch.Tensor, position: torch.Tensor):
    H, W = views.shape[-2:]
    cy = (position[0] * H).long().clamp_max(H - 1)  # centre anywhere in the image, box clipped to it
    cx = (position[1] * W).long().clamp_max(W - 1)
    rows = _span((cy - h // 2).clamp_min(0), cy - h // 2 + h, H)
    cols = _span((cx - w // 2).clamp_min(0), cx - w // 2 + w, W)
    box = rows[:, None, :, None] & cols[:, None, None, :]
    return torch.where(box, other, views), _box_lam(rows, cols, H, W)


def _resizemix(views: torch.Tensor, other: torch.Tensor, h: torch.Tensor, w: torch.Tensor, position: torch.Tensor):
    H, W = views.shape[-2:]
    top = (position[0] * (H - h + 1)).long().clamp_max(H - h)  # box fully inside the image
    left = (position[1] * (W - w + 1)).long().clamp_max(W - w)
    rows, cols = _span(top, top + h, H), _span(left, left + w, W)
    box = rows[:, None, :, None] & cols[:, None, None, :]
    # Per-image sampling grid mapping the box onto the whole partner. Output pixel j of a box of n pixels
    # reads source coordinate (j + 0.5) * size / n - 0.5, as F.interpolate(bilinear, align_corners=False);
    # in grid_sample's normalised coordinates (align_corners=False) that is (2j + 1) / n - 1.
    gy = (2 * (torch.arange(H, device=views.device) - top[:, None]) + 1) / h.clamp_min(1)[:, None] - 1
    gx = (2 * (torch.arange(W, device=views.device) - left[:, None]) + 1) / w.clamp_min(1)[:, None] - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1).float()
    # fp32 sampling: half-precision grid coordinates would misplace pixels by up to half a pixel.
    resized = F.grid_sample(other.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(box, resized.to(views.dtype), views), _box_lam(rows, cols, H, W)
