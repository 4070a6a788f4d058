"""SimCLR: NT-Xent over both views of the global batch (2N - 2 negatives per anchor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import gather_with_grad, rank
from pipeline.methods.base import Method


class SimCLR(Method):
    def embed(self, x):
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)

    def forward(self, views):
        x1, x2 = self.prepare_views(views)
        z1, z2 = self.embed(torch.cat([x1, x2])).chunk(2)  # one pass: BatchNorm statistics over both views
        loss = self.nt_xent(z1, z2)
        return loss, {"loss/nt_xent": loss.detach()}

    def nt_xent(self, z1, z2):
        rows, offset = z1.shape[0], rank() * z1.shape[0]
        keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # [view-1 keys of all ranks; view-2 keys]
        n = keys.shape[0] // 2
        own = offset + torch.arange(rows, device=z1.device)
        positives = torch.cat([own + n, own])  # a view-1 anchor's positive is its view-2 key and back
        selves = torch.cat([own, own + n])
        return self.contrast_keys(torch.cat([z1, z2]), keys, self.temperature, targets=positives, mask_self=selves,
                                  impl=self.cfg.method.loss_impl)
