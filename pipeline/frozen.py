"""A trained backbone for evaluation and fine-tuning: loaded from an export (`local-dir:FOLDER`) or a
checkpoint folder, with the data configuration its export declares (input size, crop, normalisation)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import timm
import torch

import models  # noqa: F401  (registers the CIFAR-stem ResNet with timm)
from pipeline.checkpoint import export_backbone
from pipeline.config import DataConfig, ViewRecipe


def load_backbone(spec: str) -> torch.nn.Module:
    """`local-dir:FOLDER` (an export) or a checkpoint folder (exported on the fly)."""
    if spec.startswith("local-dir:"):
        return timm.create_model(spec, pretrained=True)
    with tempfile.TemporaryDirectory() as tmp:
        export_backbone(Path(spec), Path(tmp))
        return timm.create_model(f"local-dir:{tmp}", pretrained=True)


def eval_data_config(model: torch.nn.Module, batch_size: int) -> DataConfig:
    """Resize and crop as the backbone's own config says (input size, crop_pct, normalisation)."""
    data = timm.data.resolve_data_config({}, model=model)
    size = data["input_size"][-1]
    recipe = ViewRecipe(size=size, mean=tuple(data["mean"]), std=tuple(data["std"]))
    return DataConfig(views=[recipe], batch_size=batch_size, eval_size=size, eval_resize=round(size / data["crop_pct"]))
