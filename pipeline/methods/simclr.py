"""SimCLR: NT-Xent over both views of the global batch (2N - 2 negatives per anchor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import gather_with_grad, rank
from pipeline.losses import info_nce
from pipeline.methods.base import Method


class SimCLR(Method):
    def forward(self, views):
        x1, x2 = self.prepare_views(views)
        z = F.normalize(self.projector(self.backbone(torch.cat([x1, x2]))).float(), dim=1)
        z1, z2 = z.chunk(2)
        rows, offset = z1.shape[0], rank() * z1.shape[0]
        keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # [view-1 keys of all ranks; view-2 keys]
        n = keys.shape[0] // 2
        own = offset + torch.arange(rows, device=z.device)
        positives = torch.cat([own + n, own])  # a view-1 anchor's positive is its view-2 key and back
        selves = torch.cat([own, own + n])
        loss = info_nce(z, keys, self.temperature, targets=positives, mask_self=selves, impl=self.cfg.method.loss_impl)
        return loss, {"loss/nt_xent": loss.detach()}
