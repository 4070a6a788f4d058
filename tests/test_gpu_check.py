"""benchmarks/gpu_check.sh on the CPU: its plan, a run in which every GPU step is skipped and a failed step
does not stop the rest, and the report writer (benchmarks/gpu_report.py) on made-up step outputs; plus the
benchmark flags the check passes (infonce.py --shapes, loader.py --baseline-batches)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["data", "tests", "infonce", "loader", "train", "cifar10"]
GPU_STEPS = STEPS[1:]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    return load("gpu_report")


def test_dry_run_prints_each_step_with_its_budget():
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^  (\w+) +(\d+) s  needs: (\S+(?: data)?) +(.+)$", result.stdout, re.M)
    assert [r[0] for r in rows] == STEPS
    budgets = [int(r[1]) for r in rows]
    assert all(b > 0 for b in budgets) and sum(budgets) <= 360  # 6 minutes on the H200
    assert f"budgets: {sum(budgets)} s in all" in result.stdout
    commands = {r[0]: r[3] for r in rows}
    assert "pytest" in commands["tests"] and "-m gpu" in commands["tests"] and "--junitxml" in commands["tests"]
    assert "--sizes 16384 65536 262144" in commands["infonce"] and "512x32768" in commands["infonce"]
    assert "engine.zero_stage=2" in commands["train"] and "MINUTES=1.5" in commands["cifar10"]
    only = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "loader"], capture_output=True, text=True, timeout=30)
    assert re.findall(r"^  (\w+) ", only.stdout, re.M) == ["data", "loader"]
    extra = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "recipes"], capture_output=True, text=True, timeout=30)
    assert re.findall(r"^  (\w+) ", extra.stdout, re.M) == ["data", "recipes"]  # the extra step: a call of its own
    assert "recipe_curves.py --epochs 25" in extra.stdout and "budgets: 315 s in all" in extra.stdout


def test_recipe_curves_report_a_stall_at_chance(report):
    rows = report.recipe_figures([
        {"recipe": "simclr", "epoch_means": [5.73, 5.5, 5.3], "chance": 5.54, "knn_start": 0.245, "knn_end": 0.86},
        {"recipe": "mocov3", "epoch_means": [3.915, 3.917, 3.91], "chance": 3.88, "knn_start": 0.947, "knn_end": 0.933},
        {"recipe": "broken", "epoch_means": [], "rc": 1},
    ])
    assert [r["result"] for r in rows] == ["pass", "FAIL", "not measured"]
    assert rows[0]["value"] == "5.730 -> 5.300" and "3 epochs" in rows[0]["figure"] and "24.5% -> 86.0%" in rows[0]["figure"]
    assert "chance 3.880" in rows[1]["figure"]


def test_usage_without_out_dir_and_unknown_steps():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage" in result.stderr
    wrong = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "loader,trian"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "no step 'trian'" in wrong.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without CUDA")
def test_cpu_run_skips_the_gpu_steps_and_still_reports(tmp_path):
    """No data archive and no CUDA: the data step fails, the GPU steps are skipped, the report is written."""
    env = {"GPU_DATA_ARCHIVE": str(tmp_path / "missing.tar.gz"), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    result = subprocess.run(["bash", str(SCRIPT), "out"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"  # relative to the caller's folder
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    written = json.loads((out / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in written["steps"]}
    assert status["data"].startswith("failed (exit")
    assert all(status[s] == "skipped: no CUDA" for s in GPU_STEPS)
    assert written["device"] == "no CUDA device" and written["packages"]["torch"] != "missing"
    assert all(f["result"] == "not measured (skipped: no CUDA)" for f in written["figures"])
    table = (out / "gpu_check.md").read_text()
    assert "| data | 15 |" in table and "| fused InfoNCE fwd+bwd, N=64k, D=256, bf16: time | not measured | <= 20 ms |" in table
    assert "missing.tar.gz" in (out / "gpu_check.log").read_text()  # tar's complaint, in the data step's log


# --- the report writer, on the outputs an H200 run would leave ------------------------------------------

def junit(path: Path, cases: dict[str, str]) -> None:
    """A JUnit XML report: {"test_file.py::name": "passed" | "failed" | "error" | "skipped"}."""
    body = []
    for case, outcome in cases.items():
        module, name = case.split("::")
        inner = {"passed": "", "failed": "<failure message='x'/>", "error": "<error message='x'/>",
                 "skipped": "<skipped message='needs'/>"}[outcome]
        body.append(f'<testcase classname="tests.{module[:-3]}" name="{name}">{inner}</testcase>')
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>')


def jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def infonce_record(impl, n, ms, mib, queries=None, dim=256):
    return {"impl": impl, "n": n, "queries": queries or n, "dim": dim, "ms": ms, "peak_mib": mib}


@pytest.fixture
def h200_work(tmp_path):
    """A work folder as gpu_check.sh leaves it after a run that met some targets and missed others."""
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "run.json").write_text(json.dumps({"date": "2026-12-02 10:00 UTC", "device": "NVIDIA H200", "cuda": True,
                                               "packages": {"torch": "2.11"}, "revision": "abc123"}))
    steps = [{"step": s, "budget_s": 60, "seconds": 12.5, "status": "ok", "exit_code": 0} for s in STEPS]
    steps[4] = {"step": "train", "budget_s": 45, "seconds": 45.0, "status": "timed out after 45 s", "exit_code": 124}
    jsonl(work / "steps.jsonl", steps)
    junit(work / "tests.xml", {"test_gpu_sync.py::a": "passed", "test_gpu_sync.py::b": "skipped",
                               "test_loader.py::c": "failed", "test_mixing.py::d": "error", "test_mixing.py::e": "passed"})
    jsonl(work / "infonce.jsonl", [
        infonce_record("plain", 16384, 5.9, 4096.0), infonce_record("fused", 16384, 2.0, 64.0),
        infonce_record("plain", 65536, 105.0, 65536.0), infonce_record("fused", 65536, 20.0, 1024.0),  # at the limits: pass
        {"impl": "plain", "n": 262144, "queries": 262144, "dim": 256, "skipped": "needs about 1024 GiB"},
        infonce_record("fused", 262144, 330.0, 4096.0),
        infonce_record("plain", 32768, 1.0, 1024.0, queries=512), infonce_record("fused", 32768, 0.5, 16.0, queries=512),
    ])
    jsonl(work / "loader.jsonl", [
        {"name": "torchvision (16 workers)", "images_per_s": 2000.0, "settings": {"workers": 16}},
        {"name": "dali gpu hw_decoder_load=0.0", "images_per_s": 9000.0, "settings": {}},
        {"name": "dali gpu hw_decoder_load=0.9", "images_per_s": 15500.0, "settings": {}},  # >= 15,000 but < 8x
    ])
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(work / "cifar10-run" / "tensorboard"))
    for step, rate in zip((20, 40, 60, 80), (3000.0, 21000.0, 22000.0, 19000.0)):  # the first holds the start-up
        writer.add_scalar("throughput/images_per_s", rate, step)
    writer.close()
    (work / "logs" / "cifar10.log").write_text(
        'step 20: loss=5.1\n{"broken\n{"checkpoint": "x", "steps": 80, "epochs": 0.9, "knn_top1_k200": 0.4123}\n')
    (work / "logs" / "tests.log").write_text("x" * 5000)
    return work


def rows(report_dict: dict) -> dict[str, dict]:
    return {f["figure"]: f for f in report_dict["figures"]}


def test_report_figures_against_the_targets(report, h200_work, tmp_path):
    written = report.write(h200_work, tmp_path / "out")
    by = rows(written)
    tests = by["GPU tests (pytest -m gpu)"]
    assert (tests["value"], tests["result"]) == ("2 passed, 2 failed, 1 skipped", "FAIL")
    assert by["no host sync in a training step (test_gpu_sync)"]["result"] == "pass"
    assert by["fused InfoNCE fwd+bwd, N=64k, D=256, bf16: time"]["value"] == "20.00 ms"
    assert by["fused InfoNCE fwd+bwd, N=64k, D=256, bf16: time"]["result"] == "pass"
    assert by["fused InfoNCE fwd+bwd, N=64k, D=256, bf16: peak memory"]["result"] == "pass"
    assert by["InfoNCE N=64k: plain / fused time"]["value"] == "5.25x"
    assert by["fused InfoNCE, N=256k: runs"]["result"] == "pass"
    assert by["fused InfoNCE 512 queries x 32768 keys, D=256"]["value"] == "0.50 ms, 0.016 GiB"
    best = by["DALI loader, 2 views at 224, best hw_decoder_load: images/s"]
    assert (best["value"], best["result"]) == ("15,500 (hw_decoder_load=0.9)", "pass")
    assert (by["DALI / torchvision CPU loader"]["value"], by["DALI / torchvision CPU loader"]["result"]) == ("7.8x", "FAIL")
    assert by["dali gpu hw_decoder_load=0.0: images/s"]["value"] == "9,000"
    train = by["MoCo v3 ViT-S/16, ZeRO-2, bf16: end-to-end / compute-only"]
    assert (train["value"], train["result"]) == ("not measured", "not measured (timed out after 45 s)")
    cifar = by["CIFAR-10 SimCLR ResNet-18, 90 s from shards: images/s"]
    assert (cifar["value"], cifar["result"]) == ("21,000", "pass")  # median of the intervals after the first
    assert by["CIFAR-10 SimCLR, 90 s: kNN top-1 on the validation shards"]["value"] == "41.23%"
    assert by["CIFAR-10 SimCLR, 90 s: epochs"]["value"] == "0.9"


def test_report_files(report, h200_work, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "LOG_TAIL_BYTES", 1000)
    out = tmp_path / "out"
    written = report.write(h200_work, out)
    assert json.loads((out / "gpu_check.json").read_text()) == json.loads(json.dumps(written))
    table = (out / "gpu_check.md").read_text().splitlines()
    assert table[0] == "# GPU check, 2026-12-02 10:00 UTC, NVIDIA H200"
    assert "| train | 45 | 45 | timed out after 45 s |" in table
    assert "| MoCo v3 ViT-S/16, ZeRO-2, bf16: end-to-end / compute-only | not measured | >= 0.9 | not measured (timed out after 45 s) |" in table
    assert sum(line.startswith("| ") for line in table) == 2 + len(STEPS) + len(written["figures"])
    log = (out / "gpu_check.log").read_text()
    assert log.index("===== tests (last 1000 of 5000 bytes) =====") < log.index("===== cifar10 =====")
    assert "x" * 1000 in log and "x" * 1001 not in log


def test_tests_cut_short_are_counted_from_the_log(report, h200_work, tmp_path):
    """Without the JUnit report (pytest stopped by its budget) the counts come from the -v log, and the
    figure fails: not every test ran."""
    (h200_work / "tests.xml").unlink()
    (h200_work / "logs" / "tests.log").write_text(
        "tests/test_gpu_sync.py::test_one[simclr-plain] PASSED     [  1%]\n"
        "[gw1] [  2%] PASSED tests/test_gpu_sync.py::test_one[metaug-NT-Xent, clamped weights] \n"
        "[gw0] [  3%] SKIPPED tests/test_gpu_sync.py::test_one[sdclr-feature_aug] \n"
        "tests/test_loader.py::test_gpu FAILED     [  4%]\n"
        "ERROR tests/test_mixing.py::test_cuda[x] - RuntimeError: CUDA error\n"
        "=== short test summary info ===\nFAILED tests/test_loader.py::test_gpu - AssertionError: 0.3 > 0.1\n")
    by = rows(report.write(h200_work, tmp_path / "out"))
    tests, sync = by["GPU tests (pytest -m gpu)"], by["no host sync in a training step (test_gpu_sync)"]
    assert tests["value"] == "2 passed, 2 failed, 1 skipped (from the log of a run cut short)"
    assert tests["result"] == sync["result"] == "FAIL"
    assert sync["value"].startswith("2 passed, 0 failed, 1 skipped")


def test_report_of_an_empty_folder(report, tmp_path):
    """A run stopped before any step still gives a report: every figure not measured, 'not run'."""
    written = report.write(tmp_path / "nothing", tmp_path / "out")
    assert written["steps"] == [] and all(f["result"] == "not measured (not run)" for f in written["figures"])
    assert report.main([str(tmp_path / "nothing")]) == 2


# --- flags of the benchmarks the check runs -----------------------------------------------------------

def test_infonce_shapes_flag():
    bench = load("infonce")
    args = bench.parse_args(["--sizes", "65536", "--shapes", "512x32768", "25088X25088"])
    assert args.shapes == [(512, 32768), (25088, 25088)]
    for bad in ("512", "32768x512", "0x4", "ax3"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--shapes", bad])
    assert bench.plain_fits(32768, 79 * 2**30, rows=512) and not bench.plain_fits(262144, 79 * 2**30, rows=262144)
    lines = bench.table([infonce_record("plain", 32768, 1.0, 1024.0, queries=512),
                         infonce_record("fused", 32768, 0.5, 16.0, queries=512)]).splitlines()
    assert lines[2].split() == ["256", "512x32768", "|", "1.00", "1.000", "|", "0.50", "0.016", "|", "2.00x", "64x"]


def test_loader_baseline_batches_flag():
    bench = load("loader")
    assert bench.parse_args(["--baseline-batches", "16"]).baseline_batches == 16
    assert bench.parse_args([]).baseline_batches is None  # as many as DALI's
    with pytest.raises(SystemExit):
        bench.parse_args(["--baseline-batches", "0"])
