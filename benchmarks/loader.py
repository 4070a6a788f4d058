"""Loader throughput: the project's DALI `ShardLoader` against a torchvision CPU `DataLoader`, in one run, on
the same shards and the same `ViewRecipe`s; plus the images/s of `data_shards.create` that made the shards.

    python benchmarks/loader.py                      # BYOL at 224, 2 views, batch 64, every device there is
    python benchmarks/loader.py --device cpu --batch-size 32 --batches 5 --json out.jsonl

Prints one JSON line per measurement (or writes them to --json), then a table with DALI / torchvision.
`--device auto` runs DALI on the GPU (one row per --hw-decoder-loads value) when CUDA is available, and on
the CPU always; DALI gets --workers threads, the same CPU budget as the torchvision workers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project need not be installed (the GPU machine gets bare wheels)

from data_shards import create  # noqa: E402
from data_shards.shards import read_index, read_manifest  # noqa: E402
from pipeline.config import Blur, ColorJitter, DataConfig, RandAugment, ViewPreset, ViewRecipe  # noqa: E402
from pipeline.data.loader import ShardLoader  # noqa: E402

# The recipe fields torchvision_view maps; a field added to the config fails loudly here instead of drifting.
MAPPED_FIELDS = {
    ViewRecipe: {"size", "scale", "ratio", "flip", "color_jitter", "grayscale", "blur", "solarize", "interpolation", "translate",
                 "rand_augment", "mean", "std"},
    ColorJitter: {"brightness", "contrast", "saturation", "hue", "probability", "form"},  # form: torchvision's either way
    Blur: {"probability", "sigma"},
    RandAugment: {"n", "m", "bins", "form"},  # form: torchvision's RandAugment either way (a speed baseline)
}
INTERPOLATION = {"linear": v2.InterpolationMode.BILINEAR, "cubic": v2.InterpolationMode.BICUBIC}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="../shared/datasets/imagenet-sample-part1.tar", help="relative to the repo root")
    p.add_argument("--shards", type=Path, help="reuse this shard set instead of creating one (no create row)")
    p.add_argument("--preset", choices=["simclr", "byol", "multicrop"], default="byol")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (>= 1; the first is checked)")
    timed = p.add_mutually_exclusive_group()
    timed.add_argument("--batches", type=int, default=30, help="timed batches")
    timed.add_argument("--epochs", type=int, help="timed epochs instead (floor(N / batch) batches each)")
    p.add_argument("--baseline-batches", type=int,
                   help="timed torchvision batches, if not as many as DALI's (it is often 100x slower)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="torchvision workers = DALI threads")
    p.add_argument("--create-workers", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default="auto")
    p.add_argument("--hw-decoder-loads", type=float, nargs="+", default=[0.0, 0.65, 0.9])
    p.add_argument("--json", type=Path, help="write the JSON lines here instead of stdout")
    args = p.parse_args(argv)
    optional = [n for n in (args.epochs, args.baseline_batches) if n is not None]
    if min(args.batch_size, args.warmup, args.batches, *optional, args.workers) < 1:
        p.error("--batch-size, --warmup, --batches, --epochs, --baseline-batches and --workers must be positive")
    return args


def torchvision_view(recipe: ViewRecipe) -> v2.Compose:
    """The DALI graph's recipe in torchvision v2 (PIL until the end, as the usual SSL loaders do)."""
    for model, fields in MAPPED_FIELDS.items():
        if set(model.model_fields) != fields:
            raise RuntimeError(f"{model.__name__} fields changed: {sorted(set(model.model_fields) ^ fields)}")
    ops = [
        v2.RandomResizedCrop(recipe.size, scale=recipe.scale, ratio=recipe.ratio, antialias=True, interpolation=INTERPOLATION[recipe.interpolation]),
        v2.RandomHorizontalFlip(recipe.flip),
    ]
    if recipe.translate:
        ops.append(v2.RandomCrop(recipe.size, padding=recipe.translate))
    if (r := recipe.rand_augment) is not None:
        ops.append(v2.RandAugment(num_ops=r.n, magnitude=r.m, num_magnitude_bins=r.bins))
    if (j := recipe.color_jitter) is not None:
        ops.append(v2.RandomApply([v2.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue)], p=j.probability))
    ops.append(v2.RandomGrayscale(recipe.grayscale))
    if (b := recipe.blur) is not None:
        kernel = int(0.1 * recipe.size) // 2 * 2 + 1  # ~10% of the view, odd (23 at 224, as in SimCLR/BYOL)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=b.sigma)], p=b.probability))
    ops += [
        v2.RandomSolarize(128, p=recipe.solarize),  # DALI's table inverts values >= 128 too
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(recipe.mean, recipe.std),
    ]
    return v2.Compose(ops)


class ShardImages(Dataset):
    """The shard set's images, found through the DALI index files; item i is one view per transform."""

    def __init__(self, folder: Path, transforms: list[v2.Compose]):
        self.transforms = transforms
        self.members = [
            (folder / shard.tar, *(entry.members.get("jpg") or entry.members["png"]))
            for shard in read_manifest(folder).shards
            for entry in read_index(folder / shard.index)
        ]

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        path, offset, size = self.members[i]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return [t(image) for t in self.transforms]


def endless(loader):
    """Epoch after epoch (ShardLoader yields one epoch per iter())."""
    while True:
        yield from loader


