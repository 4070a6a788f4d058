#!/usr/bin/env bash
# CIFAR-10 quality in a fixed time: ResNet-18 (CIFAR stem) pretrained on the 45,000 training images of
# CIFAR-10 for at most 8 minutes on one GPU, then weighted kNN top-1 on the 5,000 held-out images.
#   bash benchmarks/cifar10.sh [RECIPE] [key=value ...]     (default recipe: SimCLR)
# Needs ../shared/datasets/cifar10-train.tar.gz (or CIFAR_ARCHIVE=...). Prints epochs reached and kNN.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:-launch/configs/simclr_resnet18_cifar.yaml}
shift || true
archive=${CIFAR_ARCHIVE:-../shared/datasets/cifar10-train.tar.gz}
shards=${CIFAR_SHARDS:-data/cifar10}
out=${OUTPUT:-runs/cifar10-$(basename "$recipe" .yaml)}
minutes=${MINUTES:-8}

if [ ! -f "$shards/val/manifest.json" ]; then
  python -m data_shards.create "$archive" "$shards" --val-fraction 0.1 --workers "$(nproc)" --shard-size-mb 64 --overwrite
fi
# Set EPOCHS so that the cosine schedule ends near the time limit; the limit stops the run regardless.
extra=(train.time_limit_minutes="$minutes" train.knn_every=0)
[ -n "${EPOCHS:-}" ] && extra+=(train.epochs="$EPOCHS")
mkdir -p "$(dirname "$out")"
python launch/pretrain.py --config "$recipe" --data "$shards/train" --val-data "$shards/val" --output "$out" \
  --resume never "${extra[@]}" "$@" | tee "$out.log"
ckpt=$(ls -d "$out"/checkpoints/step-* | tail -n 1)
python - "$ckpt" <<'PY'
import json, sys
meta = json.load(open(f"{sys.argv[1]}/meta.json"))
print(json.dumps({"checkpoint": sys.argv[1], "steps": meta["step"], "epochs": meta["epochs_done"], **meta["metrics"]}))
PY
