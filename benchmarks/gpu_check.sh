#!/usr/bin/env bash
# The GPU check in one call: every GPU path and benchmark of the project, in a fixed order, each step under
# its own time budget (a step that fails or runs out of time is recorded and the next one starts), then
# one report under OUT_DIR: gpu_check.json, gpu_check.md (figure, target, pass/fail) and gpu_check.log.
#   bash benchmarks/gpu_check.sh [--dry-run] [--only STEP,...] OUT_DIR
# --dry-run prints the plan (steps, budgets, commands) on any machine and runs nothing; --only reruns some
# steps (data always runs first) or runs the extra one: `--only recipes`, each recipe's 25-epoch loss curve
# on the digits (benchmarks/recipe_curves.py), a second call of 5 minutes. Without CUDA the GPU steps are "skipped: no CUDA" and the report is
# still written. Data: the archive benchmarks/gpu_data.sh makes (GPU_DATA_ARCHIVE to use another).
# The budgets add up to 6 minutes on one H200; see benchmarks/README.md for the calls that bring the
# packages there first.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

dry_run=0 only="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --only) only=${2:?--only needs a comma-separated list of steps}; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
if [ -z "$out" ] && [ "$dry_run" = 0 ]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--only STEP,...] OUT_DIR" >&2
  exit 2
fi
archive=$(absolute "${GPU_DATA_ARCHIVE:-$root/data/gpu-check/shards.tar.gz}")
[ -n "$out" ] && out=$(absolute "$out")
cd "$root"

# name | budget (s) | needs (cuda, data) | command. WORK is a scratch folder; the commands run in the repo root.
# The GPU tests are mostly Triton compiles (every new kernel specialisation autotunes 13 configurations):
# pytest-xdist spreads them over the 16 cores when it is installed, and fp32 kernels at D >= 128, whose ieee
# dots unroll into FMAs that take minutes per configuration to compile (tests/test_triton_aot.py), stay out.
# Budgets: an H200 should run each well inside its own (benchmarks/README.md, gpu_check.sh), and the whole
# stays at 6 minutes, so a failed step can be rerun within the session's 15 minutes of device time.
STEPS=(
  'data|15||mkdir -p "$WORK/data" && tar xzf "$ARCHIVE" -C "$WORK/data" && du -sh "$WORK"/data/*'
  'tests|90|cuda|python -m pytest -v -m gpu -k "not (float32 and (many_tiles or feature_dims))" -rfEs -p no:cacheprovider --junitxml="$WORK/tests.xml" $(python -c "import xdist" 2>/dev/null && echo "-n 16")'
  'infonce|50|cuda|python benchmarks/infonce.py --sizes 16384 65536 262144 --shapes 512x32768 8960x25088 25088x25088 --dims 256 --json "$WORK/infonce.jsonl"'
  'loader|45|cuda data|python benchmarks/loader.py --shards "$WORK/data/imagenet" --device gpu --batch-size 64 --batches 200 --baseline-batches 16 --hw-decoder-loads 0 0.5 0.65 0.8 0.95 --json "$WORK/loader.jsonl"'
  'train|45|cuda data|python benchmarks/train.py --data "$WORK/data/imagenet" --batch-size 128 --steps 30 --warmup 10 --json "$WORK/train.jsonl" engine.zero_stage=2 engine.precision=bf16'
  'cifar10|115|cuda data|CIFAR_SHARDS="$WORK/data/cifar10" OUTPUT="$WORK/cifar10-run" MINUTES=1.5 EPOCHS=40 bash benchmarks/cifar10.sh launch/configs/simclr_resnet18_cifar.yaml train.checkpoint_every=1000000'
  # extra: only when named in --only, as a second call (it would take the one call past 10 minutes)
  'recipes|300|cuda extra|python benchmarks/recipe_curves.py --epochs 25 --parallel 4 --json "$WORK/recipes.jsonl"'
)

