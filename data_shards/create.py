"""python -m data_shards.create SRC OUT: validate every image and write WebDataset shards, DALI index
files and a manifest.

The whole output (OUT, or OUT/train and OUT/val) is built in a staging folder beside it,
`.OUT.incomplete/new`, and swapped in as one step (an atomic exchange of the two folders where the file
system has one, else two renames that the next run completes or undoes), so an interrupted, refused or failed
run leaves the previous set exactly as it was, and a train/val pair always comes from one run: both
manifests carry its `run_id`, and readers refuse a pair whose ids differ. `.OUT.lock` (fcntl) keeps a
second create out of the same OUT.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
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
    folder.mkdir(parents=True, exist_ok=True)
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


# ------------------------------------------------------------------------ the output folder as a whole

_SET_FILES = (MANIFEST, f".{MANIFEST}.tmp", ".incomplete")  # .incomplete: left by older versions


def _is_set_file(p: Path) -> bool:
    return p.name in _SET_FILES or (p.name.startswith("shard-") and p.suffix in (".tar", ".idx"))


def _resolve(out: Path) -> Path:
    out = Path(os.path.abspath(out))
    out = out.resolve() if out.is_symlink() else out
    if not out.name:
        raise SourceError(f"{out}: cannot be the output folder")
    return out


def lock_path(out: str | os.PathLike) -> Path:
    """The lock a running create holds on OUT (a file beside OUT, so it survives the swap)."""
    out = _resolve(Path(out))
    return out.parent / f".{out.name}.lock"


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.incomplete"


def _lock(out: Path):
    path = lock_path(out)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SourceError(f"{out}: another data_shards.create is writing here (it holds {path}); wait for it to finish") from None
    return handle


def _check_out(out: Path, overwrite: bool) -> None:
    """OUT is absent, an empty folder, or (with --overwrite) a folder holding only a shard set."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SourceError(f"{out}: exists and is not a folder; give a folder (new or empty) for the shard set")
    ours, foreign = [], []
    for p in sorted(out.iterdir()):
        if p.name in ("train", "val") and p.is_dir() and not p.is_symlink():
            for q in sorted(p.iterdir()):
                (ours if _is_set_file(q) else foreign).append(q)
        else:
            (ours if _is_set_file(p) else foreign).append(p)
    if foreign:
        raise SourceError(
            f"{out}: holds {foreign[0].relative_to(out)}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
            + ", not part of a shard set; OUT is replaced as a whole, so nothing else may live in it: "
            "move it or choose another OUT"
        )
    if ours and not overwrite:
        raise SourceError(f"{out}: already holds a shard set ({ours[0].relative_to(out)}); pass --overwrite to replace it")


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(b))


def _swap_in(new: Path, out: Path, staging: Path) -> None:
    """Put the finished `new` at `out` in one step; the previous set (if any) ends up inside `staging`."""
    if not out.exists():
        os.rename(new, out)
        return
    try:
        _exchange(new, out)
        return
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    old = staging / "old"  # a kill between these renames is undone by _recover on the next run
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise


def _recover(out: Path, staging: Path) -> None:
    old = staging / "old"
    if old.is_dir() and not out.exists():
        os.rename(old, out)
        print(f"note: {out}: put back the previous shard set, which an interrupted replace left in {old}", file=sys.stderr)


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _needed_mb(items: list[Item]) -> int:
    total = 0
    for item in items:
        try:
            total += item.size if item.size >= 0 else os.path.getsize(item.path)
        except OSError:  # unreadable: it is reported (and skipped) when it is decoded, and takes no space
            pass
        total += 4 * 512 + 200  # tar headers, padding and index line of a sample
    return math.ceil(total / 2**20)


