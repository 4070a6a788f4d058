"""python launch/evaluate.py --backbone local-dir:FOLDER|CHECKPOINT --train SHARDS --val SHARDS [--knn] [--feature-probe]

Prints JSON: weighted kNN top-1 (k = 20 and 200, temperature 0.1) and feature-probe top-1 of a frozen
backbone, each with balanced accuracy (mean per-class recall), per-class accuracy and many/medium/few-shot
group accuracies (classes grouped by their number of training images; see pipeline.eval.accuracy_report).
The feature probe is a fast check: a linear classifier on precomputed, unaugmented features. Its numbers
are not the standard linear evaluation that papers report (augmented views, the protocol's schedule):
that is launch/linear.py.
`accelerate launch launch/evaluate.py ...` spreads feature extraction over the GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

from data_shards.shards import ShardError, shared_class_names  # noqa: E402
import pipeline.methods  # noqa: E402,F401  (registers the methods a checkpoint's configuration names)
from pipeline.checkpoint import CheckpointError  # noqa: E402
from pipeline.frozen import eval_data_config, load_backbone  # noqa: E402
from pipeline.data.loader import ShardLoader  # noqa: E402
from pipeline.eval import accuracy_report, extract_features, knn_predict, shot_groups, train_linear_probe  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/evaluate.py", description=__doc__.split("\n\n")[1].split("\n")[0])
    p.add_argument("--backbone", required=True, help="local-dir:FOLDER or a checkpoint folder")
    p.add_argument("--train", required=True, help="labeled shards the kNN memory and the probe learn from")
    p.add_argument("--val", required=True, help="labeled shards to score")
    p.add_argument("--knn", action="store_true")
    p.add_argument("--feature-probe", "--linear", dest="feature_probe", action="store_true",
                   help="a linear classifier on precomputed, unaugmented features (a fast check; the standard "
                        "linear evaluation is launch/linear.py)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--feature-probe-epochs", "--linear-epochs", dest="feature_probe_epochs", type=int, default=30)
    p.add_argument("--many-shot", type=int, default=100, help="classes with more training images are many-shot (default 100)")
    p.add_argument("--few-shot", type=int, default=20, help="classes with fewer training images are few-shot (default 20)")
    args = p.parse_args(argv)
    if not 0 <= args.few_shot <= args.many_shot:
        p.error(f"need 0 <= --few-shot <= --many-shot, got {args.few_shot} and {args.many_shot}")
    if not (args.knn or args.feature_probe):
        args.knn = args.feature_probe = True

    state = PartialState()
    device_id = state.local_process_index if state.device.type == "cuda" else None
    try:
        model = load_backbone(args.backbone).to(state.device)
        num_classes = len(shared_class_names(args.train, args.val))
        cfg = eval_data_config(model, args.batch_size)
    except (CheckpointError, ShardError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if state.device.type == "cuda" else None
    features = []
    for folder in (args.train, args.val):
        loader = ShardLoader(folder, cfg, train=False, rank=state.process_index, world_size=state.num_processes, device_id=device_id)
        features.append(extract_features(model, loader, state.device, dtype=dtype))
    (train_x, train_y, _), (val_x, val_y, _) = features
    result = {"backbone": args.backbone, "train_images": train_x.shape[0], "val_images": val_x.shape[0]}
    groups = shot_groups(train_y, num_classes, many=args.many_shot, few=args.few_shot)
    result["train_class_counts"] = torch.bincount(train_y.cpu(), minlength=num_classes).tolist()
    result.update({f"{name}_shot_classes": len(classes) for name, classes in groups.items()})

    def report(prefix: str, top1_key: str, predictions: torch.Tensor) -> None:
        r = accuracy_report(predictions, val_y, train_y, num_classes, many=args.many_shot, few=args.few_shot)
        result[top1_key] = r["top1"]
        result.update({f"{prefix}_{key}": r[key] for key in ("balanced", "per_class", "many", "medium", "few")})

    if args.knn:
        ks = [k for k in (20, 200) if k <= train_x.shape[0]]
        for k, predictions in knn_predict(train_x, train_y, val_x, ks=ks, num_classes=num_classes).items():
            report(f"knn_k{k}", f"knn_top1_k{k}", predictions)
    if args.feature_probe:
        probe = train_linear_probe(train_x, train_y, val_x, val_y, num_classes=num_classes, epochs=args.feature_probe_epochs)
        report("feature_probe", "feature_probe_top1", probe.predictions)
    if state.is_main_process:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
