"""python -m data_shards.verify OUT: check a shard set in depth: the manifest against the files (counts,
sizes, checksums), each index against the tar it indexes, and every sample (the image decodes, label and
id are in range, the metadata is JSON). Prints each problem with its shard and key; exit 1 on any."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

from data_shards.images import ImageError, prepare_image
from data_shards.shards import (
    IMAGE_EXTS, SAMPLE_EXTS, ShardEntry, ShardError, decimal_problem, read_index, read_manifest, sample_key,
)


def _tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member, read from the tar headers themselves."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def _check_sample(key: str, blobs: dict[str, bytes], expected_id: int, num_classes: int | None) -> list[str]:
    problems = []
    unknown = sorted(set(blobs) - set(SAMPLE_EXTS))
    if unknown:
        problems.append(f"unexpected member(s) {unknown} (never read by the pipeline)")
    images = [ext for ext in IMAGE_EXTS if ext in blobs]
    if len(images) != 1:
        problems.append(f"expected one image member, found {images or 'none'}")
    else:
        try:
            prepared = prepare_image(blobs[images[0]])
            if prepared.converted:
                problems.append("image needs conversion before DALI can decode it")
        except ImageError as e:
            problems.append(f"image: {e}")
    sid = blobs.get("id", b"")
    if sid != str(expected_id).encode():
        problems.append(f"id is {sid.decode(errors='replace')!r}, expected {expected_id}")
    if num_classes is None and "cls" in blobs:
        problems.append("has a label but the set is unlabeled")
    if num_classes is not None:
        problem = decimal_problem(blobs.get("cls", b""), num_classes, "label")
        if problem:
            problems.append(f"{problem} in [0, {num_classes})" if "not a decimal" in problem else problem)
    try:
        json.loads(blobs.get("json", b""))
    except ValueError:
        problems.append("metadata is not JSON")
    return [f"key {key}: {p}" for p in problems]


def verify_shard(folder: Path, shard: ShardEntry, num_classes: int | None) -> list[str]:
    tar_path, idx_path = folder / shard.tar, folder / shard.index
    if not tar_path.is_file():
        return [f"{shard.tar}: missing"]
    data = tar_path.read_bytes()
    problems = []
    if len(data) != shard.bytes:
        problems.append(f"{len(data)} bytes, manifest says {shard.bytes}")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        problems.append("sha256 differs from the manifest")
    try:
        members = _tar_members(tar_path)
    except (tarfile.TarError, OSError, EOFError) as e:
        return [f"{shard.tar}: {p}" for p in [*problems, f"broken tar: {e}"]]
    try:
        index = read_index(idx_path)
    except ShardError as e:
        problems.append(str(e))
        index = None
    listed = [(f"{e.key}.{ext}", off, size) for e in index or [] for ext, (off, size) in e.members.items()]
    if index is not None and listed != members:
        problems.append(f"{shard.index} does not match the tar's members")
    samples: dict[str, dict[str, bytes]] = {}
    for name, off, size in members:
        key, _, ext = name.partition(".")
        samples.setdefault(key, {})[ext] = data[off : off + size]
    if len(samples) != shard.samples:
        problems.append(f"{len(samples)} samples, manifest says {shard.samples}")
    for i, (key, blobs) in enumerate(samples.items()):
        expected = shard.first + i
        if key != sample_key(expected):
            problems.append(f"key {key}: expected key {sample_key(expected)}")
        problems += _check_sample(key, blobs, expected, num_classes)
    return [f"{shard.tar}: {p}" for p in problems]


def verify(folder: str | Path) -> list[str]:
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ShardError as e:
        return [str(e)]
    problems, expected_first = [], 0
    num_classes = len(manifest.class_names) if manifest.class_names is not None else None
    for shard in tqdm(manifest.shards, desc="verify", unit="shard", dynamic_ncols=True):
        if shard.first != expected_first:
            problems.append(f"{shard.tar}: first index {shard.first}, expected {expected_first}")
        expected_first = shard.first + shard.samples
        problems += verify_shard(folder, shard, num_classes)
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_shards.verify", description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a shard folder written by data_shards.create")
    args = p.parse_args(argv)
    problems = verify(args.folder)
    for problem in problems:
        print(problem)
    print(f"{args.folder}: {'OK' if not problems else f'{len(problems)} problem(s)'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
