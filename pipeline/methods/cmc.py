"""CMC (Tian, Krishnan & Isola, "Contrastive Multiview Coding"; HobbitLong/CMC): one crop of an image in
CIE Lab, split into its L channel and its ab channels, each through an encoder of its own (a timm backbone
with `in_chans` 1 or 2, then the projector, L2-normalised). The loss is cross-view InfoNCE in both
directions, L queries against the ab keys and ab queries against the L keys, summed; the keys are those of
the global batch (gathered with their gradient), the softmax form CMC's README recommends over its code's
binary NCE. CMC's memory bank of past keys is not built here (it needs each sample's dataset index in the
forward pass). Evaluation uses both encoders' features, concatenated [L | ab], as CMC reports them."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from timm.optim import param_groups_weight_decay

from models.backbones import create_backbone
from models.colour import rgb_to_lab, scale_lab
from models.heads import mlp_head
from pipeline.config import MethodConfig
from pipeline.losses import gathered_info_nce
from pipeline.methods import register_method
from pipeline.methods.base import Method, Views


def lab_views(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sRGB [B, 3, H, W] in [0, 1] -> (L [B, 1, H, W], ab [B, 2, H, W]), each channel scaled to [-1, 1]."""
    lab = scale_lab(rgb_to_lab(rgb)).to(rgb.dtype)
    return lab[:, :1], lab[:, 1:]


class LabFeatures(nn.Module):
    """Evaluation features of CMC: sRGB images -> Lab -> [L encoder's features | ab encoder's features]."""

    def __init__(self, l_encoder: nn.Module, ab_encoder: nn.Module):
        super().__init__()
        self.l_encoder, self.ab_encoder = l_encoder, ab_encoder

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        l, ab = lab_views(rgb)
        return torch.cat([self.l_encoder(l), self.ab_encoder(ab)], dim=1)


class CMCConfig(MethodConfig):
    temperature: float = Field(0.07, gt=0.0)
    loss_impl: Literal["auto", "reference", "chunked", "triton"] = "auto"


@register_method("cmc")
class CMC(Method):
    Config = CMCConfig
    views = Views(global_views=1, raw_rgb=True)

    def __init__(self, cfg):
        super().__init__(cfg)
        # The base class's 3-channel backbone and its projector give way to one encoder per colour view.
        del self.backbone, self.projector
        size = cfg.data.view_recipes()[0].size
        self.l_backbone = create_backbone(cfg.model, size, in_chans=1)
        self.ab_backbone = create_backbone(cfg.model, size, in_chans=2)
        self.l_projector = mlp_head(self.l_backbone.num_features, cfg.model.projector)
        self.ab_projector = mlp_head(self.ab_backbone.num_features, cfg.model.projector)
        self.temperature = cfg.method.temperature

    def param_groups(self, weight_decay):
        if not self.cfg.optim.no_decay_norm_bias:
            return super().param_groups(weight_decay)
        tokens = {f"{prefix}.{name}" for prefix in ("l_backbone", "ab_backbone")
                  for name in getattr(getattr(self, prefix), "no_weight_decay", set)()}
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=tokens)

    def encoders(self):
        return {"l": self.l_backbone, "ab": self.ab_backbone}

    def features(self):
        return LabFeatures(self.l_backbone, self.ab_backbone)

    def embed(self, l: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings (fp32) of the L and ab views: [B, out_dim] each."""
        z_l = self.l_projector(self.l_backbone(l))
        z_ab = self.ab_projector(self.ab_backbone(ab))
        return F.normalize(z_l.float(), dim=1), F.normalize(z_ab.float(), dim=1)

    def forward(self, views):
        l, ab = self.prepare_views(list(lab_views(views[0])))
        z_l, z_ab = self.embed(l, ab)
        impl = self.cfg.method.loss_impl
        # Row i's positive is the other view of its own image: key rank * B + i of the gathered keys.
        l_to_ab = gathered_info_nce(z_l, z_ab, self.temperature, impl=impl)
        ab_to_l = gathered_info_nce(z_ab, z_l, self.temperature, impl=impl)
        return l_to_ab + ab_to_l, {"loss/l_to_ab": l_to_ab.detach(), "loss/ab_to_l": ab_to_l.detach()}
