"""An encoder as a folder timm loads: `config.json`, `model.safetensors` and a model card (`README.md`).

`timm.create_model("local-dir:FOLDER", pretrained=True)` rebuilds it with the saved weights (for a
CIFAR-stem ResNet, after `import models`, which registers its architecture). An encoder's spec (timm
architecture, arguments, feature size) is what `create_backbone` recorded on it; checkpoints keep it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.config import Config


def encoder_spec(encoder: torch.nn.Module) -> dict:
    """What rebuilds `encoder` with timm: {"architecture", "model_args", "num_features"}."""
    if not hasattr(encoder, "timm_spec"):
        raise TypeError(f"{type(encoder).__name__}: an exported encoder is built by models.backbones.create_backbone")
    return {**encoder.timm_spec, "num_features": encoder.num_features}


def data_config(cfg: Config, channels: int = 3) -> dict:
    """timm's `pretrained_cfg`: the evaluation input size, crop and normalisation of the recipe."""
    first = cfg.data.view_recipes()[0]
    return {
        "input_size": [channels, cfg.data.eval_size, cfg.data.eval_size],
        "crop_pct": cfg.data.eval_size / cfg.data.eval_resize,
        "interpolation": "bilinear",
        "mean": list(first.mean)[:channels],
        "std": list(first.std)[:channels],
        "num_classes": 0,
    }


def timm_config(cfg: Config, spec: dict) -> dict:
    return {
        "architecture": spec["architecture"],
        "num_classes": 0,
        "num_features": spec["num_features"],
        "model_args": spec["model_args"],
        "pretrained_cfg": data_config(cfg, spec["model_args"].get("in_chans", 3)),
    }


def model_card(cfg: Config, meta: dict, name: str = "backbone") -> str:
    metrics = meta.get("metrics") or {}
    lines = [
        f"# {cfg.model.backbone} pretrained with {cfg.method.name}" + (f" (its encoder `{name}`)" if name != "backbone" else ""),
        "",
        f"Self-supervised backbone (no classifier) after {meta['step']} optimizer steps.",
        "",
        "```python",
        *(["import models  # registers the CIFAR-stem ResNet architecture"] if cfg.model.cifar_stem else []),
        "import timm",
        'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)',
        "```",
        "",
        "## Metrics",
        "",
        *([f"- {k}: {v}" for k, v in metrics.items()] or ["- none recorded"]),
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(cfg.model_dump(mode="json"), indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_timm_folder(out: Path, state: dict[str, torch.Tensor], spec: dict, cfg: Config, meta: dict, name: str = "backbone") -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(timm_config(cfg, spec), indent=1) + "\n")
    (out / "README.md").write_text(model_card(cfg, meta, name))
