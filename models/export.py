"""A backbone as a folder timm loads: `config.json`, `model.safetensors` and a model card (`README.md`).

`timm.create_model("local-dir:FOLDER", pretrained=True)` rebuilds it with the saved weights (for a
CIFAR-stem ResNet, after `import models`, which registers its architecture).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.backbones import timm_spec
from pipeline.config import Config


def timm_config(cfg: Config, num_features: int) -> dict:
    sizes = {r.size for r in cfg.data.view_recipes()}
    name, args = timm_spec(cfg.model, img_size=max(sizes), dynamic_size=len(sizes) > 1)
    first = cfg.data.view_recipes()[0]
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": num_features,
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [3, cfg.data.eval_size, cfg.data.eval_size],
            "crop_pct": cfg.data.eval_size / cfg.data.eval_resize,
            "interpolation": "bilinear",
            "mean": list(first.mean),
            "std": list(first.std),
            "num_classes": 0,
        },
    }


def model_card(cfg: Config, meta: dict) -> str:
    metrics = meta.get("metrics") or {}
    lines = [
        f"# {cfg.model.backbone} pretrained with {cfg.method.name}",
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


def write_timm_folder(out: Path, state: dict[str, torch.Tensor], cfg: Config, meta: dict, num_features: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(timm_config(cfg, num_features), indent=1) + "\n")
    (out / "README.md").write_text(model_card(cfg, meta))
