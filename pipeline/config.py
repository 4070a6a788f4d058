"""Typed, validated configuration. Every model forbids unknown keys, so a typo stops the run naming the key.

This module holds the data part (views and reading); the training issue adds the rest around it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Probability = Field(ge=0.0, le=1.0)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ordered_range(value: tuple[float, float], low: float, high: float | None, name: str):
    lo, hi = value
    if not (low < lo <= hi and (high is None or hi <= high)):
        limit = f"<= {high}" if high is not None else ""
        raise ValueError(f"{name} must satisfy {low} < min <= max {limit}, got {value}")
    return value


class ColorJitter(Strict):
    brightness: float = Field(0.4, ge=0.0, le=1.0)
    contrast: float = Field(0.4, ge=0.0, le=1.0)
    saturation: float = Field(0.2, ge=0.0, le=1.0)
    hue: float = Field(0.1, ge=0.0, le=0.5)  # fraction of the colour circle, as in torchvision
    probability: float = Probability


class Blur(Strict):
    probability: float = Probability
    sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the output view

    _sigma = field_validator("sigma")(lambda v: _ordered_range(v, 0.0, None, "sigma"))


class ViewRecipe(Strict):
    """One augmented view: random resized crop, flip, colour jitter, grayscale, blur, solarise, normalise."""

    size: int = Field(224, ge=8, le=4096)
    scale: tuple[float, float] = (0.08, 1.0)  # fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height
    flip: float = Field(0.5, ge=0.0, le=1.0)
    color_jitter: ColorJitter | None = ColorJitter(probability=0.8)
    grayscale: float = Field(0.2, ge=0.0, le=1.0)
    blur: Blur | None = None
    solarize: float = Field(0.0, ge=0.0, le=1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    _scale = field_validator("scale")(lambda v: _ordered_range(v, 0.0, 1.0, "scale"))
    _ratio = field_validator("ratio")(lambda v: _ordered_range(v, 0.0, None, "ratio"))

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v):
        if min(v) <= 0:
            raise ValueError(f"std must be positive, got {v}")
        return v


def simclr_views(size: int, blur: bool) -> list[ViewRecipe]:
    """SimCLR: two identical views; strength-1.0 jitter (0.8 each, hue 0.2); blur for ImageNet, not CIFAR."""
    view = ViewRecipe(
        size=size,
        color_jitter=ColorJitter(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, probability=0.8),
        blur=Blur(probability=0.5) if blur else None,
    )
    return [view, view]


def byol_views(size: int, blur: bool) -> list[ViewRecipe]:
    """BYOL / MoCo v3: asymmetric; the first view always blurred, the second rarely, and solarised."""
    jitter = ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, probability=0.8)
    first = ViewRecipe(size=size, color_jitter=jitter, blur=Blur(probability=1.0) if blur else None)
    second = first.model_copy(update={"blur": Blur(probability=0.1) if blur else None, "solarize": 0.2})
    return [first, second]


def multicrop_views(size: int, local_size: int, local_views: int, blur: bool) -> list[ViewRecipe]:
    """Multi-crop (SwAV/DINO): two BYOL-style global views plus small local views."""
    first, second = (v.model_copy(update={"scale": (0.14, 1.0)}) for v in byol_views(size, blur))
    local = first.model_copy(
        update={"size": local_size, "scale": (0.05, 0.14), "blur": Blur(probability=0.5) if blur else None}
    )
    return [first, second] + [local] * local_views


class ViewPreset(Strict):
    preset: Literal["simclr", "byol", "multicrop"]
    size: int = Field(224, ge=8, le=4096)
    blur: bool = True
    local_size: int = Field(96, ge=8, le=4096)
    local_views: int = Field(6, ge=0, le=32)

    def recipes(self) -> list[ViewRecipe]:
        if self.preset == "simclr":
            return simclr_views(self.size, self.blur)
        if self.preset == "byol":
            return byol_views(self.size, self.blur)
        return multicrop_views(self.size, self.local_size, self.local_views, self.blur)


class DataConfig(Strict):
    views: ViewPreset | list[ViewRecipe] = ViewPreset(preset="simclr")
    batch_size: int = Field(256, ge=1)  # per rank
    num_threads: int = Field(4, ge=1)
    shuffle_buffer: int = Field(4096, ge=1)  # samples held by DALI's reader for shuffling
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    hw_decoder_load: float = Field(0.65, ge=0.0, le=1.0)  # share of JPEGs for the GPU's hardware decoder
    eval_size: int = Field(224, ge=8)  # evaluation: resize the shorter side to eval_resize, centre crop
    eval_resize: int = Field(256, ge=8)

    @field_validator("views")
    @classmethod
    def _some_views(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("at least one view is needed")
        return v

    @model_validator(mode="after")
    def _eval_crop_fits(self):
        if self.eval_size > self.eval_resize:
            raise ValueError(f"eval_size {self.eval_size} is larger than eval_resize {self.eval_resize}")
        return self

    def view_recipes(self) -> list[ViewRecipe]:
        return self.views.recipes() if isinstance(self.views, ViewPreset) else list(self.views)


def format_validation_error(error, prefix: str = "") -> str:
    """One line per problem, each naming the full key, e.g. `data.views.0.scale: ...`."""
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        got = f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and "input" in err else ""
        lines.append(f"{key}: {err['msg']}{got}")
    return "; ".join(lines)
