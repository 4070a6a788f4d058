"""SDCLR (self-damaging contrastive learning): NT-Xent between the dense encoder on one view and a pruned
copy of it on the other. The pruned branch shares the weights through a global magnitude mask (recomputed
every `refresh_epochs` epochs) and has its own BatchNorm layers; both branches train the shared weights.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from models.pruning import PrunedBranch
from pipeline.config import Strict
from pipeline.methods import register_method
from pipeline.methods.base import Views
from pipeline.methods.simclr import SimCLR, SimCLRConfig


class SDCLRSettings(Strict):
    prune_ratio: float = Field(0.9, gt=0.0, lt=1.0)
    refresh_epochs: int = Field(1, ge=1)  # recompute the mask every N epochs


class SDCLRConfig(SimCLRConfig):
    sdclr: SDCLRSettings = SDCLRSettings()


@register_method("sdclr")
class SDCLR(SimCLR):
    Config = SDCLRConfig
    views = Views(global_views=2)  # one view per branch
    zero3 = False  # masks need whole weights on every rank

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pruned_backbone = PrunedBranch(self.backbone, cfg.method.sdclr.prune_ratio)
        self.pruned_projector = PrunedBranch(self.projector, 0.0)  # unpruned, but its own BatchNorm

    def forward(self, views):
        x1, x2 = self.prepare_views(views)
        dense = self.embed(x1)
        pruned = F.normalize(self.pruned_projector(self.pruned_backbone(x2)).float(), dim=1)
        loss = self.nt_xent(dense, pruned)
        return loss, {"loss/nt_xent": loss.detach()}

    def start_epoch(self, epoch: int) -> dict[str, float]:
        values = super().start_epoch(epoch)
        if epoch % self.cfg.method.sdclr.refresh_epochs:
            return values
        return {**values, "sdclr/mask_threshold": float(self.pruned_backbone.refresh())}
