"""python launch/finetune.py --backbone local-dir:FOLDER|CHECKPOINT --train SHARDS --val SHARDS --labels-per-class N

FeatMatch semi-supervised fine-tuning of a pretrained backbone: N labels per class of the training shards,
the rest unlabeled; per-epoch JSON lines on stderr, the final result as JSON on stdout. One process, on a
GPU when there is one (bf16 autocast), else the CPU. The method is described in pipeline/finetune.py.

`--form released` (default) is GT-RIPL/FeatMatch's training with its CIFAR settings (config/cifar10/*.json:
T 0.75, loss.mix 0.5, loss.graph 2.0, pk 20, l_ratio 0.5, K 8 RandAugment views, bsl 64 of 192, ramp-up over
75k of 183k iterations, 3k of them without AugF, lr 0.04, momentum 0.95, weight decay 2e-4, prototypes every
500 iterations; model/model.py: attention dropout 0.1); `--form fixmatch` is this project's first form (hard
pseudo-labels over --threshold, one colour-jitter strong view, weights 1 and 1, cosine schedule). Options
left unset take their form's value (FORM_DEFAULTS).
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

FORM_DEFAULTS = {
    "released": {"lambda_g": 0.5, "lambda_f": 2.0, "rampup": 75 / 183, "attention_dropout": 0.1, "strong_views": 8,
                 "strong_aug": "randaugment", "prototype_threshold": 0.5, "schedule": "released", "lr": 0.04,
                 "momentum": 0.95, "weight_decay": 2e-4, "prototype_every": 500},
    "fixmatch": {"lambda_g": 1.0, "lambda_f": 1.0, "rampup": 0.0, "attention_dropout": 0.0, "strong_views": 1,
                 "strong_aug": "jitter", "prototype_threshold": None,  # None: --threshold
                 "schedule": "cosine", "lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4, "prototype_every": 0},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/finetune.py", description="FeatMatch semi-supervised fine-tuning")
    p.add_argument("--backbone", required=True, help="local-dir:FOLDER (an export) or a checkpoint folder")
    p.add_argument("--train", required=True, help="labeled training shards (N labels per class are kept)")
    p.add_argument("--val", required=True, help="labeled shards to score")
    p.add_argument("--labels-per-class", type=int, required=True, metavar="N")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--form", choices=sorted(FORM_DEFAULTS), default="released",
                   help="released: the official training step (mixup, sharpening, ramp-up); fixmatch: hard thresholded pseudo-labels")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (each gives a weak and --strong-views strong views)")
    p.add_argument("--labeled-batch", type=int, default=None,
                   help="labeled images in every batch, from an endless sampler of the labeled subset (released: "
                        "batch/3, as the official 64 of 192; fixmatch: 0, none apart)")
    p.add_argument("--schedule", choices=("released", "cosine"), default=None,
                   help="released (released form): the official 3k AugF-free steps of 183k, cyclic lr, decay on every "
                        "parameter; cosine (fixmatch form): cosine decay, timm's weight-decay groups (see pipeline/finetune.py)")
    p.add_argument("--lr", type=float, default=None, help="peak SGD (Nesterov) lr (released 0.04, fixmatch 0.03)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (released 0.95, fixmatch 0.9)")
    p.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="--schedule cosine: linear LR warm-up before the cosine decay, in epochs (default 0: none)")
    p.add_argument("--backbone-lr-scale", type=float, default=1.0, help="backbone lr = lr x this")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="released 2e-4 on every parameter; fixmatch 5e-4 on weights, not on biases, norms and the "
                        "backbone's no-weight-decay tokens (timm's groups)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this (default: no clipping)")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="fixmatch: pseudo-label confidence for the consistency losses (released: monitoring only)")
    p.add_argument("--lambda-g", type=float, default=None, help="weight of L_con-g, through AugF (released 0.5, fixmatch 1)")
    p.add_argument("--lambda-f", type=float, default=None, help="weight of L_con-f, without AugF (released 2, fixmatch 1)")
    p.add_argument("--temperature", type=float, default=0.75, help="released: sharpening of the pseudo-labels")
    p.add_argument("--rampup", type=float, default=None,
                   help="share of the steps over which the consistency weight rises linearly to 1 (released 75/183, fixmatch 0)")
    p.add_argument("--strong-views", type=int, default=None, help="strong views per image (released 8, fixmatch 1)")
    p.add_argument("--strong-aug", choices=("randaugment", "jitter"), default=None,
                   help="strong views: the official RandomAugment in DALI (released) or colour jitter (fixmatch)")
    p.add_argument("--heads", type=int, default=4, help="attention heads of AugF")
    p.add_argument("--attention-dropout", type=float, default=None, help="dropout on AugF's attention weights (released 0.1, fixmatch 0)")
    p.add_argument("--prototypes-per-class", type=int, default=20)
    p.add_argument("--prototype-threshold", type=float, default=None,
                   help="pseudo-label confidence for an unlabeled feature to join its class's k-means (released: 0.5, "
                        "halved while a class has too few; fixmatch: --threshold)")
    p.add_argument("--prototype-every", type=int, default=None, metavar="STEPS",
                   help="extract prototypes every STEPS steps (released 500, as the official sample_interval); 0: at "
                        "every epoch's end (fixmatch)")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--memory-refresh", choices=("train", "pass"), default="train",
                   help="train: weak-view features recorded during the epoch; pass: an evaluation pass after it")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=False,
                   help="start the classifier as a linear probe on the labeled features (default off)")
    p.add_argument("--seed", type=int, default=0, help="labeled subset, initialisation, augmentation, k-means")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--output", type=Path, default=None, help="write the fine-tuned classifier here")
    args = p.parse_args(argv)
    for key, value in FORM_DEFAULTS[args.form].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.labeled_batch is None:  # released: bsl 64 of 192; fixmatch: no sampler, as that form first ran
        args.labeled_batch = args.batch_size // 3 if args.form == "released" else 0
    if args.labels_per_class < 1 or args.epochs < 1 or args.batch_size < 2 or args.heads < 1:
        p.error("--labels-per-class, --epochs and --heads must be positive, --batch-size at least 2")
    if args.prototypes_per_class < 1 or args.kmeans_iters < 0:
        p.error("--prototypes-per-class must be positive and --kmeans-iters >= 0")
    if not 0 <= args.threshold <= 1 or not 0 <= (args.prototype_threshold or 0) <= 1:
        p.error("thresholds are probabilities in [0, 1]")
    if args.warmup_epochs < 0 or (args.warmup_epochs and args.schedule != "cosine"):
        p.error("--warmup-epochs must be >= 0, and is for --schedule cosine alone")
    if args.lr <= 0 or not 0 <= args.momentum < 1 or args.weight_decay < 0 or args.prototype_every < 0:
        p.error("--lr must be positive, --momentum in [0, 1), --weight-decay and --prototype-every >= 0")
    if not 0 <= args.labeled_batch < args.batch_size:
        p.error("--labeled-batch must be in [0, --batch-size)")
    if args.strong_views < 1 or (args.form == "fixmatch" and args.strong_views != 1):
        p.error("--strong-views must be positive, and 1 with --form fixmatch")
    if not 0 <= args.rampup <= 1 or not 0 <= args.attention_dropout < 1 or args.temperature <= 0:
        p.error("--rampup must be in [0, 1], --attention-dropout in [0, 1), --temperature positive")
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
