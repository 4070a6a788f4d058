"""python launch/evaluate.py --backbone local-dir:FOLDER|CHECKPOINT --train SHARDS --val SHARDS [--knn] [--linear]

Prints JSON: weighted kNN top-1 (k = 20 and 200, temperature 0.1) and linear-probe top-1 of a frozen
backbone. `accelerate launch launch/evaluate.py ...` spreads feature extraction over the GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

import models  # noqa: E402,F401  (registers the CIFAR-stem ResNet with timm)
from data_shards.shards import ShardError, read_manifest  # noqa: E402
from pipeline.checkpoint import CheckpointError, export_backbone  # noqa: E402
from pipeline.config import DataConfig, ViewRecipe  # noqa: E402
from pipeline.data.loader import ShardLoader  # noqa: E402
from pipeline.eval import extract_features, knn_accuracy, train_linear_probe  # noqa: E402


def load_backbone(spec: str) -> torch.nn.Module:
    """`local-dir:FOLDER` (an export) or a checkpoint folder (exported on the fly)."""
    if spec.startswith("local-dir:"):
        return timm.create_model(spec, pretrained=True)
    with tempfile.TemporaryDirectory() as tmp:
        export_backbone(Path(spec), Path(tmp))
        return timm.create_model(f"local-dir:{tmp}", pretrained=True)


def eval_data_config(model: torch.nn.Module, batch_size: int) -> DataConfig:
    """Resize and crop as the backbone's own config says (input size, crop_pct, normalisation)."""
    data = timm.data.resolve_data_config({}, model=model)
    size = data["input_size"][-1]
    recipe = ViewRecipe(size=size, mean=tuple(data["mean"]), std=tuple(data["std"]))
    return DataConfig(views=[recipe], batch_size=batch_size, eval_size=size, eval_resize=round(size / data["crop_pct"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/evaluate.py", description=__doc__.split("\n\n")[1].split("\n")[0])
    p.add_argument("--backbone", required=True, help="local-dir:FOLDER or a checkpoint folder")
    p.add_argument("--train", required=True, help="labeled shards the kNN memory and the probe learn from")
    p.add_argument("--val", required=True, help="labeled shards to score")
    p.add_argument("--knn", action="store_true")
    p.add_argument("--linear", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--linear-epochs", type=int, default=30)
    args = p.parse_args(argv)
    if not (args.knn or args.linear):
        args.knn = args.linear = True

    state = PartialState()
    device_id = state.local_process_index if state.device.type == "cuda" else None
    try:
        model = load_backbone(args.backbone).to(state.device)
        for folder in (args.train, args.val):
            if read_manifest(folder).class_names is None:
                raise ShardError(f"{folder}: unlabeled shards cannot score a backbone")
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
    if args.knn:
        ks = [k for k in (20, 200) if k <= train_x.shape[0]]
        result.update({f"knn_top1_k{k}": acc for k, acc in knn_accuracy(train_x, train_y, val_x, val_y, ks=ks).items()})
    if args.linear:
        result["linear_top1"] = train_linear_probe(train_x, train_y, val_x, val_y, epochs=args.linear_epochs).accuracy
    if state.is_main_process:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
