"""SDMP (A Simple Data Mixing Prior) on MoCo v3 and on SimCLR.

Image i of the local batch is mixed with its partner B-1-i (the same λ_i for both views; the released code
flips the global batch, which would send images between ranks). A mixed query of image i is contrasted
against
- clean keys, with soft targets λ_i on i and 1-λ_i on its partner, and
- mixed keys, with targets 1/(1+c) on i and c/(1+c) on its partner, where
  c = min(λ_i, 1-λ_p) + min(1-λ_i, λ_p) is the content query i shares with the partner's mixed key,
both over keys gathered from all ranks (targets by global index). `method.sdmp.form`:
- `released` (OliverRensu/SDMP's training step): λ = 0.1 + 0.8·Beta(α, α); the views in a random order
  (a, b) per step, the same on every rank; base = the one-way contrast of a's queries against b's keys;
  the mixed query from mix(b), against the clean keys of a and the keys of mix(a). Unlike the released
  code, the mixed images really are mixed (its paste sits under a condition that is never true).
  For SimCLR "one way" is NT-Xent's rows of view a only: each view-a anchor against both views' other
  embeddings, its positive its view-b twin (the paper's ℓ(a, b) without ℓ(b, a)).
- `symmetric`: λ = Beta(α, α); the base method's symmetric loss (local views included); the mixed query
  from mix(view 1), against the clean keys of view 2 and the keys of mix(view 2).
total = base + w·(mixed-vs-clean + mixed-vs-mixed), w = 0.5 as released.
"""

from __future__ import annotations

import random
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

LAMBDA_BANDS = {"released": (0.1, 0.9), "symmetric": (0.0, 1.0)}


class SDMPSettings(Strict):
    form: Literal["released", "symmetric"] = "released"  # the released training step, or both directions
    weight: float = Field(0.5, ge=0.0)  # total = base + weight * (mixed-vs-clean + mixed-vs-mixed)
    alpha: float = Field(1.0, gt=0.0)  # lambda ~ Beta(alpha, alpha), in the form's band
    mix: Literal["random", "mixup", "cutmix", "resizemix"] = "random"  # one method per step
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
    """The mixing state shared by both SDMP variants: a device generator per rank for λ and boxes, and one
    host generator seeded alike on every rank for the per-step draws (view order, mixing method), so all
    ranks agree without communicating and nothing waits for the GPU."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self._step_generator = random.Random(cfg.train.seed)
        self._mix_generator = None

    @classmethod
    def check(cls, cfg, world_size):
        super().check(cfg, world_size)
        if cfg.method.sdmp.form == "released" and len(cfg.data.view_recipes()) > 2:
            raise ValueError("method.sdmp.form=released takes 2 views, as the released code; "
                             "local views (multi-crop) need method.sdmp.form=symmetric")

    @property
    def released(self) -> bool:
        return self.cfg.method.sdmp.form == "released"

    def view_order(self, x1, x2):
        """(a, b): the released form's base queries come from a, its mixed query from b; swapped at random."""
        return (x2, x1) if self._step_generator.random() < 0.5 else (x1, x2)

    def mixed_pair(self, xq, xk):
        """The mixed-query view and the mixed-key view, mixed with the same partners, λ and method, then the
        targets; the method drawn per step."""
        sdmp: SDMPSettings = self.cfg.method.sdmp
        if self._mix_generator is None or self._mix_generator.device != xq.device:
            self._mix_generator = torch.Generator(xq.device).manual_seed(self.cfg.train.seed * 1009 + rank())
        method = sdmp.mix if sdmp.mix != "random" else self._step_generator.choice(METHODS)
        mq, lam_q = mix(xq, method, sdmp.alpha, self._mix_generator, band=LAMBDA_BANDS[sdmp.form])
        mk, lam_k = mix(xk, method, sdmp.alpha, self._mix_generator, lam=lam_q)
        return mq, mk, *mixing_targets(lam_q, lam_k)

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
        if self.released:
            xa, xb = self.view_order(x1, x2)
            k_clean = self.key(xa)
            base = self.contrast(self.query(xa), self.key(xb))
            parts, (xq, xk) = {"loss/base": base.detach()}, (xb, xa)
        else:
            base, parts, (_, k_clean) = self.clean_loss(x1, x2, *local)
            xq, xk = x1, x2
        mq, mk, targets, w_clean, w_mixed = self.mixed_pair(xq, xk)
        qm = torch.nn.functional.normalize(self.query(mq).float(), dim=1)
        keys = {name: torch.nn.functional.normalize(gather(k).float(), dim=1) for name, k in (("clean", k_clean), ("mixed", self.key(mk)))}
        form, impl, scale = self.cfg.method.sdmp.loss, self.cfg.method.loss_impl, 2 * self.temperature
        against_clean = scale * soft_contrast(qm, keys["clean"], targets, w_clean, self.temperature, form, impl)
        against_mixed = scale * soft_contrast(qm, keys["mixed"], targets, w_mixed, self.temperature, form, impl)
        return self.combine(base, against_clean, against_mixed, parts)


@register_method("sdmp_simclr")
class SDMPSimCLR(_Mixing, SimCLR):
    Config = SDMPSimCLRConfig

    def forward(self, views):
        x1, x2, *local = self.prepare_views(views)
        if self.released:
            xa, xb = self.view_order(x1, x2)
            z_clean, zb = self.embed(torch.cat([xa, xb])).chunk(2)
            base, (xq, xk) = self.one_way_nt_xent(z_clean, zb), (xb, xa)
        else:
            z1, z_clean, *local = self.encode_by_size(self.embed, [x1, x2, *local])
            base, (xq, xk) = self.nt_xent(z1, z_clean, local), (x1, x2)
        mq, mk, targets, w_clean, w_mixed = self.mixed_pair(xq, xk)
        zmq, zmk = self.embed(torch.cat([mq, mk])).chunk(2)
        form, impl = self.cfg.method.sdmp.loss, self.cfg.method.loss_impl
        against_clean = soft_contrast(zmq, gather_with_grad(z_clean), targets, w_clean, self.temperature, form, impl)
        against_mixed = soft_contrast(zmq, gather_with_grad(zmk), targets, w_mixed, self.temperature, form, impl)
        return self.combine(base, against_clean, against_mixed, {"loss/nt_xent": base.detach()})

    def one_way_nt_xent(self, za, zb):
        """NT-Xent's rows of view a: anchors za against the gathered [za; zb] without themselves."""
        own = rank() * za.shape[0] + torch.arange(za.shape[0], device=za.device)
        keys = torch.cat([gather_with_grad(za), gather_with_grad(zb)])
        impl = self.cfg.method.loss_impl
        return self.contrast_keys(za, keys, self.temperature, targets=own + keys.shape[0] // 2, mask_self=own, impl=impl)
