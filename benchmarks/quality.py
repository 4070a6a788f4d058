"""Quality: the project's main job against the same recipe written as a plain PyTorch loop.

    python benchmarks/quality.py [--seeds 0 1 2] [--config launch/configs/default.yaml] [--json quality.jsonl]

For each seed, `launch/pretrain.py` trains the recipe (SimCLR on the embedded digits by default) and
`benchmarks/plain_simclr.py` trains the same settings by hand, both from the same shards; each reports
the weighted kNN top-1 (k = train.knn_k, tau = 0.1) on the validation shards. The table gives both
means, their spread (sample standard deviation over seeds) and the ratio; the check passes when the
project's mean is at least the reference's mean minus its spread. Exit code 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.methods  # noqa: E402,F401  (registers the methods load_config validates against)
from benchmarks.plain_simclr import simclr_model, train_plain  # noqa: E402
from pipeline.checkpoint import complete_checkpoints, read_meta  # noqa: E402
from pipeline.config import load_config  # noqa: E402

SAMPLE = ROOT / "data" / "sample"


def project_run(recipe: str, seed: int, out: Path, data: Path, val: Path) -> tuple[float, list[float]]:
    """The README's main job in a subprocess; returns its final kNN and the logged losses."""
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", recipe, "--data", str(data),
           "--val-data", str(val), "--output", str(out), "--resume", "never", f"train.seed={seed}", "train.knn_every=0"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    meta = read_meta(complete_checkpoints(out / "checkpoints")[-1])
    knn = next(v for k, v in meta["metrics"].items() if k.startswith("knn_top1"))
    losses = [float(line.split("total=")[1].split()[0]) for line in done.stdout.splitlines() if "total=" in line]
    return knn, losses


def reference_run(recipe: str, seed: int, data: Path, val: Path) -> tuple[float, list[float]]:
    cfg = load_config(recipe, [f"train.data={data}", f"train.val_data={val}", f"train.seed={seed}"])
    torch.manual_seed(seed)
    result = train_plain(cfg, simclr_model(cfg))
    return result["knn"], result["losses"]


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "launch" / "configs" / "default.yaml"))
    p.add_argument("--data", type=Path, help="training shards (default: the embedded digits)")
    p.add_argument("--val-data", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, help="append one JSON line per run and one for the summary")
    args = p.parse_args(argv)
    data, val = args.data, args.val_data
    if data is None:
        from launch.pretrain import ensure_sample

        ensure_sample(SAMPLE)
        data, val = SAMPLE / "train", SAMPLE / "val"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            knn, losses = project_run(args.config, seed, Path(tmp) / f"seed-{seed}", data, val)
            rows.append({"run": "project", "seed": seed, "knn_top1": knn, "final_loss": losses[-1] if losses else None})
            print(json.dumps(rows[-1]), flush=True)
            knn, losses = reference_run(args.config, seed, data, val)
            rows.append({"run": "plain", "seed": seed, "knn_top1": knn, "final_loss": sum(losses[-10:]) / len(losses[-10:])})
            print(json.dumps(rows[-1]), flush=True)
    ours = [r["knn_top1"] for r in rows if r["run"] == "project"]
    ref = [r["knn_top1"] for r in rows if r["run"] == "plain"]
    ok = statistics.mean(ours) >= statistics.mean(ref) - spread(ref)
    summary = {"run": "summary", "project_mean": statistics.mean(ours), "project_spread": spread(ours),
               "plain_mean": statistics.mean(ref), "plain_spread": spread(ref),
               "ratio": statistics.mean(ours) / statistics.mean(ref), "pass": ok}
    if args.json:
        with args.json.open("a") as f:
            for row in rows + [summary]:
                f.write(json.dumps(row) + "\n")
    print(f"\n| run | kNN top-1 per seed {args.seeds} | mean | spread |\n|---|---|---|---|")
    for name, values in (("launch/pretrain.py", ours), ("plain PyTorch loop", ref)):
        print(f"| {name} | {' / '.join(f'{v:.1%}' for v in values)} | {statistics.mean(values):.1%} | {spread(values):.1%} |")
    print(f"\nratio project / plain: {summary['ratio']:.3f}; project mean >= plain mean - spread: {'pass' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
