"""What every method shares: the online backbone and projector, and the hooks the training loop calls."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.backbones import create_backbone, is_vit
from models.heads import mlp_head
from pipeline.config import Config


class Method(nn.Module):
    """A contrastive method. `forward(views)` returns (loss, parts) where `parts` are detached scalars to
    log; `after_step(progress)` runs after each optimizer step. No loop, no I/O, no engine calls here."""

    zero3: bool = True  # can the method run with parameters partitioned (ZeRO-3)?
    self_trained: tuple[str, ...] = ()  # submodules the method updates itself (e.g. MetAug's generators)

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        size = max(r.size for r in cfg.data.view_recipes()[:2])
        self.backbone = create_backbone(cfg.model, img_size=size)
        self.projector = mlp_head(self.backbone.num_features, cfg.model.projector)
        self.temperature = cfg.method.temperature

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, before any process group forms, what this method cannot run."""
        if cfg.engine.zero_stage == 3 and not cls.zero3:
            raise ValueError(f"method.name={cfg.method.name} cannot run under engine.zero_stage=3 (use 0-2)")
        if cfg.engine.zero_stage == 3 and cfg.model.compile:
            raise ValueError("model.compile cannot run under engine.zero_stage=3: its parameter gathering breaks the graphs")

    def prepare_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """channels_last for CNNs: their convolutions run faster in NHWC."""
        if self.cfg.model.channels_last and not is_vit(self.cfg.model.backbone):
            return [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def online(self) -> nn.Sequential:
        """Backbone then projector, as one module (a view: not registered a second time)."""
        return nn.Sequential(self.backbone, self.projector)

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """Before the first step of each epoch (not when resuming mid-epoch); returns scalars to log."""
        return {}

    def after_step(self, progress: float) -> dict[str, float]:
        """After each optimizer step; `progress` runs from 0 to 1 over training. Returns scalars to log."""
        return {}


def cosine_momentum(base: float, progress: float) -> float:
    """MoCo v3 / BYOL: from `base` at the start to 1 at the end of training."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0
