"""CPC v2 (Hénaff et al., "Data-Efficient Image Recognition with Contrastive Predictive Coding", ICML 2020;
CPC v1: van den Oord, Li & Vinyals 2018). No official code: this follows the paper's appendix pseudo-code.

One view. Each image is cut into an overlapping grid of patches (`models.patch_grid`), each patch augmented
on its own (colour dropping, flips) on the device; the backbone encodes every patch of the batch on its
own, pooled to a latent [B, H, W, D]. The backbone must normalise per sample (LayerNorm-like, e.g. timm's
`norm_layer: groupnorm1` for ResNets): BatchNorm would pool statistics over the patches of an image and
let them see each other. A causal context network (`models.causal_context`) gives the context at row i
from rows <= i; targets are a 1×1 conv of the latents, and each offset k its own 1×1 conv of the context
(no head shared between offsets, as lightning-bolts' re-implementation shares one); `cpc_loss` contrasts
each prediction with the target k rows below against all targets of the global batch, each offset counted
once. Evaluation features are the latents mean-pooled over the grid (`PatchFeatures`), as the paper's
linear evaluation; the exported backbone is the plain timm patch encoder.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from models.backbones import create_backbone
from models.causal_context import CausalContext
from models.patch_grid import PatchFeatures, augment_patches, cut_patches, grid_side
from pipeline.config import MethodConfig
from pipeline.data.preview import tile, unnormalise
from pipeline.distributed import rank
from pipeline.losses.cpc import cpc_loss
from pipeline.methods import register_method
from pipeline.methods.base import Method, Views


class CPCConfig(MethodConfig):
    patch_size: int = Field(8, ge=1)  # CIFAR: 8 px at stride 4 on 32 px (7x7); ImageNet: 64 at 32 on 256
    patch_stride: int = Field(4, ge=1)
    offsets: tuple[int, ...] = (1, 2, 3, 4, 5)  # rows below the context that are predicted, each its own head
    target_dim: int = Field(64, ge=1)  # the pseudo-code's target_dim
    context_hidden: int = Field(256, ge=1)  # the context blocks' width
    context_blocks: int = Field(5, ge=0)
    scale: float = Field(0.1, gt=0.0)  # emb_scale: scores are scale * prediction . target
    colour_drop: float = Field(1.0, ge=0.0, le=1.0)  # probability that a patch keeps one random channel only
    flip: float = Field(0.5, ge=0.0, le=1.0)  # probability that a patch is mirrored left-right
    loss_impl: Literal["auto", "reference", "chunked", "triton"] = "auto"

    @field_validator("offsets")
    @classmethod
    def _increasing(cls, offsets):
        if not offsets or offsets[0] < 1 or list(offsets) != sorted(set(offsets)):
            raise ValueError(f"offsets must be increasing positive rows, each once; got {list(offsets)}")
        return offsets


@register_method("cpc")
class CPC(Method):
    Config = CPCConfig
    views = Views(global_views=1)

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        # The base class's backbone sees whole views and its projector is unused: the patch encoder takes
        # patches (a ViT's img_size is the patch size).
        del self.backbone, self.projector
        self.backbone = create_backbone(cfg.model, img_size=m.patch_size)
        batch_norms = [name for name, module in self.backbone.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            raise ValueError(f"method.name=cpc: {cfg.model.backbone} normalises with BatchNorm ({batch_norms[0]}, ...), "
                             f"which lets an image's patches see each other; give it a per-sample norm, e.g. "
                             f"model.backbone_args={{norm_layer: groupnorm1}} for a timm ResNet")
        width = self.backbone.num_features
        self.context = CausalContext(width, m.context_hidden, m.context_blocks)
        self.target = nn.Linear(width, m.target_dim)  # a 1x1 conv of the latents
        # One Linear of K·target_dim outputs is K separate 1x1 convs of the context, block k for offsets[k].
        self.predict = nn.Linear(width, len(m.offsets) * m.target_dim)
        self._step, self._draws = 0, 0  # the optimizer step, and forward passes within it (accumulation)

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        super().check(cfg, world_size)
        m = cfg.method
        sides = {"data.views[0].size": cfg.data.view_recipes()[0].size, "data.eval_size": cfg.data.eval_size}
        try:
            rows = {where: grid_side(side, m.patch_size, m.patch_stride) for where, side in sides.items()}
        except ValueError as e:
            raise ValueError(f"method.patch_size={m.patch_size}, patch_stride={m.patch_stride}: {e} "
                             f"(data.views[0].size {sides['data.views[0].size']}, data.eval_size {cfg.data.eval_size})") from None
        if m.offsets[-1] >= rows["data.views[0].size"]:
            grid = rows["data.views[0].size"]
            raise ValueError(f"method.offsets={list(m.offsets)}: the view's grid has {grid} rows, so an offset is {grid - 1} at most")

    @classmethod
    def preview(cls, cfg, views):
        """The view, then its patch grid as the patch encoder sees it: each patch augmented on its own
        (colour dropping, flips; a dropped channel shows its normalisation mean), 1 px apart."""
        m, (x,) = cfg.method, views
        patches = cut_patches(x, m.patch_size, m.patch_stride)  # [B, H, W, C, p, p]
        generator = torch.Generator(x.device).manual_seed(cfg.train.seed)
        augmented = augment_patches(patches.flatten(0, 2), generator, m.colour_drop, m.flip)
        shown = unnormalise(augmented, cfg.data.view_recipes()[0]).unflatten(0, patches.shape[:3])
        return super().preview(cfg, views) + [(f"patches {patches.shape[1]}x{patches.shape[2]}", tile(shown))]

    def features(self) -> nn.Module:
        return PatchFeatures(self.backbone, self.cfg.method.patch_size, self.cfg.method.patch_stride)

    def before_step(self, step: int) -> dict[str, float]:
        self._step, self._draws = step, 0
        return {}

    def augmentation_generator(self, device: torch.device) -> torch.Generator:
        """Seeded by (train.seed, rank, step, forward pass within the step): each rank and micro-batch its own
        draws, and a resumed run the same ones, with no generator state to checkpoint."""
        self._draws += 1
        seed = (((self.cfg.train.seed * 1_000_003 + rank()) * 2**24 + self._step) * 2**8 + self._draws) % 2**63
        return torch.Generator(device).manual_seed(seed)

    def latents_and_context(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches [B·H·W, C, p, p] of a (B, H, W) grid, row-major per image -> latents, context [B, H, W, D]."""
        (patches,) = self.prepare_views([patches])
        latents = self.backbone(patches).unflatten(0, grid)
        return latents, self.context(latents.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, views):
        (x,) = views
        m = self.cfg.method
        patches = cut_patches(x, m.patch_size, m.patch_stride)  # [B, H, W, C, p, p]
        augmented = augment_patches(patches.flatten(0, 2), self.augmentation_generator(x.device), m.colour_drop, m.flip)
        latents, context = self.latents_and_context(augmented, patches.shape[:3])
        predictions = self.predict(context).unflatten(-1, (len(m.offsets), m.target_dim)).movedim(-2, 0)  # [K, B, H, W, d]
        loss = cpc_loss(predictions.float(), self.target(latents).float(), m.offsets, m.scale, m.loss_impl)
        return loss, {"loss/cpc": loss.detach()}