def _run_id(recorded: dict, class_names, written: dict) -> str:
    """The same for the train and val sets of one run; derived from what was written, so the same inputs
    and seed give the same id (and the same bytes)."""
    content = {"args": recorded, "class_names": class_names,
               "splits": {name: [e.sha256 for e in entries] for name, (entries, _, _) in written.items()}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _report(skipped: list[tuple[str, str]]) -> None:
    if skipped:
        print(f"{len(skipped)} file(s) skipped, first {min(len(skipped), REPORT_FIRST)}:", file=sys.stderr)
        for name, why in skipped[:REPORT_FIRST]:
            print(f"  {name}: {why}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = _resolve(Path(args.out))
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    except (SourceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _create(args, out)
    finally:
        lock.close()


def _create(args: argparse.Namespace, out: Path) -> int:
    staging = _staging(out)
    new = staging / "new"
    try:
        _recover(out, staging)
        _check_out(out, args.overwrite)  # refuse before any work
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
        new.mkdir(parents=True)
        source = open_source(args.src, staging / "source")
        if args.long_tail is not None and source.class_names is None:
            raise SourceError(f"{args.src}: --long-tail needs labels (class folders or a path,label list); this source is unlabeled")
    except (SourceError, OSError) as e:
        shutil.rmtree(staging, ignore_errors=True)
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
            shutil.rmtree(staging)
            print(f"error: --long-tail: class(es) {empty[:REPORT_FIRST]} have no training images", file=sys.stderr)
            return 2
        splits[train] = long_tail_items(splits[train], len(source.class_names), args.long_tail)
        recorded["long_tail"] = args.long_tail

    folders = {name: new / name if args.val_fraction else new for name in splits}
    try:
        pool = multiprocessing.Pool(args.workers) if args.workers > 1 else None
        try:
            written = {name: write_split(split, folders[name], args, pool, name) for name, split in splits.items()}
        finally:
            if pool:
                pool.terminate()
        skipped = source.skipped + [s for _, sk, _ in written.values() for s in sk]
        _report(skipped)
        empty = [name for name, (entries, _, _) in written.items() if not entries]
        if (args.strict and skipped) or empty:
            shutil.rmtree(staging)
            reason = "--strict and files were skipped" if args.strict and skipped else f"no usable image in split {empty}"
            print(f"error: {reason}; nothing was written", file=sys.stderr)
            return 1
        if args.long_tail is not None:  # what was written: a skipped file is not replaced by another
            selected = Counter(item.label for item in splits[train])
            counts = [written[train][2][c] for c in range(len(source.class_names))]
            recorded["long_tail_counts"] = counts
            if counts != [selected[c] for c in range(len(source.class_names))]:
                print(f"warning: skipped files leave the long-tail counts at {counts}", file=sys.stderr)
        run_id = _run_id(recorded, source.class_names, written)
        manifests = {}
        for name, (entries, skipped_here, _) in written.items():
            manifests[name] = Manifest(
                format=FORMAT, split=name, num_samples=sum(e.samples for e in entries),
                class_names=source.class_names, shards=entries,
                skipped=len(skipped_here) + (len(source.skipped) if name == train else 0), args=recorded, run_id=run_id,
            )
            write_manifest(folders[name], manifests[name])
        shutil.rmtree(staging / "source", ignore_errors=True)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(out.parent).free // 2**20
            print(f"error: no space left on {_mount_point(out.parent)} while writing {staging} "
                  f"(needed ~{_needed_mb(items)} MB, {free} MB free); the staging folder was removed and "
                  f"{out} is unchanged", file=sys.stderr)
        else:
            print(f"error: writing {staging}: {e}; the staging folder was removed and {out} is unchanged", file=sys.stderr)
        return 1
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing of OUT lives in staging yet
        raise

    try:
        _swap_in(new, out, staging)
    except OSError as e:
        print(f"error: cannot move {new} to {out}: {e}", file=sys.stderr)
        return 1
    shutil.rmtree(staging, ignore_errors=True)  # the previous set, if any
    for name, manifest in manifests.items():
        folder = out / name if args.val_fraction else out
        print(f"{folder}: {manifest.num_samples} images in {len(manifest.shards)} shard(s), {manifest.skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
