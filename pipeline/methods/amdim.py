"""Augmented Multiscale Deep InfoMax (Bachman, Hjelm & Buchwalter, "Learning Representations by Maximizing
Mutual Information Across Views", NeurIPS 2019; Philip-Bachman/amdim-public, model.py and costs.py).

Two views of each image, each through the backbone in its own pass (as amdim-public encodes x1 and x2).
The backbone's pooled vector stands for AMDIM's 1x1 layer (r1), the maps of `r5_stage` and `r7_stage` for
its 5x5 and 7x7 layers; each goes through its own 1x1 residual head to n_rkhs (`ResidualHead`, the form of
FakeRKHSConvNet), whose output BatchNorm is the only normalisation AMDIM adds (its encoder has none by
default: the author found that BatchNorm inside the encoder lets the two views of a pair see each other).

Tasks, each in both directions (view 1 -> view 2 and back) at weight 1/2: r1 against every r5 location,
r1 against every r7 location, and one random r5 location against every r5 location (`amdim_nce`: keys of
all images of the global batch, the query's own image's locations the positives, scores clipped to
±clip). The score regulariser is costs.py's: 1/2 · Σ over the six task directions of score_reg · mean(s²).
The loss is 1t5 + 1t7 + 5t5 + the regulariser, as task_self_supervised.py adds them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from models.local_features import global_and_maps, map_rows, stage_channels, stage_count
from pipeline.config import MethodConfig
from pipeline.losses.amdim import amdim_nce
from pipeline.methods import register_method
from pipeline.methods.base import Method, Views

TASKS = (("1t5", "r1", "r5"), ("1t7", "r1", "r7"), ("5t5", "r5_location", "r5"))  # (name, query, keys)


class AMDIMConfig(MethodConfig):
    n_rkhs: int = Field(1024, ge=1)  # the heads' output width (train.py's n_rkhs)
    # timm stages (ResNet: 0 stem, 1-4 residual stages; ViT: blocks) of the maps standing for AMDIM's 5x5 and
    # 7x7 layers; negative counts from the end. A CIFAR ResNet-18 at 32 px: -1 is layer4, 4x4x512, and -2
    # layer3, 8x8x256 (AMDIM's own CIFAR encoder: 5x5 and 7x7)
    r5_stage: int = -1
    r7_stage: int = -2
    clip: float = Field(20.0, gt=0.0)  # scores soft-clipped to clip·tanh(s/clip) (train.py's tclip)
    score_reg: float = Field(0.05, ge=0.0)  # the weight of mean(s²) per task direction (costs.py's 5e-2)
    loss_impl: Literal["auto", "reference", "chunked", "triton"] = "auto"


class ResidualHead(nn.Module):
    """FakeRKHSConvNet on rows [N, C] -> [N, out] (a 1x1 conv on a map is this on its locations):
    BatchNorm(Linear-ReLU-Linear(x) + shortcut(x)). The block's last layer starts at zero (amdim-public's
    init_weights) and the shortcut, with a bias, near the identity (U(−0.01, 0.01), ones on the diagonal)
    when out >= in: the head starts as a normalised copy of its input."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.ReLU(inplace=True),
                                   nn.Linear(out_dim, out_dim, bias=False))
        self.shortcut = nn.Linear(in_dim, out_dim)
        self.norm = nn.BatchNorm1d(out_dim)
        with torch.no_grad():
            self.block[2].weight.zero_()
            if out_dim >= in_dim:
                self.shortcut.weight.uniform_(-0.01, 0.01).fill_diagonal_(1.0)

    def forward(self, x):
        return self.norm(self.block(x) + self.shortcut(x))


@register_method("amdim")
class AMDIM(Method):
    Config = AMDIMConfig
    views = Views(global_views=2)

    def __init__(self, cfg):
        super().__init__(cfg)
        del self.projector  # the heads below replace it
        m, count = cfg.method, stage_count(self.backbone)
        for key in ("r5_stage", "r7_stage"):
            if not -count <= getattr(m, key) < count:
                raise ValueError(f"method.{key}={getattr(m, key)}: {cfg.model.backbone} has stages 0..{count - 1} (or -{count}..-1)")
        self.r5_stage, self.r7_stage = m.r5_stage % count, m.r7_stage % count
        if self.r5_stage == self.r7_stage:
            raise ValueError(f"method.r5_stage and method.r7_stage name the same stage ({self.r5_stage}): AMDIM contrasts two scales")
        self.stages = sorted((self.r5_stage, self.r7_stage))
        channels = dict(zip(self.stages, stage_channels(self.backbone, self.stages)))
        self.head_1 = ResidualHead(self.backbone.num_features, m.n_rkhs)
        self.head_5 = ResidualHead(channels[self.r5_stage], m.n_rkhs)
        self.head_7 = ResidualHead(channels[self.r7_stage], m.n_rkhs)

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        super().check(cfg, world_size)
        if cfg.data.batch_size * world_size < 2:
            raise ValueError("method.name=amdim needs two images or more in the global batch: other images give the negatives")

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One view's fp32 embeddings: r1 [B, n_rkhs], r5 and r7 [B, locations, n_rkhs], and r5 at one random
        location per image [B, n_rkhs] (the 5t5 query, drawn anew each step as costs.py does)."""
        pooled, maps = global_and_maps(self.backbone, x, self.stages)
        by_stage = dict(zip(self.stages, maps))
        r5, r7 = (self.map_head(head, by_stage[s]) for head, s in ((self.head_5, self.r5_stage), (self.head_7, self.r7_stage)))
        location = torch.randint(r5.shape[1], (r5.shape[0],), device=r5.device)
        return {"r1": self.head_1(pooled).float(), "r5": r5, "r7": r7,
                "r5_location": r5[torch.arange(r5.shape[0], device=r5.device), location]}

    @staticmethod
    def map_head(head: ResidualHead, feature_map: torch.Tensor) -> torch.Tensor:
        rows = map_rows(feature_map)  # [B, M, C]
        return head(rows.flatten(0, 1)).unflatten(0, rows.shape[:2]).float()

    def forward(self, views):
        first, second = (self.encode(x) for x in self.prepare_views(views))
        m = self.cfg.method
        loss = regulariser = 0.0
        parts = {}
        for name, query, keys in TASKS:
            task = 0.0
            for source, target in ((first, second), (second, first)):
                nce, mean_square = amdim_nce(source[query], target[keys], m.clip, m.loss_impl)
                task = task + 0.5 * nce
                regulariser = regulariser + 0.5 * m.score_reg * mean_square
            parts[f"loss/amdim_{name}"] = task.detach()
            loss = loss + task
        parts["loss/amdim_score_reg"] = regulariser.detach()
        return loss + regulariser, parts
