"""Feature-space augmentation of InfoNCE keys (FeatMatch's AugF in contrastive pretraining), a component an
InfoNCE method composes: prototype attention over k-means prototypes of a memory of recent gathered keys
gives each key an augmented twin, a second positive of weight `weight`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from models.kmeans import kmeans
from models.prototype_attention import PrototypeAttention
from pipeline.config import Strict
from pipeline.distributed import FeatureQueue
from pipeline.losses import info_nce


class FeatureAugConfig(Strict):
    prototypes: int = Field(64, ge=1)  # k of the k-means
    heads: int = Field(4, ge=1)  # attention heads of the prototype attention
    memory: int = Field(4096, ge=1)  # rows of the feature memory (a FIFO ring of gathered keys)
    weight: float = Field(0.5, ge=0.0, le=1.0)  # target share of the augmented positive (the key keeps 1 - weight)
    refresh_epochs: int = Field(1, ge=1)  # recompute the prototypes every N epochs (in start_epoch)
    kmeans_iters: int = Field(20, ge=0)

    @model_validator(mode="after")
    def _memory_holds_prototypes(self):
        if self.memory < self.prototypes:
            raise ValueError(f"memory={self.memory} must be >= prototypes={self.prototypes} (k-means needs a row per prototype)")
        return self

    def check(self, global_batch: int, world_size: int, batch_size: int) -> None:
        if self.memory < 2 * global_batch:
            raise ValueError(
                f"method.feature_aug.memory={self.memory} cannot hold one step's keys: at least 2 x the global batch "
                f"of {global_batch} (data.batch_size={batch_size} x {world_size} ranks)"
            )


class KeyContrast(nn.Module):
    """InfoNCE of queries against keys, through the feature augmentation when `cfg` is given."""

    def __init__(self, cfg: FeatureAugConfig | None, dim: int, seed: int):
        super().__init__()
        self.cfg = cfg
        if cfg is None:
            return
        self.attention = PrototypeAttention(dim, cfg.heads, final_relu=False, zero_init=True)
        self.memory = FeatureQueue(cfg.memory, dim)
        # Initial memory and prototypes from a fixed generator: the same on every rank, whatever the global
        # RNG; the first refresh (start_epoch(0)) replaces the prototypes by k-means over the memory.
        g = torch.Generator().manual_seed(seed)
        self.memory.keys.copy_(F.normalize(torch.randn(cfg.memory, dim, generator=g), dim=1))
        self.register_buffer("prototypes", F.normalize(torch.randn(cfg.prototypes, dim, generator=g), dim=1))
        self.register_buffer("weights", torch.tensor([1.0 - cfg.weight, cfg.weight]))  # on the device: no host copy per step
        self.seed = seed

    def start_epoch(self, epoch: int) -> dict[str, float]:
        if self.cfg is not None and epoch % self.cfg.refresh_epochs == 0:
            self.refresh_prototypes(epoch)
        return {}

    @torch.no_grad()
    def refresh_prototypes(self, epoch: int) -> None:
        """Spherical k-means over the feature memory (identical on every rank), seeded by the seed and the
        epoch, so every rank computes the same prototypes without a collective."""
        centres, _ = kmeans(self.memory.keys, self.cfg.prototypes, iters=self.cfg.kmeans_iters,
                            seed=self.seed * 100003 + epoch, metric="cosine")
        self.prototypes.copy_(centres)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, temperature: float, targets: torch.Tensor | None = None,
                *, push: torch.Tensor | None = None, **info_nce_kwargs) -> torch.Tensor:
        """InfoNCE of queries q [B, D] against keys [N, D] (unit rows).

        Without the augmentation: exactly `info_nce(q, keys, temperature, targets=targets, **kwargs)`.
        With it: the keys' augmented twins a_j = normalize(AugF(k_j, prototypes)) join as columns N..2N-1;
        row i has two positives, its key t_i (target share 1 - weight) and a_{t_i} (weight); a masked key
        (mask_self) has its twin masked too. Then `push` (default `keys`: gathered keys, the same on every
        rank) goes into the feature memory, detached. targets: None (key i) or an index per row [B].
        """
        if self.cfg is None:
            return info_nce(q, keys, temperature, targets=targets, **info_nce_kwargs)
        rows, n = q.shape[0], keys.shape[0]
        if targets is None:
            targets = torch.arange(rows, device=q.device)
        if targets.ndim != 1:
            raise ValueError(f"the feature augmentation takes one target key per row [B], got {tuple(targets.shape)}")
        with torch.autocast(keys.device.type, enabled=False):  # a small module: fp32, like the keys
            twins = F.normalize(self.attention(keys.float(), self.prototypes.float()), dim=1).to(keys.dtype)
        positives = torch.stack([targets, targets + n], 1)
        weights = self.weights.to(q.device).expand(rows, 2)
        mask_self = info_nce_kwargs.pop("mask_self", False)
        if mask_self is not False:
            own = torch.arange(rows, device=q.device) if mask_self is True else mask_self
            mask_self = torch.stack([own, own + n], 1)
        loss = info_nce(q, torch.cat([keys, twins]), temperature, targets=positives, target_weights=weights,
                        mask_self=mask_self, **info_nce_kwargs)
        self.memory.push((keys if push is None else push).detach().float())
        return loss
