"""The method contract. A method declares what it needs and gives; the loop, checkpoints, evaluation and
export use only these declarations and know no method by name:

- `Config`: its own pydantic class for the recipe's `method:` section (registered with `register_method`);
- `views`: how many global views it takes, whether it takes local (multi-crop) views, and whether its
  forward takes each sample's dataset index;
- `check(cfg, world_size)`: its constraints, run before any process group forms;
- `param_groups(weight_decay)`: what the engine's optimizer trains;
- `encoders()`: the named backbones to export, and `features()`: what kNN and linear evaluation use;
- hooks `set_data_size` (the training set's size, before the engine or a checkpoint sees the module),
  `start_epoch`, `before_step`, `after_step`; `forward(views)` (`forward(views, indices=...)` when
  `views.indices`) returns (loss, parts to log);
- `preview(cfg, views)`: how the view preview shows its views (captioned columns of images).

Every method also gets the online backbone and projector built from `model:`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import Field
from timm.optim import param_groups_weight_decay

from models.backbones import create_backbone, is_vit
from models.heads import mlp_head
from pipeline.config import Config, MethodConfig
from pipeline.data.preview import Column, unnormalise
from pipeline.methods.feature_aug import FeatureAugConfig, KeyContrast


@dataclass(frozen=True)
class Views:
    """The views a method takes: `global_views` first (one size), then any number of smaller local views
    when `local_views` (multi-crop). `raw_rgb`: the views must be unnormalised sRGB in [0, 1] with their
    colours untouched (no jitter, grayscale or solarisation), for a method that changes colour space itself
    (CMC's Lab). `indices`: the loop passes each sample's index in the training set, [B] int64 on the
    device, as `forward(views, indices=...)` (a memory indexed by sample: CMC's memory bank)."""

    global_views: int = 2
    local_views: bool = False
    raw_rgb: bool = False
    indices: bool = False

    def check(self, cfg: Config) -> None:
        recipes = cfg.data.view_recipes()
        sizes = [r.size for r in recipes]
        name, n = cfg.method.name, self.global_views
        takes = f"{n} global view(s)" + (" and any number of local views" if self.local_views else "")
        if len(recipes) < n or (len(recipes) > n and not self.local_views):
            raise ValueError(f"method.name={name} takes {takes}; data.views gives {len(recipes)} (sizes {sizes})")
        if len(set(sizes[:n])) > 1:
            raise ValueError(f"method.name={name}: its {n} global views need one size; data.views gives sizes {sizes[:n]}")
        if self.raw_rgb:
            for i, r in enumerate(recipes):
                changed = {"mean": r.mean != (0.0, 0.0, 0.0), "std": r.std != (1.0, 1.0, 1.0), "grayscale": r.grayscale > 0,
                           "solarize": r.solarize > 0, "color_jitter": r.color_jitter is not None and r.color_jitter.probability > 0,
                           "rand_augment": r.rand_augment is not None}
                if any(changed.values()):
                    found = ", ".join(f"{k}={getattr(r, k)}" for k, v in changed.items() if v)
                    raise ValueError(f"method.name={name} takes unnormalised sRGB views with their colours untouched "
                                     f"(mean [0, 0, 0], std [1, 1, 1], no color_jitter, grayscale, solarize or rand_augment); "
                                     f"data.views[{i}] has {found}")


class Method(nn.Module):
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    views: ClassVar[Views] = Views()
    zero3: ClassVar[bool] = True  # can it run with parameters partitioned (ZeRO-3)?

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        sizes = {r.size for r in cfg.data.view_recipes()}
        self.backbone = create_backbone(cfg.model, img_size=max(sizes), dynamic_size=len(sizes) > 1)
        self.projector = mlp_head(self.backbone.num_features, cfg.model.projector)

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        """Refuse, before any process group forms, what this method cannot run. Subclasses extend it."""
        cls.views.check(cfg)
        if cfg.engine.zero_stage == 3 and not cls.zero3:
            raise ValueError(f"method.name={cfg.method.name} cannot run under engine.zero_stage=3 (use 0-2)")
        if cfg.engine.zero_stage == 3 and cfg.model.compile:
            raise ValueError("model.compile cannot run under engine.zero_stage=3: its parameter gathering breaks the graphs")

    @classmethod
    def preview(cls, cfg: Config, views: list[torch.Tensor]) -> list[Column]:
        """What the view preview (launch/preview.py, TensorBoard's first step) shows of a batch's views, as
        a caption and images [B, 1 or 3, H, W] in [0, 1] per column: by default each view with its
        normalisation undone. A method that changes its views on the device adds what its encoders see."""
        n = cls.views.global_views
        return [(f"view {i + 1} ({'global' if i < n else 'local'} {r.size}px)", unnormalise(v, r))
                for i, (v, r) in enumerate(zip(views, cfg.data.view_recipes()))]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """What the engine's optimizer trains: every parameter that requires a gradient, in timm's groups
        (no weight decay on norms, biases, ViT tokens) when `optim.no_decay_norm_bias`, else in one group
        that all decays (moco-v3's AdamW, MoCo v2's and SDCLR's SGD)."""
        if not self.cfg.optim.no_decay_norm_bias:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": weight_decay}]
        tokens = {f"backbone.{name}" for name in getattr(self.backbone, "no_weight_decay", set)()}
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=tokens)

    def encoders(self) -> dict[str, nn.Module]:
        """The backbones to export, by name (each was built by `create_backbone`, so it knows its timm spec)."""
        return {"backbone": self.backbone}

    def features(self) -> nn.Module:
        """Images [B, 3, H, W] -> the features kNN and linear evaluation use [B, D]."""
        return self.backbone

    def prepare_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """channels_last for CNNs: their convolutions run faster in NHWC."""
        if self.cfg.model.channels_last and not is_vit(self.cfg.model.backbone):
            return [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    @staticmethod
    def encode_by_size(encoder, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """`encoder` on the views, one pass per run of views of the same size (BatchNorm statistics over
        each pass), outputs in view order."""
        out, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            group = views[start:end]
            out += list(encoder(torch.cat(group)).split([v.shape[0] for v in group]))
            start = end
        return out

    def set_data_size(self, size: int) -> None:
        """The training set's sample count (its indices run from 0 to size - 1), given once by the loop
        after construction and before the engine, a checkpoint or the fingerprint sees the module: buffers
        indexed by sample are made here, so they are saved and restored with the module's state."""

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """Before the first step of each epoch (not when resuming mid-epoch); returns scalars to log. Runs
        the hook of every component (direct submodule) that has one."""
        values: dict[str, float] = {}
        for child in self.children():
            if not isinstance(child, Method) and callable(getattr(child, "start_epoch", None)):
                values.update(child.start_epoch(epoch))
        return values

    def before_step(self, step: int) -> dict[str, float]:
        """Before optimizer step `step` (0-based) and its forward passes; returns scalars to log."""
        return {}

    def after_step(self, progress: float) -> dict[str, float]:
        """After each optimizer step; `progress` runs from 0 to 1 over training. Returns scalars to log."""
        return {}


class InfoNCEConfig(MethodConfig):
    """Settings shared by the methods whose loss is InfoNCE over keys (`KeyContrast`)."""

    temperature: float = Field(0.2, gt=0.0)
    loss_impl: Literal["auto", "reference", "chunked", "triton"] = "auto"
    feature_aug: FeatureAugConfig | None = None  # prototype attention twins of the keys as second positives


class InfoNCEMethod(Method):
    """A method whose keys are contrasted through `self.contrast_keys` (with the optional feature augmentation)."""

    Config = InfoNCEConfig

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.temperature = cfg.method.temperature
        self.contrast_keys = KeyContrast(cfg.method.feature_aug, cfg.model.projector.out_dim, cfg.train.seed)

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        super().check(cfg, world_size)
        aug = cfg.method.feature_aug
        if aug is not None:
            aug.check(cfg.data.batch_size * world_size, world_size, cfg.data.batch_size)
            if len(cfg.data.view_recipes()) > cls.views.global_views:
                raise ValueError("method.feature_aug cannot run with local views (multi-crop): each local query has two positives")


def cosine_momentum(base: float, progress: float) -> float:
    """MoCo v3 / BYOL: from `base` at the start to 1 at the end of training."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0