def measure(name: str, views, warmup: int, timed: int, recipes, cuda: bool, device: str, settings: dict) -> dict:
    """Images/s over `timed` batches after `warmup` (start-up, prefetch queues filling); the first batch
    is also checked: one [B, 3, size, size] float32 tensor per recipe."""
    first = next(views)
    batch_size = first[0].shape[0]
    expected = [(batch_size, 3, r.size, r.size) for r in recipes]
    if [tuple(v.shape) for v in first] != expected or any(v.dtype != torch.float32 for v in first):
        raise RuntimeError(f"{name}: views {[(tuple(v.shape), v.dtype) for v in first]}, expected {expected} float32")
    for _ in range(warmup - 1):
        next(views)
    if cuda:
        torch.cuda.synchronize()  # the clock starts and stops with the GPU idle
    start = time.perf_counter()
    for _ in range(timed):
        next(views)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # mean/std of the first batch's views: a cheap sign that both sides normalise alike
    stats = [[round(v.mean().item(), 3), round(v.std().item(), 3)] for v in first]
    images = timed * batch_size
    return dict(name=name, images_per_s=images / seconds, batches=timed, seconds=seconds, device=device,
                images=images, settings={**settings, "first_batch_mean_std": stats})


def create_shards(source: Path, out: Path, workers: int, device: str) -> dict:
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its summary line would break the JSON lines
        rc = create.main([str(source), str(out), "--workers", str(workers)])
    seconds = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"data_shards.create failed on {source} (exit {rc})")
    manifest = read_manifest(out)
    images = manifest.num_samples + manifest.skipped
    return dict(name=f"create --workers {workers}", images_per_s=images / seconds, batches=None, seconds=seconds,
                device=device, images=images, settings={"source": str(source), "workers": workers})


def run(args, shards: Path, report) -> None:
    cuda = torch.cuda.is_available()
    if args.device == "gpu" and not cuda:
        raise SystemExit("--device gpu: CUDA is not available")
    gpu_runs = args.device in ("gpu", "auto") and cuda
    cpu_name = f"cpu ({os.cpu_count()} cores)"
    gpu_name = f"cuda:0 {torch.cuda.get_device_name(0)}" if gpu_runs else None
    preset = ViewPreset(preset=args.preset, size=args.size)
    recipes = preset.recipes()
    common = dict(shards=str(shards), preset=args.preset, size=args.size, views=len(recipes),
                  batch_size=args.batch_size, warmup=args.warmup, dtype="float32")
    timed = args.batches
    if args.epochs:
        timed = args.epochs * (read_manifest(shards).num_samples // args.batch_size)

    # Baseline first: its workers fork before any DALI pipeline (and its threads) exists. With a GPU in use
    # the batches go there (pinned, non-blocking), as a training step would need them.
    target = "cuda" if gpu_runs else "cpu"
    dataset = ShardImages(shards, [torchvision_view(r) for r in recipes])
    # Each worker makes whole batches, so they arrive `workers` at a time: count whole rounds, or a clock
    # started or stopped mid-round is off by up to a round.
    warmup, steps = (-(-n // args.workers) * args.workers for n in (args.warmup, args.baseline_batches or timed))
    # One sampler pass spans all epochs, so workers never drain at an epoch's end (DALI's reader does not
    # either); with a small set that would leave most of them idle.
    sampler = RandomSampler(dataset, num_samples=(warmup + steps) * args.batch_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.workers, pin_memory=gpu_runs)
    views = ([v.to(target, non_blocking=True) for v in batch] for batch in loader)
    settings = {**common, "warmup": warmup, "workers": args.workers, "decode": "PIL", "to": target}
    report(measure(f"torchvision ({args.workers} workers)", views, warmup, steps, recipes, gpu_runs,
                   gpu_name or cpu_name, settings))
    del views, loader  # stop the workers before DALI runs

    variants = [(f"dali gpu hw_decoder_load={load}", 0, {"hw_decoder_load": load}) for load in args.hw_decoder_loads]
    variants = variants if gpu_runs else []
    if args.device in ("cpu", "auto"):
        variants.append((f"dali cpu ({args.workers} threads)", None, {}))
    for name, device_id, overrides in variants:
        cfg = DataConfig(views=preset, batch_size=args.batch_size, num_threads=args.workers, **overrides)
        dali = ShardLoader(shards, cfg, train=True, device_id=device_id)
        on_gpu = device_id is not None
        # ShardLoader decodes and drops padded_steps - steps_per_epoch batches per epoch: in the time, not the count
        settings = {**common, "threads": args.workers, "decode": "mixed" if on_gpu else "cpu", **overrides,
                    "steps_per_epoch": dali.steps_per_epoch, "padded_steps": dali.padded_steps}
        views = (batch.views for batch in endless(dali))
        report(measure(name, views, args.warmup, timed, recipes, on_gpu, gpu_name if on_gpu else cpu_name, settings))
        del views, dali  # free its threads and GPU memory before the next variant


def table(records: list[dict]) -> str:
    base = next((r["images_per_s"] for r in records if r["name"].startswith("torchvision")), None)
    rows = [("measurement", "device", "images/s", "batches", "seconds", "DALI/torchvision")]
    for r in records:
        ratio = f"{r['images_per_s'] / base:.2f}" if base and r["name"].startswith("dali") else ""
        rows.append((r["name"], r["device"], f"{r['images_per_s']:.1f}", str(r["batches"] or ""),
                     f"{r['seconds']:.2f}", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    records: list[dict] = []
    out = open(args.json, "w") if args.json else sys.stdout

    def report(record: dict) -> None:  # written as measured, so a run cut short keeps what it has
        records.append(record)
        out.write(json.dumps(record) + "\n")
        out.flush()

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        shards = args.shards
        if shards is None:
            shards = Path(tmp) / "shards"
            source = ROOT / args.source  # an absolute --source stays as it is
            report(create_shards(source, shards, args.create_workers, f"cpu ({os.cpu_count()} cores)"))
        run(args, shards, report)
    if args.json:
        out.close()
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
