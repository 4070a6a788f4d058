"""deepspeed launch/pretrain.py --config launch/configs/<recipe>.yaml [key=value ...]

Also runs as `python launch/pretrain.py` (one process). With no arguments it trains the embedded default:
a small backbone on scikit-learn's digits (built into data/sample on first use), with kNN accuracy on
their held-out images before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from data_shards.shards import ShardError, check_shard_set, shared_class_names  # noqa: E402
from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data.loader import batches_per_epoch  # noqa: E402
import pipeline.methods  # noqa: E402,F401  (registers the methods the configuration is validated against)

DEFAULT_RECIPE = ROOT / "launch" / "configs" / "default.yaml"
SAMPLE = Path("data/sample")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="launch/pretrain.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help=f"YAML recipe (default: {DEFAULT_RECIPE.relative_to(ROOT)} on the embedded sample)")
    p.add_argument("--data", help="training shard folder")
    p.add_argument("--val-data", help="validation shard folder (kNN monitor)")
    p.add_argument("--output", help="run folder: checkpoints, tensorboard")
    p.add_argument("--resume", help="auto (newest complete checkpoint), never, or a checkpoint folder")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--deepspeed_config", "--deepspeed-config", help="DeepSpeed JSON merged under ours (= engine.deepspeed_config)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.5 data.batch_size=128")
    return p.parse_args(argv)


def ensure_sample(folder: Path) -> None:
    """Build the embedded dataset once; on several ranks, the first local rank builds and the rest wait."""
    if (folder / "val" / "manifest.json").is_file():
        return
    if os.environ.get("LOCAL_RANK", "0") == "0":
        from data_shards import sample

        if sample.build(folder, overwrite=True) != 0:
            raise SystemExit(f"could not build the embedded dataset in {folder}")
    while not (folder / "val" / "manifest.json").is_file():
        time.sleep(1)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    recipe = args.config
    if recipe is None and args.data is None:
        recipe = DEFAULT_RECIPE
        ensure_sample(SAMPLE)
        overrides = [f"train.data={SAMPLE / 'train'}", f"train.val_data={SAMPLE / 'val'}"] + overrides
    flags = {"train.data": args.data, "train.val_data": args.val_data, "train.output": args.output,
             "train.resume": args.resume, "train.max_steps": args.max_steps,
             "engine.deepspeed_config": args.deepspeed_config}
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    # Everything that can be wrong is checked here, before any process group forms.
    try:
        cfg = load_config(recipe, overrides)  # with the method's own checks at $WORLD_SIZE
        if cfg.train.data is None:
            raise ConfigError("no training data: pass --data SHARDS or set train.data")
        train_set = check_shard_set(cfg.train.data)
        if cfg.train.val_data:
            check_shard_set(cfg.train.val_data)
        if cfg.train.val_data:  # the kNN monitor compares their labels: one create run, the same classes
            shared_class_names(cfg.train.data, cfg.train.val_data)
        batches_per_epoch(cfg.train.data, train_set.num_samples, cfg.data.batch_size,
                          int(os.environ.get("WORLD_SIZE", 1)), cfg.optim.accumulation_steps)
        output = Path(cfg.train.output).absolute()
        existing = next(p for p in (output, *output.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"train.output={cfg.train.output}: {existing} is a file, not a folder")
    except (ConfigError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.checkpoint import CheckpointError
    from pipeline.train import NonFiniteLoss, train  # imports DeepSpeed; only once the configuration is known good

    try:
        train(cfg)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
