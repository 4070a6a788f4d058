"""python -m data_shards.create SRC OUT: validate every image and write WebDataset shards, DALI index
files and a manifest.

Work happens in OUT/.incomplete; finished shards are moved into place and the manifest is written last,
so an interrupted or refused run never leaves a manifest that claims shards which are not complete.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from data_shards.images import DEFAULT_MAX_PIXELS, ImageError, prepare_image
from data_shards.shards import FORMAT, MANIFEST, Manifest, ShardWriter, write_manifest
from data_shards.sources import Item, SourceError, open_source

REPORT_FIRST = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_shards.create", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="folder of class folders, flat folder, path[,label] list, or .tar/.tar.gz of a folder")
    p.add_argument("out", help="output folder (with --val-fraction: OUT/train and OUT/val)")
    p.add_argument("--shard-size-mb", type=float, default=256, help="largest shard size (default 256)")
    p.add_argument("--max-side", type=int, default=None, help="downscale images whose longer side exceeds N")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--workers", type=int, default=max(1, (multiprocessing.cpu_count() or 2) - 1))
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order (and of the split)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N files of the seeded order")
    p.add_argument("--strict", action="store_true", help="any unusable file is an error; nothing is written")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction (per class) as OUT/val")
    p.add_argument("--long-tail", type=float, default=None, metavar="FACTOR",
                   help="keep an exponentially decaying number of training images per class (class 0 / last class = FACTOR)")
    p.add_argument("--overwrite", action="store_true", help="replace a shard set already in OUT")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.shard_size_mb <= 0 or (args.limit is not None and args.limit <= 0) or args.workers < 1:
        p.error("--shard-size-mb, --limit and --workers must be positive")
    if args.max_side is not None and args.max_side < 8:
        p.error(f"--max-side must be at least 8, got {args.max_side}")
    if args.long_tail is not None and not (math.isfinite(args.long_tail) and args.long_tail >= 1):
        p.error(f"--long-tail must be a factor >= 1, got {args.long_tail}")
    return args


def split_items(items: list[Item], fraction: float) -> tuple[list[Item], list[Item]]:
    """Hold out round(fraction * n) items of each class (of all, when unlabeled), keeping the order."""
    by_class: dict[int | None, list[Item]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    held = {id(i) for group in by_class.values() for i in group[: round(fraction * len(group))]}
    return [i for i in items if id(i) not in held], [i for i in items if id(i) in held]


def long_tail_counts(available: Sequence[int], factor: float) -> list[int]:
    """Images to keep of classes c = 0..C-1: floor(n_max * factor ** (-c / (C - 1))), at least 1.

    The CIFAR-10/100-LT profile of Cao et al. 2019 (LDAM), rounded down as their code does, so 5,000 images
    per class and factor 100 give 5000, 2997, 1796, ..., 83, 50. `available[c]` is how many images class c
    has; n_max is the largest head count that every class can supply at its place in the profile: the
    class size when all classes are equal, never more than the largest class nor less than the smallest.
    The counts therefore always follow the profile exactly, whatever the class sizes.
    """
    if not available or min(available) < 1:
        raise ValueError(f"every class needs at least one image, got {list(available)}")
    if factor < 1:
        raise ValueError(f"the long-tail factor must be >= 1, got {factor}")
    last = max(len(available) - 1, 1)
    ratios = [factor ** (-c / last) for c in range(len(available))]

    def counts(n_max: int) -> list[int]:
        return [max(1, math.floor(n_max * r + 1e-9)) for r in ratios]  # 1e-9: 49.99999999 is 50

    n_max = min(max(available), *(math.floor(a / r + 1e-9) for a, r in zip(available, ratios)))
    while any(k > a for k, a in zip(counts(n_max), available)):  # float rounding at the boundary
        n_max -= 1
    return counts(n_max)


def long_tail_items(items: list[Item], num_classes: int, factor: float) -> list[Item]:
    """Keep the first long_tail_counts(...)[c] items of each class c, in the given (seeded) order."""
    available = Counter(item.label for item in items)
    counts = long_tail_counts([available[c] for c in range(num_classes)], factor)
    taken: Counter = Counter()
    kept = []
    for item in items:
        if taken[item.label] < counts[item.label]:
            taken[item.label] += 1
            kept.append(item)
    return kept


def _prepare(job: tuple[Item, int | None, int]):
    item, max_side, max_pixels = job
    try:
        return prepare_image(item.read(), max_pixels=max_pixels, max_side=max_side), None
    except (ImageError, OSError) as e:
        return None, str(e)


def _members(image, item: Item, index: int) -> list[tuple[str, bytes]]:
    meta = {"source": item.name, "width": image.width, "height": image.height}
    members = [(image.ext, image.data)]
    if item.label is not None:
        members.append(("cls", str(item.label).encode()))
    members.append(("id", str(index).encode()))
    members.append(("json", json.dumps(meta, sort_keys=True).encode()))
    return members


def write_split(items, folder: Path, args, pool, desc: str):
    """Write one shard set into `folder`; returns (shard entries, [(name, reason) skipped], {label: written})."""
    folder.mkdir(parents=True)
    writer, skipped, index, per_label = ShardWriter(folder, int(args.shard_size_mb * 2**20)), [], 0, Counter()
    jobs = ((item, args.max_side, args.max_pixels) for item in items)
    results = pool.imap(_prepare, jobs, chunksize=8) if pool else map(_prepare, jobs)
    with tqdm(total=len(items), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for item, (image, error) in zip(items, results):
            if error is None:
                writer.add(index, _members(image, item, index))
                per_label[item.label] += 1
                index += 1
            else:
                skipped.append((item.name, error))
                bar.set_postfix(skipped=len(skipped), refresh=False)
            bar.update()
    return writer.close(), skipped, per_label


def _clear_target(folder: Path, overwrite: bool) -> None:
    old = [folder / MANIFEST, *folder.glob("shard-*.tar"), *folder.glob("shard-*.idx")] if folder.is_dir() else []
    old = [p for p in old if p.exists()]
    if old and not overwrite:
        raise SourceError(f"{folder}: already holds a shard set ({old[0].name}); pass --overwrite to replace it")
    for p in sorted(old, key=lambda p: p.name != MANIFEST):  # the manifest goes first
        p.unlink()


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    targets = {"train": out / "train", "val": out / "val"} if args.val_fraction else {"all": out}
    work = out / ".incomplete"
    try:
        if not args.overwrite:  # refuse before any work; with --overwrite the old set goes at the end
            for folder in targets.values():
                _clear_target(folder, overwrite=False)
        shutil.rmtree(work, ignore_errors=True)  # leftovers of an interrupted run
        work.mkdir(parents=True)
        source = open_source(args.src, work / "source")
        if args.long_tail is not None and source.class_names is None:
            raise SourceError(f"{args.src}: --long-tail needs labels (class folders or a path,label list); this source is unlabeled")
    except SourceError as e:
        shutil.rmtree(work, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2

    items = list(source.items)
    random.Random(args.seed).shuffle(items)
    items = items[: args.limit]
    splits = dict(zip(["train", "val"], split_items(items, args.val_fraction))) if args.val_fraction else {"all": items}
    recorded = {k: getattr(args, k) for k in ("src", "shard_size_mb", "max_side", "max_pixels", "seed", "limit", "val_fraction")}
    train = "train" if args.val_fraction else "all"  # the held-out split was taken first and stays balanced
    if args.long_tail is not None:
        have = Counter(item.label for item in splits[train])
        empty = [name for c, name in enumerate(source.class_names) if not have[c]]
        if empty:  # every class has a place in the profile and must keep at least one image
            shutil.rmtree(work)
            print(f"error: --long-tail: class(es) {empty[:REPORT_FIRST]} have no training images", file=sys.stderr)
            return 2
        splits[train] = long_tail_items(splits[train], len(source.class_names), args.long_tail)
        recorded["long_tail"] = args.long_tail

    pool = multiprocessing.Pool(args.workers) if args.workers > 1 else None
    try:
        written = {name: write_split(split, work / name, args, pool, name) for name, split in splits.items()}
    finally:
        if pool:
            pool.terminate()
    skipped = [s for _, sk, _ in written.values() for s in sk]
    if skipped:
        print(f"{len(skipped)} file(s) skipped, first {min(len(skipped), REPORT_FIRST)}:", file=sys.stderr)
        for name, why in skipped[:REPORT_FIRST]:
            print(f"  {name}: {why}", file=sys.stderr)
    empty = [name for name, (entries, _, _) in written.items() if not entries]
    if (args.strict and skipped) or empty:
        shutil.rmtree(work)
        reason = "--strict and files were skipped" if args.strict and skipped else f"no usable image in split {empty}"
        print(f"error: {reason}; nothing was written", file=sys.stderr)
        return 1
    if args.long_tail is not None:  # what was written: a skipped file is not replaced by another
        selected = Counter(item.label for item in splits[train])
        counts = [written[train][2][c] for c in range(len(source.class_names))]
        recorded["long_tail_counts"] = counts
        if counts != [selected[c] for c in range(len(source.class_names))]:
            print(f"warning: skipped files leave the long-tail counts at {counts}", file=sys.stderr)

    for name, (entries, skipped_here, _) in written.items():
        folder = targets[name]
        folder.mkdir(parents=True, exist_ok=True)
        _clear_target(folder, overwrite=True)
        for entry in entries:
            for file in (entry.tar, entry.index):
                (work / name / file).replace(folder / file)
        manifest = Manifest(
            format=FORMAT, split=name, num_samples=sum(e.samples for e in entries),
            class_names=source.class_names, shards=entries, skipped=len(skipped_here), args=recorded,
        )
        write_manifest(folder, manifest)
        print(f"{folder}: {manifest.num_samples} images in {len(entries)} shard(s), {len(skipped_here)} skipped")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
