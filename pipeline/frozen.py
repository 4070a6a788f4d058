"""A trained backbone for evaluation and fine-tuning: loaded from an export (`local-dir:FOLDER`) or a
checkpoint folder, with the data configuration its export declares (input size, crop, normalisation).
An export with `features.json` (several encoders, one folder each, or one encoder whose method evaluates
more than its output, as CPC's patch grid) gives the method's own evaluation features (`Method.features()`),
rebuilt from its recipe."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open

import models  # noqa: F401  (registers the CIFAR-stem ResNet with timm)
from models.export import data_config
from pipeline.checkpoint import CheckpointError, encoder_folder, export_encoders
from pipeline.config import Config, DataConfig, ViewRecipe


def load_backbone(spec: str) -> torch.nn.Module:
    """`local-dir:FOLDER` (an export) or a checkpoint folder (exported on the fly)."""
    if spec.startswith("local-dir:"):
        return _load_export(Path(spec[len("local-dir:"):]))
    with tempfile.TemporaryDirectory() as tmp:
        return _load_export(export_encoders(Path(spec), Path(tmp)))


def _load_export(folder: Path) -> torch.nn.Module:
    if not (folder / "features.json").is_file():
        return _create_from_folder(folder)
    from pipeline.methods import build_method  # the methods import this module's neighbours

    try:
        found = json.loads((folder / "features.json").read_bytes())
        names, cfg = found["encoders"], Config.model_validate(found["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / 'features.json'}: damaged: {str(e).splitlines()[0][:300]}") from None
    method = build_method(cfg)
    encoders = method.encoders()
    if sorted(encoders) != sorted(names):
        raise CheckpointError(f"{folder / 'features.json'}: names encoders {names}, method {cfg.method.name} has {sorted(encoders)}")
    for name, encoder in encoders.items():
        encoder.load_state_dict(_create_from_folder(encoder_folder(folder, name, len(names))).state_dict())
    features = method.features()
    features.pretrained_cfg = data_config(cfg)  # what evaluation reads: the recipe's RGB input
    return features


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
