"""What every method shares: the online backbone and projector, the hooks the training loop calls, and the
optional feature-space augmentation of InfoNCE keys (`method.feature_aug`, `contrast_keys`)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbones import create_backbone, is_vit
from models.heads import mlp_head
from models.prototypes import PrototypeAttention, kmeans
from pipeline.config import Config
from pipeline.distributed import FeatureQueue
from pipeline.losses import info_nce


class Method(nn.Module):
    """A contrastive method. `forward(views)` returns (loss, parts) where `parts` are detached scalars to
    log; `after_step(progress)` runs after each optimizer step. No loop, no I/O, no engine calls here."""

    zero3: bool = True  # can the method run with parameters partitioned (ZeRO-3)?
    self_trained: tuple[str, ...] = ()  # submodules the method updates itself (e.g. MetAug's generators)
    feature_aug_support: bool = True  # does its loss go through `contrast_keys` (method.feature_aug)?

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        size = max(r.size for r in cfg.data.view_recipes()[:2])
        self.backbone = create_backbone(cfg.model, img_size=size)
        self.projector = mlp_head(self.backbone.num_features, cfg.model.projector)
        self.temperature = cfg.method.temperature
        self.feature_aug = None
        aug = cfg.method.feature_aug
        if aug is not None:
            _check_feature_aug(type(self), cfg)
            dim = cfg.model.projector.out_dim
            self.feature_aug = PrototypeAttention(dim, aug.heads, final_relu=False, zero_init=True)
            self.feature_memory = FeatureQueue(aug.memory, dim)
            # Initial memory and prototypes from a fixed generator: the same on every rank, whatever the
            # global RNG; the first refresh (start_epoch(0)) replaces the prototypes by k-means over it.
            g = torch.Generator().manual_seed(cfg.train.seed)
            self.feature_memory.keys.copy_(F.normalize(torch.randn(aug.memory, dim, generator=g), dim=1))
            self.register_buffer("prototypes", F.normalize(torch.randn(aug.prototypes, dim, generator=g), dim=1))

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, before any process group forms, what this method cannot run."""
        if cfg.engine.zero_stage == 3 and not cls.zero3:
            raise ValueError(f"method.name={cfg.method.name} cannot run under engine.zero_stage=3 (use 0-2)")
        if cfg.engine.zero_stage == 3 and cfg.model.compile:
            raise ValueError("model.compile cannot run under engine.zero_stage=3: its parameter gathering breaks the graphs")
        _check_feature_aug(cls, cfg)

    def prepare_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """channels_last for CNNs: their convolutions run faster in NHWC."""
        if self.cfg.model.channels_last and not is_vit(self.cfg.model.backbone):
            return [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def online(self) -> nn.Sequential:
        """Backbone then projector, as one module (a view: not registered a second time)."""
        return nn.Sequential(self.backbone, self.projector)

    def start_epoch(self, epoch: int) -> dict[str, float]:
        """Before the first step of each epoch (not when resuming mid-epoch); returns scalars to log.
        Subclasses that override it call it too (feature_aug's prototypes are refreshed here)."""
        aug = self.cfg.method.feature_aug
        if aug is not None and epoch % aug.refresh_epochs == 0:
            self.refresh_prototypes(epoch)
        return {}

    @torch.no_grad()
    def refresh_prototypes(self, epoch: int) -> None:
        """Spherical k-means over the feature memory (identical on every rank), seeded by train.seed and
        the epoch, so every rank computes the same prototypes without a collective."""
        aug = self.cfg.method.feature_aug
        centres, _ = kmeans(self.feature_memory.keys, aug.prototypes, iters=aug.kmeans_iters,
                            seed=self.cfg.train.seed * 100003 + epoch, metric="cosine")
        self.prototypes.copy_(centres)

    def contrast_keys(self, q: torch.Tensor, keys: torch.Tensor, temperature: float, targets: torch.Tensor | None = None,
                      *, push: torch.Tensor | None = None, **info_nce_kwargs) -> torch.Tensor:
        """InfoNCE of queries q [B, D] against keys [N, D] (unit rows), through the feature augmentation.

        Without method.feature_aug: exactly `info_nce(q, keys, temperature, targets=targets, **kwargs)`.
        With it: the keys' augmented twins a_j = normalize(AugF(k_j, prototypes)) join as columns N..2N-1;
        row i has two positives, its key t_i (target share 1 - weight) and a_{t_i} (weight); a masked key
        (mask_self) has its twin masked too. Then `push` (default `keys`: gathered keys, the same on every
        rank) goes into the feature memory, detached. targets: None (key i) or an index per row [B].
        """
        if self.feature_aug is None:
            return info_nce(q, keys, temperature, targets=targets, **info_nce_kwargs)
        aug = self.cfg.method.feature_aug
        rows, n = q.shape[0], keys.shape[0]
        if targets is None:
            targets = torch.arange(rows, device=q.device)
        if targets.ndim != 1:
            raise ValueError(f"contrast_keys takes one target key per row [B], got {tuple(targets.shape)}")
        with torch.autocast(keys.device.type, enabled=False):  # a small module: fp32, like the keys
            twins = F.normalize(self.feature_aug(keys.float(), self.prototypes.float()), dim=1).to(keys.dtype)
        positives = torch.stack([targets, targets + n], 1)
        weights = torch.tensor([1.0 - aug.weight, aug.weight], device=q.device).expand(rows, 2)
        mask_self = info_nce_kwargs.pop("mask_self", False)
        if mask_self is not False:
            own = torch.arange(rows, device=q.device) if mask_self is True else mask_self
            mask_self = torch.stack([own, own + n], 1)
        loss = info_nce(q, torch.cat([keys, twins]), temperature, targets=positives, target_weights=weights,
                        mask_self=mask_self, **info_nce_kwargs)
        self.feature_memory.push((keys if push is None else push).detach().float())
        return loss

    def after_step(self, progress: float) -> dict[str, float]:
        """After each optimizer step; `progress` runs from 0 to 1 over training. Returns scalars to log."""
        return {}


def _check_feature_aug(cls: type[Method], cfg: Config) -> None:
    if cfg.method.feature_aug is not None and not cls.feature_aug_support:
        raise ValueError(f"method.feature_aug cannot run with method.name={cfg.method.name}: its loss does not go "
                         "through InfoNCE (use simclr, mocov2, mocov3, sdmp_mocov3, sdmp_simclr or sdclr)")


def cosine_momentum(base: float, progress: float) -> float:
    """MoCo v3 / BYOL: from `base` at the start to 1 at the end of training."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0
