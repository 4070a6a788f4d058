"""Deep InfoMax (Hjelm et al., ICLR 2019; rdevon/DIM, scripts/deep_infomax.py), local-global form.

One view. The backbone's pooled features go through the projector to the global vector Y (64-d in DIM);
the feature map of `method.local_stage` gives M = H·W local features. Both are encoded by critics
(`EncoderCritic`) and scored by dot product; `pipeline.losses.dim.dim_loss` contrasts each image's global
against its own locals (positives) and every other image's locals of the global batch (negatives) with
the JSD, InfoNCE or DV estimator.

Optional prior matching (`prior_weight` > 0): a discriminator tells sigmoid(Y) from U(0, 1) samples, as
DIM's `PriorMatching` does with the GAN measure: the discriminator minimises its loss on a detached
sigmoid(Y); the encoder minimises `prior_weight` × the non-saturating generator loss −log σ(D(sigmoid(Y))),
evaluated through the discriminator with its parameters detached (`torch.func.functional_call`). Both
losses enter the one total, so the engine's one optimizer trains both and each set of parameters gets
the gradient of its own loss only. (A gradient-reversal layer would be simpler but gives the encoder the
saturating minimax gradient, which vanishes while the discriminator wins.) The detached parameters need
whole tensors, so prior matching refuses ZeRO-3.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from models.local_features import global_and_maps, map_rows, stage_channels, stage_count
from pipeline.config import MethodConfig
from pipeline.losses.dim import dim_loss
from pipeline.methods import register_method
from pipeline.methods.base import Method, Views


class DIMConfig(MethodConfig):
    estimator: Literal["jsd", "infonce", "dv"] = "jsd"  # jsd: the official default
    # timm stage (ResNet: 0 stem, 1-4 residual stages) or block (ViT) of the local map; negative counts from the
    # end. -2: a CIFAR ResNet-18's layer3, 8x8x256 at 32 px (DIM's own encoder: 8x8x128)
    local_stage: int = -2
    critic_units: int = Field(1024, ge=1)  # deep_infomax.py's mi_units
    prior_weight: float = Field(0.0, ge=0.0)  # 0: no prior matching
    prior_hidden: tuple[int, ...] = (1000, 200)  # the discriminator's hidden layers (PriorMatching's)
    loss_impl: Literal["auto", "reference", "chunked", "triton"] = "auto"  # infonce and dv


class EncoderCritic(nn.Module):
    """DIM's critic encoder on rows [N, C] -> [N, units] (a 1x1-conv net on maps is this on their locations):
    Linear-BatchNorm-ReLU-Linear plus a linear shortcut initialised near the identity (U(−0.01, 0.01) with
    ones on the overlapping diagonal), then LayerNorm when `layer_norm` (the locals' MI1x1ConvNet; the
    global's MIFCNet has none and a shortcut bias)."""

    def __init__(self, in_dim: int, units: int, layer_norm: bool):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(in_dim, units, bias=False), nn.BatchNorm1d(units), nn.ReLU(inplace=True),
                                   nn.Linear(units, units))
        self.shortcut = nn.Linear(in_dim, units, bias=not layer_norm)
        self.norm = nn.LayerNorm(units) if layer_norm else nn.Identity()
        with torch.no_grad():
            self.shortcut.weight.uniform_(-0.01, 0.01).fill_diagonal_(1.0)

    def forward(self, x):
        return self.norm(self.block(x) + self.shortcut(x))


def discriminator(in_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
    dims = [in_dim, *hidden]
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(dims[-1], 1))


@register_method("dim")
class DIM(Method):
    Config = DIMConfig
    views = Views(global_views=1)

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        count = stage_count(self.backbone)
        if not -count <= m.local_stage < count:
            raise ValueError(f"method.local_stage={m.local_stage}: {cfg.model.backbone} has stages 0..{count - 1} (or -{count}..-1)")
        self.local_stage = m.local_stage % count
        (local_dim,) = stage_channels(self.backbone, [self.local_stage])
        global_dim = cfg.model.projector.out_dim
        self.local_critic = EncoderCritic(local_dim, m.critic_units, layer_norm=True)
        self.global_critic = EncoderCritic(global_dim, m.critic_units, layer_norm=False)
        self.discriminator = discriminator(global_dim, m.prior_hidden) if m.prior_weight > 0 else None

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        super().check(cfg, world_size)
        if cfg.method.prior_weight > 0 and cfg.engine.zero_stage == 3:
            raise ValueError("method.prior_weight > 0 cannot run under engine.zero_stage=3: the generator loss reads "
                             "the discriminator's whole parameters (use 0-2)")
        if cfg.data.batch_size * world_size < 2:
            raise ValueError("method.name=dim needs two images or more in the global batch: other images give the negatives")

    def forward(self, views):
        (x,) = self.prepare_views(views)
        pooled, (local_map,) = global_and_maps(self.backbone, x, [self.local_stage])
        y = self.projector(pooled)
        locals_ = map_rows(local_map)  # [B, M, C]
        encoded = self.local_critic(locals_.flatten(0, 1)).unflatten(0, locals_.shape[:2])
        m = self.cfg.method
        loss = dim_loss(self.global_critic(y).float(), encoded.float(), m.estimator, m.loss_impl)
        parts = {f"loss/dim_{m.estimator}": loss.detach()}
        if self.discriminator is not None:
            discriminator_loss, encoder_loss = self.prior_matching(torch.sigmoid(y.float()))
            parts |= {"loss/prior_discriminator": discriminator_loss.detach(), "loss/prior_encoder": encoder_loss.detach()}
            loss = loss + discriminator_loss + m.prior_weight * encoder_loss
        return loss, parts

    def prior_matching(self, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the discriminator's GAN loss, prior samples real and sigmoid(Y) fake; the encoder's non-saturating
        generator loss). Neither reaches the other's parameters."""
        real = torch.rand_like(fake)
        scores = self.discriminator(torch.cat([real, fake.detach()])).float()
        real_score, fake_score = scores.split(fake.shape[0])
        discriminator_loss = F.softplus(-real_score).mean() + F.softplus(fake_score).mean()
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        encoder_loss = F.softplus(-torch.func.functional_call(self.discriminator, frozen, (fake,)).float()).mean()
        return discriminator_loss, encoder_loss
