"""MoCo v2: queries against their momentum key and a queue of past keys gathered from all ranks.

BatchNorm would let a query find its key through batch statistics, so keys are computed on a batch
shuffled across ranks (ShuffleBN), optionally in `shuffle_groups` groups per rank (one-GPU emulation:
queries in contiguous groups, keys in shuffled ones); `batch_norm: sync` uses SyncBN instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.momentum import MomentumEncoder
from pipeline.distributed import FeatureQueue, gather, shuffle_across_ranks, shuffled_order, unshuffle_across_ranks, world_size
from pipeline.methods.base import Method


def in_groups(encode, x: torch.Tensor, groups: int) -> torch.Tensor:
    """`encode` on `groups` equal slices of the batch: BatchNorm statistics per slice."""
    return torch.cat([encode(part) for part in x.chunk(groups)]) if groups > 1 else encode(x)


class MoCoV2(Method):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.momentum_encoder = MomentumEncoder(self.online())
        self.queue = FeatureQueue(cfg.method.queue_size, cfg.model.projector.out_dim)
        self.momentum = cfg.method.momentum

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
