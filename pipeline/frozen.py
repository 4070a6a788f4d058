"""A trained backbone for evaluation and fine-tuning: loaded from an export (`local-dir:FOLDER`) or a
checkpoint folder, with the data configuration its export declares (input size, crop, normalisation)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open

import models  # noqa: F401  (registers the CIFAR-stem ResNet with timm)
from pipeline.checkpoint import CheckpointError, export_backbone
from pipeline.config import DataConfig, ViewRecipe


def load_backbone(spec: str) -> torch.nn.Module:
    """`local-dir:FOLDER` (an export) or a checkpoint folder (exported on the fly)."""
    if spec.startswith("local-dir:"):
        return _create_from_folder(Path(spec[len("local-dir:"):]))
    with tempfile.TemporaryDirectory() as tmp:
        export_backbone(Path(spec), Path(tmp))
        return timm.create_model(f"local-dir:{tmp}", pretrained=True)


def _create_from_folder(folder: Path) -> torch.nn.Module:
    """timm's `local-dir:` loading, with a damaged or missing folder a CheckpointError naming the file."""
    config, weights = folder / "config.json", folder / "model.safetensors"
    for f in (config, weights):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (an exported backbone folder holds config.json and model.safetensors)")
    try:
        if not isinstance(json.loads(config.read_bytes()), dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{config}: damaged: {e}") from None
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                f.get_slice(key)  # a header that names data beyond the file's end fails here
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: damaged: {e}") from None
    try:
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    except (SafetensorError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot be loaded by timm ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None


def eval_data_config(model: torch.nn.Module, batch_size: int) -> DataConfig:
    """Resize and crop as the backbone's own config says (input size, crop_pct, normalisation)."""
    data = timm.data.resolve_data_config({}, model=model)
    size = data["input_size"][-1]
    recipe = ViewRecipe(size=size, mean=tuple(data["mean"]), std=tuple(data["std"]))
    return DataConfig(views=[recipe], batch_size=batch_size, eval_size=size, eval_resize=round(size / data["crop_pct"]))
