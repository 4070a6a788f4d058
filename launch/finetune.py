"""python launch/finetune.py --backbone local-dir:FOLDER|CHECKPOINT --train SHARDS --val SHARDS --labels-per-class N

FeatMatch semi-supervised fine-tuning of a pretrained backbone: N labels per class of the training shards,
the rest unlabeled; per-epoch JSON lines on stderr, the final result as JSON on stdout. One process, on a
GPU when there is one (bf16 autocast), else the CPU. The method is described in pipeline/finetune.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data_shards.shards import ShardError  # noqa: E402
import pipeline.methods  # noqa: E402,F401  (registers the methods a checkpoint's configuration names)
from pipeline.checkpoint import CheckpointError  # noqa: E402
from pipeline.finetune import finetune  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/finetune.py", description="FeatMatch semi-supervised fine-tuning")
    p.add_argument("--backbone", required=True, help="local-dir:FOLDER (an export) or a checkpoint folder")
    p.add_argument("--train", required=True, help="labeled training shards (N labels per class are kept)")
    p.add_argument("--val", required=True, help="labeled shards to score")
    p.add_argument("--labels-per-class", type=int, required=True, metavar="N")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256, help="images per step (each gives a weak and a strong view)")
    p.add_argument("--lr", type=float, default=0.03, help="SGD (Nesterov, momentum 0.9) with cosine decay to 0")
    p.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear LR warm-up before the cosine decay, in epochs (default 0: none)")
    p.add_argument("--backbone-lr-scale", type=float, default=1.0, help="backbone lr = lr x this")
    p.add_argument("--weight-decay", type=float, default=5e-4,
                   help="on weights, not on biases, norms and the backbone's no-weight-decay tokens (timm's groups)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this (default: no clipping)")
    p.add_argument("--threshold", type=float, default=0.95, help="pseudo-label confidence for the consistency losses")
    p.add_argument("--lambda-g", type=float, default=1.0, help="weight of L_con-g (strong view through AugF)")
    p.add_argument("--lambda-f", type=float, default=1.0, help="weight of L_con-f (strong view without AugF)")
    p.add_argument("--heads", type=int, default=4, help="attention heads of AugF")
    p.add_argument("--prototypes-per-class", type=int, default=20)
    p.add_argument("--prototype-threshold", type=float, default=None,
                   help="pseudo-label confidence for an unlabeled feature to join its class's k-means (default: --threshold)")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--memory-refresh", choices=("train", "pass"), default="train",
                   help="train: weak-view features recorded during the epoch; pass: an evaluation pass after it")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=False,
                   help="start the classifier as a linear probe on the labeled features (default off)")
    p.add_argument("--seed", type=int, default=0, help="labeled subset, initialisation, augmentation, k-means")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--output", type=Path, default=None, help="write the fine-tuned classifier here")
    args = p.parse_args(argv)
    if args.labels_per_class < 1 or args.epochs < 1 or args.batch_size < 2 or args.heads < 1:
        p.error("--labels-per-class, --epochs and --heads must be positive, --batch-size at least 2")
    if args.prototypes_per_class < 1 or args.kmeans_iters < 0:
        p.error("--prototypes-per-class must be positive and --kmeans-iters >= 0")
    if not 0 <= args.threshold <= 1 or not 0 <= (args.prototype_threshold or 0) <= 1:
        p.error("thresholds are probabilities in [0, 1]")
    if args.warmup_epochs < 0:
        p.error("--warmup-epochs must be >= 0")
    if args.prototype_threshold is None:
        args.prototype_threshold = args.threshold
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: launch/finetune.py runs as one process (WORLD_SIZE > 1 given)", file=sys.stderr)
        return 2
    try:
        result = finetune(args)
    except (CheckpointError, ShardError, OSError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
