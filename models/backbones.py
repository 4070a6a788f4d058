"""Backbones from timm by name, with the changes pretraining recipes ask for.

A ResNet with `cifar_stem` (3x3 stride-1 first conv, no max-pool, for 32x32 images) is registered in timm
as the architecture `cifar_resnet`, so an exported one loads with `timm.create_model("local-dir:...")`
once this package is imported (timm has no plugin mechanism that would find it without the import).
"""

from __future__ import annotations

from pathlib import Path

import timm
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
    args: dict = {"num_classes": 0}
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
    if cfg.freeze_patch_embed:
        model.patch_embed.requires_grad_(False)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.timm_spec = {"architecture": name, "model_args": args}
    return model
