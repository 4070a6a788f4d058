"""Backbones from timm by name, with the changes pretraining recipes ask for.

A ResNet with `cifar_stem` (3x3 stride-1 first conv, no max-pool, for 32x32 images) is registered in timm
as the architecture `cifar_resnet`, so an exported one loads with `timm.create_model("local-dir:...")`
once this package is imported (timm has no plugin mechanism that would find it without the import).
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file
from timm.models import register_model

from pipeline.config import ModelConfig


def is_vit(name: str) -> bool:
    """Vision transformers by timm name: they take `img_size` and gain nothing from channels_last."""
    return "vit" in name or name.startswith(("deit", "eva", "beit"))


def to_cifar_stem(model: nn.Module) -> nn.Module:
    """Replace a timm ResNet's 7x7 stride-2 conv and max-pool with one 3x3 stride-1 conv."""
    old = model.conv1
    if not isinstance(old, nn.Conv2d):
        raise ValueError(f"cifar_stem needs a ResNet with a single-conv stem, {type(model).__name__} has {type(old).__name__}")
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model
def cifar_resnet(pretrained: bool = False, base: str = "resnet18", pretrained_cfg=None, **kwargs) -> nn.Module:
    """timm entry point: `base` (any timm ResNet) with the CIFAR stem; weights only from an exported folder."""
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pretrained_")}
    model = to_cifar_stem(timm.create_model(base, **kwargs))
    if pretrained:
        source = dict(pretrained_cfg or {})
        if source.get("source") != "local-dir":
            raise ValueError("cifar_resnet has no published weights: load an exported folder with local-dir:")
        model.load_state_dict(load_file(str(Path(source["file"]) / "model.safetensors")))
        model.pretrained_cfg = source
    return model


def timm_spec(cfg: ModelConfig, img_size: int, dynamic_size: bool = False) -> tuple[str, dict]:
    """(architecture, model_args) that rebuild the backbone with `timm.create_model`. `dynamic_size`: a
    ViT that takes inputs of several sizes (multi-crop), its position embedding interpolated."""
    args: dict = {**cfg.backbone_args, "num_classes": 0}
    if cfg.drop_path_rate:
        args["drop_path_rate"] = cfg.drop_path_rate
    if is_vit(cfg.backbone):
        args["img_size"] = cfg.img_size or img_size
        if dynamic_size:
            args["dynamic_img_size"] = True
    if cfg.cifar_stem:
        return "cifar_resnet", {"base": cfg.backbone, **args}
    return cfg.backbone, args


def create_backbone(cfg: ModelConfig, img_size: int, dynamic_size: bool = False, **model_args) -> nn.Module:
    """A timm backbone without classifier (forward gives pooled features of size `num_features`).
    `model_args` go to timm on top of the recipe's (e.g. `in_chans=1` for an encoder of one channel). The
    model records its spec as `timm_spec`, which checkpoints keep and export writes."""
    name, args = timm_spec(cfg, img_size, dynamic_size)
    args.update(model_args)
    try:
        model = timm.create_model(name, pretrained=False, **args)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ValueError(f"model.backbone={cfg.backbone!r}: {e}") from None
    if cfg.vit_init == "sincos_xavier":
        mocov3_vit_init(model)
    if cfg.freeze_patch_embed:
        model.patch_embed.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.timm_spec = {"architecture": name, "model_args": args}
    return model


def sincos_position_embedding(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D position embedding, [rows * cols, dim] for patches in row-major order: a quarter
    of the channels each for sin and cos of the patch's row, then of its column, at the frequencies
    temperature^(-i / (dim / 4)). Computed in float64 (moco-v3 uses float32: equal to ~1e-7)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    freq = temperature ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij")
    row, col = row.reshape(-1, 1) * freq, col.reshape(-1, 1) * freq
    return torch.cat([row.sin(), row.cos(), col.sin(), col.cos()], dim=1).float()


@torch.no_grad()
def mocov3_vit_init(model: nn.Module) -> None:
    """A timm ViT as moco-v3's vits.py builds it: the fixed sin-cos position embedding (no gradient; the
    class token's is zero), xavier-uniform Linear weights with q, k and v initialised as three [dim, dim]
    matrices (one xavier bound over the stacked qkv weight would be smaller by sqrt(2)), zero biases, the
    class token N(0, 1e-6), and the patch projection xavier-uniform over fans (channels * patch area, dim)."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d) or getattr(model, "pos_embed", None) is None:
        raise ValueError(f"model.vit_init=sincos_xavier needs a ViT with a conv patch projection and a learned position embedding, "
                         f"{type(model).__name__} has neither")
    rows, cols = model.patch_embed.grid_size
    grid = sincos_position_embedding(rows, cols, model.pos_embed.shape[-1])
    model.pos_embed.zero_()[0, -rows * cols:] = grid  # prefix tokens (class) keep zeros
    model.pos_embed.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            for block in (module.weight.chunk(3) if name.endswith("qkv") else (module.weight,)):
                nn.init.xavier_uniform_(block)  # a chunk is a view: initialised in place
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    fan_in, fan_out = proj.weight[0].numel(), proj.out_channels
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
