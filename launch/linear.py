"""python launch/linear.py --backbone local-dir:DIR|CHECKPOINT --train SHARDS --val SHARDS [--epochs N] [--output DIR]

The standard linear evaluation of a frozen backbone (MoCo v3's protocol; solo-learn's for CIFAR-sized
inputs): a linear classifier trained on random-resized-crop + flip views, SGD with momentum and a cosine
schedule, then top-1/top-5 on the validation shards. Prints JSON on stdout, `top1` and `top5` last; the
log goes to stderr. `deepspeed launch/linear.py ...` (or torchrun) runs it on every GPU, gloo on the CPU.
Checkpoints, TensorBoard, the classifier and result.json go to --output. The protocol and its sources are
described in pipeline/linear.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data_shards.shards import ShardError  # noqa: E402
import pipeline.methods  # noqa: E402,F401  (registers the methods a checkpoint's configuration names)
from pipeline.checkpoint import CheckpointError  # noqa: E402
from pipeline.linear import PRESETS, linear_eval  # noqa: E402
from pipeline.train import NonFiniteLoss  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/linear.py", description="The standard linear evaluation of a frozen backbone")
    p.add_argument("--backbone", required=True, help="local-dir:DIR (an export) or a checkpoint folder")
    p.add_argument("--train", required=True, help="labeled shards the classifier learns from")
    p.add_argument("--val", required=True, help="labeled shards to score")
    p.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                   help="imagenet: MoCo v3 (90 epochs, batch 1024, lr 0.1 or 3.0 for ViTs per 256); cifar: solo-learn "
                        "(100 epochs, batch 256, lr 0.1); auto (default): cifar for inputs of 64 px or less")
    p.add_argument("--epochs", type=int, help="default: the preset's")
    p.add_argument("--batch-size", type=int, help="global batch over all ranks (default: the preset's)")
    p.add_argument("--lr", type=float, help="base learning rate per 256 images, scaled by batch / 256 (default: the preset's)")
    p.add_argument("--weight-decay", type=float, help="default 0, as both protocols")
    p.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area fraction of the random resized crop (default 0.08 1, as both protocols)")
    p.add_argument("--seed", type=int, help="classifier initialisation and augmentation (default 0)")
    p.add_argument("--output", default="runs/linear", help="run folder: checkpoints, tensorboard, classifier, result.json")
    p.add_argument("--resume", default="auto", help="auto (newest intact checkpoint in --output), never, or a checkpoint folder")
    p.add_argument("--checkpoint-every", type=int, help="steps; checkpoints are also written at every epoch's end")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="also score the validation shards every this many epochs (log only)")
    p.add_argument("--log-every", type=int, default=20, help="steps")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--checkpoint-every": args.checkpoint_every,
                "--keep-checkpoints": args.keep_checkpoints, "--log-every": args.log_every}
    for flag, value in positive.items():
        if value is not None and value < 1:
            p.error(f"{flag} must be positive, got {value}")
    if args.lr is not None and args.lr <= 0 or (args.weight_decay or 0) < 0 or args.eval_every < 0:
        p.error("--lr must be positive, --weight-decay and --eval-every >= 0")
    if args.crop_scale is not None and not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        p.error(f"--crop-scale needs 0 < MIN <= MAX <= 1, got {args.crop_scale}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "base_lr": args.lr,
                 "weight_decay": args.weight_decay, "seed": args.seed,
                 "scale": tuple(args.crop_scale) if args.crop_scale else None}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON only
            result = linear_eval(args.backbone, args.train, args.val, preset=args.preset, overrides=overrides,
                                 output=args.output, resume=args.resume, checkpoint_every=args.checkpoint_every,
                                 keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every,
                                 log_every=args.log_every)
    except (CheckpointError, ShardError, OSError, ValueError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
