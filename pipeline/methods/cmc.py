"""CMC (Tian, Krishnan & Isola, "Contrastive Multiview Coding"; HobbitLong/CMC): one crop of an image in
CIE Lab, split into its L channel and its ab channels, each through an encoder of its own (a timm backbone
with `in_chans` 1 or 2, then the projector, L2-normalised). The loss is cross-view InfoNCE in both
directions, L queries against the ab keys and ab queries against the L keys, summed; the keys are those of
the global batch (gathered with their gradient), the softmax form CMC's README recommends over its code's
binary NCE. With `method.memory` the negatives are past keys instead, as in CMC's momentum-contrast
variant: a momentum copy of each view's encoder gives the keys, row i's positive is the other view's
momentum key of its image, its negatives a FIFO queue of that view's past keys gathered from all ranks.
With `method.memory_bank` the negatives are CMC's own memory (pipeline/methods/memory_bank.py): a row per
training sample and view, indexed by the dataset index the loop passes (`Views(indices=True)`); L queries
against the ab rows (positive: the ab row of the query's own sample, as NCEAverage scores it) and ab
queries against the L rows, K sampled rows as negatives, then both views' rows of the global batch move
to the current features (momentum 0.5). Evaluation uses both encoders' features, concatenated [L | ab],
as CMC reports them."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from timm.optim import param_groups_weight_decay

from models.backbones import create_backbone
from models.colour import lab_to_rgb, rgb_to_lab, scale_lab
from models.heads import mlp_head
from models.momentum import MomentumEncoder
from pipeline.config import MethodConfig, Strict
from pipeline.data.preview import Column
from pipeline.distributed import FeatureQueue, gather
from pipeline.losses import gathered_info_nce, info_nce
from pipeline.methods import register_method
from pipeline.methods.base import Method, Views
from pipeline.methods.memory_bank import MemoryBank, MemoryBankConfig

L_VIEW, AB_VIEW = 0, 1  # rows of the memory bank


def lab_views(rgb: torch.Tensor, whole: bool = False) -> tuple[torch.Tensor, ...]:
    """sRGB [B, 3, H, W] in [0, 1] -> (L [B, 1, H, W], ab [B, 2, H, W]), each channel scaled to [-1, 1];
    `whole`: the whole scaled Lab image [B, 3, H, W] as a third view (MetAug's "ori")."""
    lab = scale_lab(rgb_to_lab(rgb)).to(rgb.dtype)
    return (lab[:, :1], lab[:, 1:]) + ((lab,) if whole else ())


class LabFeatures(nn.Module):
    """Evaluation features of CMC: sRGB images -> Lab -> [L encoder's features | ab encoder's features],
    with `lab_encoder` (of the whole Lab image) its features third."""

    def __init__(self, l_encoder: nn.Module, ab_encoder: nn.Module, lab_encoder: nn.Module | None = None):
        super().__init__()
        self.l_encoder, self.ab_encoder, self.lab_encoder = l_encoder, ab_encoder, lab_encoder

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        encoders = [self.l_encoder, self.ab_encoder] + ([self.lab_encoder] if self.lab_encoder is not None else [])
        views = lab_views(rgb, whole=self.lab_encoder is not None)
        return torch.cat([encoder(v) for encoder, v in zip(encoders, views)], dim=1)


def add_view_encoders(method: Method, cfg, channels: dict[str, int]) -> None:
    """In place of the base class's 3-channel backbone and its projector, one encoder per colour view:
    `{name}_backbone` (a timm backbone with `in_chans` channels) and `{name}_projector`, all backbones
    built first (CMC's construction order, which fixes the seeded initial weights)."""
    del method.backbone, method.projector
    size = cfg.data.view_recipes()[0].size
    for name, chans in channels.items():
        setattr(method, f"{name}_backbone", create_backbone(cfg.model, size, in_chans=chans))
    for name in channels:
        setattr(method, f"{name}_projector", mlp_head(getattr(method, f"{name}_backbone").num_features, cfg.model.projector))


def view_param_groups(method: Method, weight_decay: float) -> list[dict]:
    """`Method.param_groups` for the encoders of `add_view_encoders`: timm's no-decay tokens of each."""
    if not method.cfg.optim.no_decay_norm_bias:
        return Method.param_groups(method, weight_decay)
    tokens = {f"{name}_backbone.{token}" for name, backbone in method.encoders().items()
              for token in getattr(backbone, "no_weight_decay", set)()}
    return param_groups_weight_decay(method, weight_decay, no_weight_decay_list=tokens)


class KeyMemory(Strict):
    size: int = Field(16384, ge=1)  # past keys per view (CMC's K)
    momentum: float = Field(0.999, ge=0.0, le=1.0)  # of the key encoders' EMA


class CMCConfig(MethodConfig):
    temperature: float = Field(0.07, gt=0.0)
    loss_impl: Literal["auto", "reference", "chunked", "triton"] = "auto"
    memory: KeyMemory | None = None  # MoCo-style past keys; None (and no memory_bank): the global batch's keys
    memory_bank: MemoryBankConfig | None = None  # CMC's memory indexed by sample


def lab_columns(rgb: torch.Tensor) -> list[Column]:
    """Preview columns of CMC's colour views of sRGB images: L as grey, and ab shown at a constant
    lightness (L = 50), the two encoders' inputs before their scaling to [-1, 1]."""
    lab = rgb_to_lab(rgb)
    return [("L", lab[:, :1] / 100.0), ("ab", lab_to_rgb(torch.cat([torch.full_like(lab[:, :1], 50.0), lab[:, 1:]], 1)))]


@register_method("cmc")
class CMC(Method):
    Config = CMCConfig
    views = Views(global_views=1, raw_rgb=True, indices=True)

    def __init__(self, cfg):
        super().__init__(cfg)
        add_view_encoders(self, cfg, {"l": 1, "ab": 2})
        self.temperature = cfg.method.temperature
        memory = cfg.method.memory
        if memory is not None:
            dim = cfg.model.projector.out_dim
            self.l_momentum = MomentumEncoder(nn.Sequential(self.l_backbone, self.l_projector))
            self.ab_momentum = MomentumEncoder(nn.Sequential(self.ab_backbone, self.ab_projector))
            self.l_queue, self.ab_queue = FeatureQueue(memory.size, dim), FeatureQueue(memory.size, dim)
        if cfg.method.memory_bank is not None:
            self.bank = MemoryBank(cfg.method.memory_bank, 2, cfg.model.projector.out_dim, cfg.train.seed)

    @classmethod
    def check(cls, cfg, world_size):
        super().check(cfg, world_size)
        memory, batch = cfg.method.memory, cfg.data.batch_size
        if memory is not None and cfg.method.memory_bank is not None:
            raise ValueError("method.memory (MoCo-style queues) and method.memory_bank (CMC's) are two kinds of "
                             "negatives: set one")
        if memory is not None and memory.size % (batch * world_size):
            raise ValueError(f"method.memory.size={memory.size} must be a multiple of the global batch of "
                             f"{batch * world_size} keys (data.batch_size={batch} x {world_size} ranks)")

    def param_groups(self, weight_decay):
        return view_param_groups(self, weight_decay)

    def encoders(self):
        return {"l": self.l_backbone, "ab": self.ab_backbone}

    @classmethod
    def preview(cls, cfg, views):
        return super().preview(cfg, views) + lab_columns(views[0])

    def features(self):
        return LabFeatures(self.l_backbone, self.ab_backbone)

    def embed(self, l: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings (fp32) of the L and ab views: [B, out_dim] each."""
        z_l = self.l_projector(self.l_backbone(l))
        z_ab = self.ab_projector(self.ab_backbone(ab))
        return F.normalize(z_l.float(), dim=1), F.normalize(z_ab.float(), dim=1)

    def set_data_size(self, size):
        if self.cfg.method.memory_bank is not None:
            self.bank.allocate(size)

    def before_step(self, step):
        if self.cfg.method.memory_bank is not None:
            self.bank.begin_step(step)
        return {}

    def forward(self, views, indices=None):
        l, ab = self.prepare_views(list(lab_views(views[0])))
        z_l, z_ab = self.embed(l, ab)
        impl = self.cfg.method.loss_impl
        if self.cfg.method.memory_bank is not None:
            return self.contrast_with_bank(z_l, z_ab, indices)
        if self.cfg.method.memory is not None:
            return self.contrast_with_memory(l, ab, z_l, z_ab, impl)
        # Row i's positive is the other view of its own image: key rank * B + i of the gathered keys.
        l_to_ab = gathered_info_nce(z_l, z_ab, self.temperature, impl=impl)
        ab_to_l = gathered_info_nce(z_ab, z_l, self.temperature, impl=impl)
        return l_to_ab + ab_to_l, {"loss/l_to_ab": l_to_ab.detach(), "loss/ab_to_l": ab_to_l.detach()}

    def contrast_with_memory(self, l, ab, z_l, z_ab, impl):
        """Each view's queries against the other view's momentum keys (positive: the same image's) and its
        queue of past keys (negatives); then the gathered keys join their queues."""
        with torch.no_grad():
            k_l = F.normalize(self.l_momentum(l).float(), dim=1)
            k_ab = F.normalize(self.ab_momentum(ab).float(), dim=1)
        # The queues are pushed to below, so the losses get copies: autograd keeps them for the backward.
        l_to_ab = info_nce(z_l, k_ab, self.temperature, queue=self.ab_queue.keys.clone(), in_batch_negatives=False, impl=impl)
        ab_to_l = info_nce(z_ab, k_l, self.temperature, queue=self.l_queue.keys.clone(), in_batch_negatives=False, impl=impl)
        self.l_queue.push(gather(k_l))
        self.ab_queue.push(gather(k_ab))
        return l_to_ab + ab_to_l, {"loss/l_to_ab": l_to_ab.detach(), "loss/ab_to_l": ab_to_l.detach()}

    def contrast_with_bank(self, z_l, z_ab, indices):
        """L queries against the ab rows, ab queries against the L rows (the same sampled negatives), then
        the batch's rows move towards its features."""
        if indices is None:
            raise ValueError("method.memory_bank needs each sample's dataset index: forward(views, indices=...)")
        negatives = self.bank.sample(z_l.shape[0], z_l.device)
        l_to_ab = self.bank.loss(z_l, AB_VIEW, indices, negatives, self.temperature)
        ab_to_l = self.bank.loss(z_ab, L_VIEW, indices, negatives, self.temperature)
        self.bank.update(indices, [z_l, z_ab])
        return l_to_ab + ab_to_l, {"loss/l_to_ab": l_to_ab.detach(), "loss/ab_to_l": ab_to_l.detach()}

    def after_step(self, progress):
        memory = self.cfg.method.memory
        if memory is None:
            return {}
        self.l_momentum.update(nn.Sequential(self.l_backbone, self.l_projector), memory.momentum)
        self.ab_momentum.update(nn.Sequential(self.ab_backbone, self.ab_projector), memory.momentum)
        return {}
