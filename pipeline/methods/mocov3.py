"""MoCo v3: symmetric InfoNCE between online predictions and momentum keys of the other view, keys
gathered over ranks; momentum on a cosine schedule to 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.heads import mlp_head
from models.momentum import MomentumEncoder
from pipeline.distributed import gather, rank
from pipeline.methods.base import Method, cosine_momentum


class MoCoV3(Method):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.predictor = mlp_head(cfg.model.projector.out_dim, cfg.model.predictor)
        self.momentum_encoder = MomentumEncoder(self.online())
        self.momentum = cfg.method.momentum

    def contrast(self, q, k):
        """2τ · InfoNCE of local queries against the gathered keys; positives at this rank's offset."""
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        targets = rank() * q.shape[0] + torch.arange(q.shape[0], device=q.device)
        loss = self.contrast_keys(q, gather(k), self.temperature, targets=targets, impl=self.cfg.method.loss_impl)
        return 2 * self.temperature * loss

    def query(self, x):
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def key(self, x):
        return self.momentum_encoder(x)

    def forward(self, views):
        x1, x2 = self.prepare_views(views)
        q1, q2, k1, k2 = self.query(x1), self.query(x2), self.key(x1), self.key(x2)
        loss_12, loss_21 = self.contrast(q1, k2), self.contrast(q2, k1)
        loss = loss_12 + loss_21
        return loss, {"loss/q1k2": loss_12.detach(), "loss/q2k1": loss_21.detach()}

    def after_step(self, progress):
        if self.cfg.method.momentum_schedule == "cosine":
            self.momentum = cosine_momentum(self.cfg.method.momentum, progress)
        self.momentum_encoder.update(self.online(), self.momentum)
        return {"momentum": self.momentum}
