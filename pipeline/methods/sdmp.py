"""SDMP (A Simple Data Mixing Prior) on MoCo v3 and on SimCLR.

Image i of the local batch is mixed with its partner B-1-i (the same λ_i for both views). On top of the
base loss on clean views, the mixed view-1 query of image i is contrasted against
- the clean view-2 keys, with soft targets λ_i on i and 1-λ_i on its partner, and
- the mixed view-2 keys, with targets 1/(1+c) on i and c/(1+c) on its partner, where
  c = min(λ_i, 1-λ_p) + min(1-λ_i, λ_p) is the content query i shares with the partner's mixed key,
both over keys gathered from all ranks (targets by global index). total = base + w·(both).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pipeline.config import Strict
from pipeline.data.mixing import METHODS, global_partner, mix, partner
from pipeline.distributed import gather, gather_with_grad, rank
from pipeline.losses import info_nce
from pipeline.methods import register_method
from pipeline.methods.mocov3 import MoCoV3, MoCoV3Config
from pipeline.methods.simclr import SimCLR, SimCLRConfig


class SDMPSettings(Strict):
    weight: float = Field(0.5, ge=0.0)  # total = base + weight * (mixed-vs-clean + mixed-vs-mixed)
    alpha: float = Field(1.0, gt=0.0)  # lambda ~ Beta(alpha, alpha)
    mix: Literal["random", "mixup", "cutmix", "resizemix"] = "random"  # one method per batch
    loss: Literal["soft_ce", "log_mixture"] = "soft_ce"  # the paper's pseudo-code, or the released code's form


class SDMPMoCoV3Config(MoCoV3Config):
    sdmp: SDMPSettings = SDMPSettings()


class SDMPSimCLRConfig(SimCLRConfig):
    sdmp: SDMPSettings = SDMPSettings()


def mixing_targets(lam_q: torch.Tensor, lam_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets [B, 2] global key indices of each image and its partner, weights against clean keys,
    weights against mixed keys). lam_q: λ of the mixed queries, lam_k: of the mixed keys."""
    rows, device = lam_q.shape[0], lam_q.device
    targets = torch.stack([rank() * rows + torch.arange(rows, device=device), global_partner(rows, rank(), device)], 1)
    clean = torch.stack([lam_q, 1 - lam_q], 1)
    lam_p = lam_k[partner(rows, device)]
    shared = torch.minimum(lam_q, 1 - lam_p) + torch.minimum(1 - lam_q, lam_p)
    mixed = torch.stack([torch.ones_like(shared), shared], 1) / (1 + shared)[:, None]
    return targets, clean, mixed


def soft_contrast(q, keys, targets, weights, temperature: float, form: str, impl: str) -> torch.Tensor:
    """`soft_ce`: Σ_p w_p·CE(p) (the paper's pseudo-code); `log_mixture`: -log Σ_p w_p·softmax_p (the
    released code). Both reduce to InfoNCE when one weight is 1."""
    if form == "soft_ce":
        return info_nce(q, keys, temperature, targets=targets, target_weights=weights, impl=impl)
    first = info_nce(q, keys, temperature, targets=targets[:, 0], reduction="none", impl=impl)  # lse - s_0
    logits = torch.einsum("bd,bpd->bp", q.float(), keys[targets].float()) / temperature
    lse = first + logits[:, 0]
    return (lse - torch.logsumexp(logits + weights.log(), 1)).mean()


class _Mixing:
    """The mixing state shared by both SDMP variants: a per-rank generator and the recipe."""

    def mixed_pair(self, x1, x2):
        """Both views mixed with the same partners, λ and method; the method drawn per batch on the host
        (a CPU draw: no wait for the GPU, and only the chosen method runs)."""
        sdmp: SDMPSettings = self.cfg.method.sdmp
        if getattr(self, "_mix_generator", None) is None or self._mix_generator.device != x1.device:
            seed = self.cfg.train.seed * 1009 + rank()
            self._mix_generator = torch.Generator(x1.device).manual_seed(seed)
            self._choice_generator = torch.Generator().manual_seed(seed)
        method = sdmp.mix
        if method == "random":
            method = METHODS[int(torch.randint(len(METHODS), (), generator=self._choice_generator))]
        m1, lam1 = mix(x1, method, sdmp.alpha, self._mix_generator)
        m2, lam2 = mix(x2, method, sdmp.alpha, self._mix_generator, lam=lam1)
        return m1, m2, *mixing_targets(lam1, lam2)

    def combine(self, base, against_clean, against_mixed, parts):
        weight = self.cfg.method.sdmp.weight
        loss = base + weight * (against_clean + against_mixed)
        parts.update({"loss/mixed_clean": against_clean.detach(), "loss/mixed_mixed": against_mixed.detach()})
        return loss, parts


@register_method("sdmp_mocov3")
class SDMPMoCoV3(_Mixing, MoCoV3):
    Config = SDMPMoCoV3Config

    def forward(self, views):
        x1, x2, *local = self.prepare_views(views)
        base, parts, (_, k2) = self.clean_loss(x1, x2, *local)
        m1, m2, targets, w_clean, w_mixed = self.mixed_pair(x1, x2)
        qm = torch.nn.functional.normalize(self.query(m1).float(), dim=1)
        keys = {name: torch.nn.functional.normalize(gather(k).float(), dim=1) for name, k in (("clean", k2), ("mixed", self.key(m2)))}
        form, impl, scale = self.cfg.method.sdmp.loss, self.cfg.method.loss_impl, 2 * self.temperature
        against_clean = scale * soft_contrast(qm, keys["clean"], targets, w_clean, self.temperature, form, impl)
        against_mixed = scale * soft_contrast(qm, keys["mixed"], targets, w_mixed, self.temperature, form, impl)
        return self.combine(base, against_clean, against_mixed, parts)


@register_method("sdmp_simclr")
class SDMPSimCLR(_Mixing, SimCLR):
    Config = SDMPSimCLRConfig

    def forward(self, views):
        x1, x2, *local = self.prepare_views(views)
        z1, z2, *local = self.encode_by_size(self.embed, [x1, x2, *local])
        base = self.nt_xent(z1, z2, local)
        m1, m2, targets, w_clean, w_mixed = self.mixed_pair(x1, x2)
        zm1, zm2 = self.embed(torch.cat([m1, m2])).chunk(2)
        form, impl = self.cfg.method.sdmp.loss, self.cfg.method.loss_impl
        against_clean = soft_contrast(zm1, gather_with_grad(z2), targets, w_clean, self.temperature, form, impl)
        against_mixed = soft_contrast(zm1, gather_with_grad(zm2), targets, w_mixed, self.temperature, form, impl)
        return self.combine(base, against_clean, against_mixed, {"loss/nt_xent": base.detach()})
