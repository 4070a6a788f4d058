"""Each recipe's loss curve and kNN on the embedded digits: does it learn, or stall at chance?

    python benchmarks/recipe_curves.py [--recipes NAME ...] [--epochs 25] [--max-steps N]
                                       [--precision bf16|fp32] [--batch-size 128] [--json curves.jsonl]

Every recipe of launch/configs (or those named) runs through `launch/pretrain.py`, the real main job, on
the digits (1,438 train / 359 val images) with only what the digits force changed, printed per recipe:
the batch (the digits hold 11 batches of 128; LRs scale with it where the recipe says `optim.scale_lr`),
ImageNet-sized views shrunk to `--image-size`, queues no longer than the data. The schedules are
those of `--epochs` epochs (warm-up included: a recipe with more warm-up epochs than that gets a third);
`--max-steps` stops a run early on a slow machine while keeping them. The table gives the mean loss of the
first and last epoch run, the loss at chance (where the method's loss has one) and kNN top-1 (k = 20,
tau = 0.1) before and after. A digits kNN near 95% at step 0 is a randomly initialised ResNet with
torchvision's initialisation: there, learning shows in the loss, not in kNN.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.methods  # noqa: E402,F401  (registers the methods load_config validates against)
from pipeline.config import ViewPreset, load_config  # noqa: E402

CONFIGS = ROOT / "launch" / "configs"
SAMPLE = ROOT / "data" / "sample"
STEP = re.compile(r"^step (\d+): (.*)$")


def digits_overrides(recipe: Path, batch: int, image_size: int, epochs: int) -> list[str]:
    """What the digits force on a recipe, as `key=value` overrides."""
    cfg = load_config(recipe)
    out = [f"data.batch_size={batch}"]
    if max(r.size for r in cfg.data.view_recipes()) > 64:
        out += [f"data.eval_size={image_size}", f"data.eval_resize={image_size}"]
        if isinstance(cfg.data.views, ViewPreset):
            out.append(f"data.views.size={image_size}")
        else:
            out += [f"data.views.{i}.size={image_size}" for i in range(len(cfg.data.views))]
    if cfg.optim.warmup_epochs >= epochs:
        out.append(f"optim.warmup_epochs={max(1, epochs // 3)}")
    queue = getattr(cfg.method, "queue_size", None)
    if queue is not None and queue > 1024:  # a queue far longer than the data would hold the same images many times
        out.append(f"method.queue_size={1024}")
    return out


def chance(cfg, batch: int) -> float | None:
    """The loss when every candidate scores the same, for the InfoNCE-shaped losses (None for others)."""
    name = cfg.method.name
    tau = getattr(cfg.method, "temperature", None)
    if name in ("simclr", "sdclr"):
        return math.log(2 * batch - 1)
    if name == "mocov3":  # 2τ·CE in both directions
        return 2 * (2 * tau * math.log(batch))
    if name == "sdmp_mocov3":  # one-way base plus two mixed parts at `weight` each
        return 2 * tau * math.log(batch) * (1 + 2 * cfg.method.sdmp.weight)
    if name == "mocov2":
        return math.log(cfg.method.queue_size + 1)
    return None


def run(recipe: Path, overrides: list[str], epochs: int, max_steps: int | None, precision: str, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(recipe), "--data", str(SAMPLE / "train"),
           "--val-data", str(SAMPLE / "val"), "--output", str(out), "--resume", "never", f"train.epochs={epochs}",
           "train.log_every=1", "train.knn_k=20", f"train.knn_every={epochs}", f"engine.precision={precision}",
           "train.checkpoint_every=1000000", *overrides]
    if max_steps:
        cmd.append(f"train.max_steps={max_steps}")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    losses, knn = {}, {}
    for line in done.stdout.splitlines():
        m = STEP.match(line)
        if not m:
            continue
        values = dict(item.split("=", 1) for item in m[2].split())
        if "total" in values:
            losses[int(m[1])] = float(values["total"])
        if any(k.startswith("knn_top1") for k in values):
            knn[int(m[1])] = float(next(v for k, v in values.items() if k.startswith("knn_top1")))
    return {"cmd": " ".join(cmd[1:]), "rc": done.returncode, "seconds": time.perf_counter() - start,
            "losses": losses, "knn": knn, "stderr": done.stderr[-2000:] if done.returncode else ""}


def summarise(name: str, result: dict, steps_per_epoch: int, chance_value: float | None) -> dict:
    steps = sorted(result["losses"])
    epochs = [[result["losses"][s] for s in steps if (s - 1) // steps_per_epoch == e]
              for e in range((steps[-1] - 1) // steps_per_epoch + 1)] if steps else []
    means = [sum(e) / len(e) for e in epochs if e]
    knn = [result["knn"][s] for s in sorted(result["knn"])]
    return {"recipe": name, "rc": result["rc"], "seconds": round(result["seconds"], 1), "steps": len(steps),
            "epoch_means": [round(m, 4) for m in means], "chance": None if chance_value is None else round(chance_value, 4),
            "knn_start": knn[0] if knn else None, "knn_end": knn[-1] if len(knn) > 1 else None,
            "cmd": result["cmd"], "stderr": result["stderr"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/recipe_curves.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", help="recipe names in launch/configs (default: all)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps (schedules stay those of --epochs)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64, help="view size for the ImageNet-sized recipes")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every recipe "
                   "(on a CPU: model.cifar_stem=false, whose 32x32 maps cost ~16x the compute)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (a GPU has room for several)")
    p.add_argument("--json", type=Path, help="append one JSON line per recipe")
    args = p.parse_args(argv)
    from launch.pretrain import ensure_sample

    ensure_sample(SAMPLE)
    names = args.recipes or sorted(f.stem for f in CONFIGS.glob("*.yaml"))
    steps_per_epoch = json.loads((SAMPLE / "train" / "manifest.json").read_text())["num_samples"] // args.batch_size

    def one(name: str) -> dict:
        recipe = CONFIGS / f"{name}.yaml"
        overrides = digits_overrides(recipe, args.batch_size, args.image_size, args.epochs) + args.set
        print(f">>> {name}: {' '.join(overrides)}", flush=True)
        result = run(recipe, overrides, args.epochs, args.max_steps, args.precision, Path(tmp) / name)
        row = summarise(name, result, steps_per_epoch, chance(load_config(recipe, overrides), args.batch_size))
        print(json.dumps(row), flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(one, names))
    if args.json:
        with args.json.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"\n{args.epochs}-epoch schedules, {args.precision}, batch {args.batch_size}, {steps_per_epoch} steps an epoch"
          + (f", stopped at step {args.max_steps}" if args.max_steps else ""))
    print("| recipe | steps | loss, first epoch -> last | chance | kNN start -> end | seconds |\n|---|---|---|---|---|---|")
    for r in rows:
        loss = f"{r['epoch_means'][0]:.3f} -> {r['epoch_means'][-1]:.3f}" if r["epoch_means"] else f"failed (rc {r['rc']})"
        knn = " -> ".join(f"{v:.1%}" for v in (r["knn_start"], r["knn_end"]) if v is not None)
        print(f"| {r['recipe']} | {r['steps']} | {loss} | {r['chance'] or '-'} | {knn} | {r['seconds']} |")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
