#!/usr/bin/env bash
# The shards the GPU check needs, made here in one command, packed as one git-ignored archive that travels
# to the GPU machine with the working tree (at most 64 MiB together):
#   bash benchmarks/gpu_data.sh            -> data/gpu-check/shards.tar.gz (GPU_DATA_ARCHIVE to put it elsewhere)
# imagenet/: 256 of the ImageNet sample's JPEGs at full size (decoding costs as in training; 256 fills whole
#   batches of 64 and 128, so no padded batch enters a rate).
# cifar10/train, cifar10/val: all of CIFAR-10's training split, 10% of each class held out, as cifar10.sh makes it.
# Every sample's .cls/.id/.json tar members are mostly padding, which gzip removes (CIFAR-10's shards: 240 MB
# as tars, 21 MB packed); the JPEGs stay as they are.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
datasets=${SHARED_DATASETS:-$root/../shared/datasets}
archive=${GPU_DATA_ARCHIVE:-$root/data/gpu-check/shards.tar.gz}
limit_bytes=$((64 * 2**20))
cd "$root"

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-data.XXXXXX")
trap 'rm -rf "$work"' EXIT
workers=$(nproc)
python -m data_shards.create "$datasets/imagenet-sample-part1.tar" "$work/imagenet" --limit 256 --workers "$workers"
python -m data_shards.create "$datasets/cifar10-train.tar.gz" "$work/cifar10" --val-fraction 0.1 --workers "$workers" \
  --shard-size-mb 64
mkdir -p "$(dirname "$archive")"
tar czf "$archive.partial" -C "$work" imagenet cifar10
mv "$archive.partial" "$archive"

# What travels with the check's call: the tracked files, untracked ones git does not ignore, the archive.
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
tree=$( { git ls-files; git ls-files --others --exclude-standard; } | sort -u | tr '\n' '\0' \
  | xargs -0 du -b 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
packed=$(du -b "$archive" | cut -f1)
total=$((tree + packed))
echo "$archive: $(mib "$packed"); with the working tree ($(mib "$tree")): $(mib "$total") of the 64 MiB one call carries"
if [ "$total" -gt "$limit_bytes" ]; then
  echo "too large to carry in one call: $total bytes > $limit_bytes" >&2
  exit 1
fi
