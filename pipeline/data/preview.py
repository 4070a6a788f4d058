"""python -m pipeline.data.preview --config RECIPE.yaml --data SHARDS --out views.png

Writes a grid of augmented views (one row per image, one column per view) so a recipe can be seen
before training on it. Reads the recipe's `data` section; smaller views are centred in their cell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from pipeline.config import ConfigError, DataConfig, ViewRecipe, format_validation_error, read_recipe
from pipeline.data.loader import ShardLoader

PAD = 2


def to_uint8(view: torch.Tensor, recipe: ViewRecipe) -> np.ndarray:
    """CHW normalised view -> HWC uint8."""
    mean = torch.tensor(recipe.mean).view(3, 1, 1)
    std = torch.tensor(recipe.std).view(3, 1, 1)
    pixels = (view.float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).numpy()


def view_grid(views: list[torch.Tensor], recipes: list[ViewRecipe], rows: int) -> Image.Image:
    cell = max(r.size for r in recipes) + PAD
    grid = Image.new("RGB", (cell * len(views) + PAD, cell * rows + PAD), (255, 255, 255))
    for col, (batch, recipe) in enumerate(zip(views, recipes)):
        offset = (cell - recipe.size - PAD) // 2 + PAD
        for row in range(min(rows, batch.shape[0])):
            grid.paste(Image.fromarray(to_uint8(batch[row], recipe)), (col * cell + offset, row * cell + offset))
    return grid


def load_data_config(path: str | Path | None) -> DataConfig:
    if path is None:
        return DataConfig()
    try:
        raw = read_recipe(path)
        return DataConfig.model_validate(raw.get("data", {}))
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    except ValidationError as e:
        raise SystemExit(f"{path}: {format_validation_error(e, prefix='data')}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.preview", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML recipe (its `data` section is used); default: the SimCLR preset")
    p.add_argument("--data", required=True, help="shard folder")
    p.add_argument("--out", default="views.png")
    p.add_argument("--images", type=int, default=8, help="rows of the grid")
    args = p.parse_args(argv)
    cfg = load_data_config(args.config)
    loader = ShardLoader(args.data, cfg, batch_size=args.images)
    batch = next(iter(loader))
    recipes = cfg.view_recipes()
    view_grid(batch.views, recipes, args.images).save(args.out)
    print(f"{args.out}: {args.images} images x {len(recipes)} views")
    return 0


if __name__ == "__main__":
    sys.exit(main())
