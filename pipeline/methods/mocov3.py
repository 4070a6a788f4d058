"""MoCo v3: symmetric InfoNCE between online predictions and momentum keys of the other view, keys
gathered over ranks; momentum on a cosine schedule to 1. With local views (multi-crop), each local view's
prediction is contrasted against the momentum keys of both global views; the loss is twice the mean over
all (query, key view) pairs, which is the symmetric loss without local views."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from models.heads import mlp_head
from models.momentum import MomentumEncoder
from pipeline.distributed import gather, rank
from pipeline.methods import register_method
from pipeline.methods.base import InfoNCEConfig, InfoNCEMethod, Views, cosine_momentum


class MoCoV3Config(InfoNCEConfig):
    momentum: float = Field(0.99, ge=0.0, le=1.0)  # base EMA momentum, on a cosine schedule to 1
    momentum_schedule: Literal["constant", "cosine"] = "cosine"


@register_method("mocov3")
class MoCoV3(InfoNCEMethod):
    Config = MoCoV3Config
    views = Views(global_views=2, local_views=True)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.predictor = mlp_head(cfg.model.projector.out_dim, cfg.model.predictor)
        self.momentum_encoder = MomentumEncoder(self.online())
        self.momentum = cfg.method.momentum

    @classmethod
    def check(cls, cfg, world_size):
        super().check(cfg, world_size)
        if cfg.model.predictor is None:
            raise ValueError(f"method.name={cfg.method.name} needs model.predictor")

    def online(self) -> torch.nn.Sequential:
        """Backbone then projector, as one module (a view: not registered a second time)."""
        return torch.nn.Sequential(self.backbone, self.projector)

    def contrast(self, q, k):
        """2τ · InfoNCE of local queries against the gathered keys; query row r's positive is key r mod B
        of this rank (several local views of an image share its key)."""
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        targets = rank() * k.shape[0] + torch.arange(q.shape[0], device=q.device) % k.shape[0]
        loss = self.contrast_keys(q, gather(k), self.temperature, targets=targets, impl=self.cfg.method.loss_impl)
        return 2 * self.temperature * loss

    def query(self, x):
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def key(self, x):
        return self.momentum_encoder(x)

    def forward(self, views):
        loss, parts, _ = self.clean_loss(*self.prepare_views(views))
        return loss, parts

    def clean_loss(self, x1, x2, *local):
        """(loss, parts to log, (k1, k2)) of the symmetric contrast, local views included."""
        q1, q2, k1, k2 = self.query(x1), self.query(x2), self.key(x1), self.key(x2)
        loss_12, loss_21 = self.contrast(q1, k2), self.contrast(q2, k1)
        parts = {"loss/q1k2": loss_12.detach(), "loss/q2k1": loss_21.detach()}
        loss = loss_12 + loss_21
        if local:
            ql = torch.cat(self.encode_by_size(self.query, local))
            local_loss = self.contrast(ql, k1) + self.contrast(ql, k2)
            loss = 2 * (loss + len(local) * local_loss) / (2 + 2 * len(local))
            parts["loss/local"] = local_loss.detach()
        return loss, parts, (k1, k2)

    def after_step(self, progress):
        if self.cfg.method.momentum_schedule == "cosine":
            self.momentum = cosine_momentum(self.cfg.method.momentum, progress)
        self.momentum_encoder.update(self.online(), self.momentum)
        return {"momentum": self.momentum}
