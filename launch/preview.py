"""python launch/preview.py --config RECIPE.yaml --data SHARDS --out views.png [key=value ...]

Writes a grid of a recipe's augmented views as its method shows them, so a recipe can be seen before
training on it: one row per image, one captioned column per view, and a method that changes its views on
the device shows what its encoders see (its `preview`: colour channels, a patch grid). Small views are
enlarged (nearest neighbour) to at least 96 px. The preview names no method: each declares its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data.loader import ShardLoader  # noqa: E402
from pipeline.data.preview import view_grid  # noqa: E402
import pipeline.methods  # noqa: E402,F401  (registers the methods the configuration is validated against)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/preview.py", description=__doc__.split("\n\n")[1].split("\n")[0])
    p.add_argument("--config", help="YAML recipe; default: the built-in defaults")
    p.add_argument("--data", required=True, help="shard folder")
    p.add_argument("--out", default="views.png")
    p.add_argument("--images", type=int, default=8, help="rows of the grid")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.views.0.size=64")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, world_size=1)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    batch = next(iter(ShardLoader(args.data, cfg.data, batch_size=args.images)))
    with torch.no_grad():
        columns = type(cfg.method).method_class.preview(cfg, batch.views)
    view_grid(columns, args.images).save(args.out)
    print(f"{args.out}: {args.images} images x {len(columns)} columns ({', '.join(c for c, _ in columns)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
