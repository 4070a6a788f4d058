"""MoCo v2: queries against their momentum key and a queue of past keys gathered from all ranks.

BatchNorm would let a query find its key through batch statistics, so keys are computed on a batch
shuffled across ranks (ShuffleBN), optionally in `shuffle_groups` groups per rank (one-GPU emulation:
queries in contiguous groups, keys in shuffled ones); `batch_norm: sync` uses SyncBN instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from models.momentum import MomentumEncoder
from pipeline.distributed import FeatureQueue, gather, shuffle_across_ranks, shuffled_order, unshuffle_across_ranks, world_size
from pipeline.methods import register_method
from pipeline.methods.base import InfoNCEConfig, InfoNCEMethod


def in_groups(encode, x: torch.Tensor, groups: int) -> torch.Tensor:
    """`encode` on `groups` equal slices of the batch: BatchNorm statistics per slice."""
    return torch.cat([encode(part) for part in x.chunk(groups)]) if groups > 1 else encode(x)


class MoCoV2Config(InfoNCEConfig):
    queue_size: int = Field(65536, ge=1)
    momentum: float = Field(0.999, ge=0.0, le=1.0)  # constant EMA momentum
    batch_norm: Literal["shuffle", "sync", "local"] = "shuffle"  # how keys avoid BatchNorm leaks
    shuffle_groups: int = Field(1, ge=1)  # ShuffleBN emulation: the key batch split into groups per rank


@register_method("mocov2")
class MoCoV2(InfoNCEMethod):
    Config = MoCoV2Config

    def __init__(self, cfg):
        super().__init__(cfg)
        self.momentum_encoder = MomentumEncoder(self.online())
        self.queue = FeatureQueue(cfg.method.queue_size, cfg.model.projector.out_dim)
        self.momentum = cfg.method.momentum

    @classmethod
    def check(cls, cfg, world_size):
        super().check(cfg, world_size)
        method, batch = cfg.method, cfg.data.batch_size
        if batch % method.shuffle_groups:
            raise ValueError(f"method.shuffle_groups={method.shuffle_groups} must divide data.batch_size={batch}")
        if method.queue_size < batch * world_size:
            raise ValueError(
                f"method.queue_size={method.queue_size} cannot hold one global batch of {batch * world_size} "
                f"keys (data.batch_size={batch} x {world_size} ranks)"
            )

    def online(self) -> torch.nn.Sequential:
        """Backbone then projector, as one module (a view: not registered a second time)."""
        return torch.nn.Sequential(self.backbone, self.projector)

    def forward(self, views):
        x_q, x_k = self.prepare_views(views)
        groups = self.cfg.method.shuffle_groups
        q = F.normalize(in_groups(self.online(), x_q, groups).float(), dim=1)
        with torch.no_grad():
            if self.cfg.method.batch_norm == "shuffle":
                perm = shuffled_order(x_k.shape[0] * world_size(), x_k.device)
                k = in_groups(self.momentum_encoder, shuffle_across_ranks(x_k, perm), groups)
                k = unshuffle_across_ranks(k, perm)
            else:
                k = in_groups(self.momentum_encoder, x_k, groups)
            k = F.normalize(k.float(), dim=1)
        # The queue is pushed to below, so the loss gets a copy: autograd keeps it for the backward pass.
        # With method.feature_aug, k's augmented twin is a second positive of q (the queue is not augmented).
        keys = gather(k)
        loss = self.contrast_keys(q, k, self.temperature, queue=self.queue.keys.clone(), in_batch_negatives=False,
                                  impl=self.cfg.method.loss_impl, push=keys)
        self.queue.push(keys)
        return loss, {"loss/info_nce": loss.detach()}

    def after_step(self, progress):
        self.momentum_encoder.update(self.online(), self.momentum)
        return {"momentum": self.momentum}
