"""sRGB -> CIE Lab on the device, as `skimage.color.rgb2lab` computes it (D65 white, 2-degree observer), and
CMC's scaling of each Lab channel to [-1, 1] by its range over the sRGB gamut."""

from __future__ import annotations

import torch

# Linear sRGB -> XYZ (rows X, Y, Z) and the D65 white point, with skimage's constants.
XYZ_FROM_LINEAR_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
D65_WHITE = (0.95047, 1.0, 1.08883)
# The (min, max) each channel takes over the sRGB gamut: L, a, b (the ranges CMC normalises by).
LAB_RANGES = ((0.0, 100.0), (-86.183, 98.233), (-107.857, 94.478))

_EPSILON = 0.008856  # CIE's (6/29)^3, rounded as skimage has it; below it f(t) is the linear segment
_KAPPA = 7.787  # the linear segment's slope (1/3)(29/6)^2, rounded likewise


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB images [B, 3, H, W] in [0, 1] -> CIE Lab [B, 3, H, W] (L in [0, 100]), computed in fp32 or
    fp64 (the input's precision, at least fp32), never under autocast (bf16 would move L by ~0.4). Values
    outside [0, 1] (interpolation overshoot) are clamped first."""
    x = rgb.to(torch.promote_types(rgb.dtype, torch.float32)).clamp(0.0, 1.0)
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    # XYZ divided by the white point, in one matrix product over the channel axis.
    matrix = torch.tensor(XYZ_FROM_LINEAR_RGB, dtype=x.dtype, device=x.device)
    matrix = matrix / torch.tensor(D65_WHITE, dtype=x.dtype, device=x.device)[:, None]
    with torch.autocast(x.device.type, enabled=False):
        t = torch.einsum("ij,bjhw->bihw", matrix, linear)
    f = torch.where(t > _EPSILON, t.clamp_min(_EPSILON) ** (1.0 / 3.0), _KAPPA * t + 16.0 / 116.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def scale_lab(lab: torch.Tensor) -> torch.Tensor:
    """Each Lab channel mapped linearly from its range in `LAB_RANGES` to [-1, 1]."""
    low, high = (torch.tensor(r, dtype=lab.dtype, device=lab.device)[:, None, None] for r in zip(*LAB_RANGES))
    return (2.0 * lab - (high + low)) / (high - low)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab [B, 3, H, W] -> sRGB in [0, 1], the inverse of `rgb_to_lab` as `skimage.color.lab2rgb`
    computes it (negative Z set to 0, colours outside the sRGB gamut clipped): for showing Lab views."""
    x = lab.to(torch.promote_types(lab.dtype, torch.float32))
    L, a, b = x.unbind(1)
    fy = (L + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, (fy - b / 200.0).clamp_min(0.0)], dim=1)
    t = torch.where(f > 6.0 / 29.0, f**3, (f - 16.0 / 116.0) / _KAPPA)
    matrix = torch.linalg.inv(torch.tensor(XYZ_FROM_LINEAR_RGB, dtype=torch.float64)).to(x.device, x.dtype)
    white = torch.tensor(D65_WHITE, dtype=x.dtype, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        linear = torch.einsum("ij,bjhw->bihw", matrix * white, t)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0.0, 1.0)
