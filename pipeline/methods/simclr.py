"""SimCLR: NT-Xent over both views of the global batch (2N - 2 negatives per anchor). With local views
(multi-crop), each local view is a further query whose positives are its image's two global views, against
the same gathered global keys; the loss is the mean over all queries."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.distributed import gather_with_grad, rank
from pipeline.methods import register_method
from pipeline.methods.base import InfoNCEConfig, InfoNCEMethod, Views


class SimCLRConfig(InfoNCEConfig):
    """SimCLR has the InfoNCE settings only; SDMP's and SDCLR's configurations extend this class."""


@register_method("simclr", default=True)
class SimCLR(InfoNCEMethod):
    Config = SimCLRConfig
    views = Views(global_views=2, local_views=True)

    def embed(self, x):
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)

    def forward(self, views):
        z1, z2, *local = self.encode_by_size(self.embed, self.prepare_views(views))  # globals in one pass
        loss = self.nt_xent(z1, z2, local)
        return loss, {"loss/nt_xent": loss.detach()}

    def nt_xent(self, z1, z2, local=()):
        rows, offset = z1.shape[0], rank() * z1.shape[0]
        keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])  # [view-1 keys of all ranks; view-2 keys]
        n = keys.shape[0] // 2
        own = offset + torch.arange(rows, device=z1.device)
        positives = torch.cat([own + n, own])  # a view-1 anchor's positive is its view-2 key and back
        selves = torch.cat([own, own + n])
        impl = self.cfg.method.loss_impl
        loss = self.contrast_keys(torch.cat([z1, z2]), keys, self.temperature, targets=positives, mask_self=selves, impl=impl)
        if not local:
            return loss
        both = torch.stack([own, own + n], 1).repeat(len(local), 1)  # a local view's two global views
        local_loss = self.contrast_keys(torch.cat(local), keys, self.temperature, targets=both, impl=impl)
        return (2 * loss + len(local) * local_loss) / (2 + len(local))