selected() {  # name needs. data always runs: the other steps read what it unpacks; an extra step only when named
  [ "$1" = data ] || [[ ",$only," == *",$1,"* ]] || { [ -z "$only" ] && [[ $2 != *extra* ]]; }
}

names=" ${STEPS[*]%%|*} "
for name in ${only//,/ }; do
  [[ $names == *" $name "* ]] || { echo "--only: no step '$name' (steps:$names)" >&2; exit 2; }
done

if [ "$dry_run" = 1 ]; then
  total=0
  echo "GPU check plan: in order, each step under its budget (timeout), a failure recorded and the next step run;"
  echo "then benchmarks/gpu_report.py writes OUT_DIR/gpu_check.{json,md,log}. ARCHIVE=$archive, WORK=a scratch folder."
  for spec in "${STEPS[@]}"; do
    IFS='|' read -r name budget needs command <<< "$spec"
    selected "$name" "$needs" || continue
    total=$((total + budget))
    printf '  %-8s %4d s  needs: %-10s %s\n' "$name" "$budget" "${needs:--}" "$command"
  done
  echo "budgets: $total s in all"
  exit 0
fi

mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/logs" "$work/bin"
command -v python >/dev/null || ln -s "$(command -v python3)" "$work/bin/python"  # the GPU machine may have only python3
export PATH="$work/bin:$PATH" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export WORK="$work" ARCHIVE="$archive"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/gpu-check-triton-cache}  # kept between warm calls: a rerun compiles nothing twice
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # DeepSpeed's JIT ops do not build for 9.0a

# What ran where: date, device, package versions (run.json for the report).
python - "$work/run.json" <<'PY'
import datetime, json, subprocess, sys
from importlib import metadata
run = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
try:
    import torch
    run["cuda"] = torch.cuda.is_available()
    run["device"] = torch.cuda.get_device_name(0) if run["cuda"] else "no CUDA device"
except ImportError:
    run["cuda"], run["device"] = False, "no torch"
wanted = ("torch", "triton", "nvidia-dali", "deepspeed", "timm", "pytest-xdist")  # versions without importing them
found = {d.metadata["Name"].lower(): d.version for d in metadata.distributions() if d.metadata["Name"]}
run["packages"] = {w: next((f"{v}" if n == w else f"{v} ({n})" for n, v in sorted(found.items()) if n.startswith(w)), "missing")
                   for w in wanted}
rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
run["revision"] = rev.stdout.strip() or "not a git checkout"
json.dump(run, open(sys.argv[1], "w"))
print(json.dumps(run))
PY
cuda=$(python -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["cuda"]))' "$work/run.json" 2>/dev/null || echo 0)

data_ok=0
for spec in "${STEPS[@]}"; do
  IFS='|' read -r name budget needs command <<< "$spec"
  selected "$name" "$needs" || continue
  log="$work/logs/$name.log"
  start=$(date +%s%N)
  if [[ $needs == *cuda* ]] && [ "$cuda" != 1 ]; then
    status="skipped: no CUDA" rc=null
  elif [[ $needs == *data* ]] && [ "$data_ok" != 1 ]; then
    status="skipped: no data (step data failed)" rc=null
  else
    echo ">>> $name (budget ${budget} s): $command"
    timeout --kill-after=10 "$budget" bash -c "$command" > "$log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="timed out after ${budget} s" ;;
      *) status="failed (exit $rc)" ;;
    esac
    [ "$name" = data ] && [ "$rc" = 0 ] && data_ok=1
  fi
  tenths=$((($(date +%s%N) - start) / 100000000))
  echo "<<< $name: $status ($((tenths / 10)) s)"
  printf '{"step": "%s", "budget_s": %d, "seconds": %d.%d, "status": "%s", "exit_code": %s}\n' \
    "$name" "$budget" $((tenths / 10)) $((tenths % 10)) "$status" "$rc" >> "$work/steps.jsonl"
done

python benchmarks/gpu_report.py "$work" "$out"
