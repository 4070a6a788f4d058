"""Training throughput on one GPU: the full path (shards -> DALI -> step) against the same step on
GPU-resident synthetic views (compute only), in one run.

    python benchmarks/train.py --data SHARDS [--config launch/configs/mocov3_vits16_imagenet.yaml]
        [--batch-size 128] [--steps 50] [--warmup 10] [key=value ...]

Prints one JSON line per measurement, then a table; end-to-end / compute-only is the number to watch
(the data path should cost under 10%).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data.loader import ShardLoader  # noqa: E402
from pipeline.methods import build_method  # noqa: E402
from pipeline.train import build_optimizer, deepspeed_config, init_distributed  # noqa: E402


def timed_steps(engine, batches, steps: int, warmup: int) -> float:
    """Seconds for `steps` optimizer steps after `warmup` untimed ones; `batches` yields lists of views."""
    for i, views in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss, _ = engine(views)
        engine.backward(loss)
        engine.step()
        engine.module.after_step(0.5)
        if i + 1 == warmup + steps:
            torch.cuda.synchronize()
            return time.perf_counter() - start
    raise ValueError("the data ran out before the timed steps ended")


def synthetic(views: list[torch.Tensor]):
    while True:
        yield views


def from_shards(loader: ShardLoader):
    while True:
        for batch in loader:
            yield batch.views


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "launch/configs/mocov3_vits16_imagenet.yaml"))
    p.add_argument("--data", required=True, help="training shards (e.g. made from the ImageNet sample)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", help="also append the JSON lines to this file")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train.py measures a GPU step; no CUDA device here")

    cfg = load_config(args.config, [f"data.batch_size={args.batch_size}", f"train.data={args.data}", *args.overrides])
    rank, world_size, local_rank, device = init_distributed()
    method = build_method(cfg)
    optimizer, _ = build_optimizer(method, cfg, world_size, total_steps=10**6, steps_per_epoch=1000)
    engine, *_ = deepspeed.initialize(model=method, optimizer=optimizer, config=deepspeed_config(cfg))
    if cfg.model.compile:
        engine.compile()
    loader = ShardLoader(args.data, cfg.data, device_id=local_rank)

    first = next(iter(loader)).views
    fake = [torch.randn_like(v) for v in first]  # same shapes, dtype and device as the loader's views
    rows = []
    for name, batches in (("compute-only", synthetic(fake)), ("end-to-end", from_shards(loader))):
        seconds = timed_steps(engine, batches, args.steps, args.warmup)
        rows.append({
            "name": name, "images_per_s": args.steps * args.batch_size * world_size / seconds,
            "steps": args.steps, "seconds": seconds, "batch_size": args.batch_size,
            "device": torch.cuda.get_device_name(device), "config": Path(args.config).name,
            "method": cfg.method.name, "backbone": cfg.model.backbone, "precision": cfg.engine.precision,
            "compile": cfg.model.compile, "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        })
    if rank == 0:
        lines = [json.dumps(r) for r in rows]
        print("\n".join(lines))
        if args.json:
            with open(args.json, "a") as f:
                f.write("\n".join(lines) + "\n")
        print(f"\n{'measurement':<14}{'images/s':>10}{'seconds':>9}{'GiB':>7}")
        for r in rows:
            print(f"{r['name']:<14}{r['images_per_s']:>10.0f}{r['seconds']:>9.2f}{r['max_memory_gib']:>7.1f}")
        print(f"end-to-end / compute-only: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
