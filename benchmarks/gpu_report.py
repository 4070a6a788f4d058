"""The GPU check's report: each step's status and the figures its outputs hold, against the targets.

    python benchmarks/gpu_report.py WORK OUT_DIR

WORK is the folder `gpu_check.sh` ran in: `steps.jsonl` (one line per step: step, budget_s, seconds,
status), `run.json` (date, device, packages), the steps' results (`tests.xml`, `infonce.jsonl`,
`loader.jsonl`, `train.jsonl`, `cifar10-run/`, `recipes.jsonl`) and `logs/STEP.log`. OUT_DIR gets three files, well within
what comes back from the GPU machine (8 files of 16 MiB): gpu_check.json (everything), gpu_check.md (the
tables) and gpu_check.log (each step's log, its last LOG_TAIL_BYTES). A figure a step did not produce is
"not measured", with the step's status; a figure without a target is reported as measured.
Standard library only, but for TensorBoard's event reader (the CIFAR-10 run's images/s).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

LOG_TAIL_BYTES = 2 * 2**20
STEPS = ["data", "tests", "infonce", "loader", "train", "cifar10", "recipes"]
PASS, FAIL, NOT_MEASURED = "pass", "FAIL", "not measured"


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def last_json_line(path: Path, key: str) -> dict:
    """The last line of a log that is a JSON object holding `key` ({} if none)."""
    if not path.is_file():
        return {}
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and key in record:
                return record
    return {}


def figure(name: str, value: str | None, target: str = "", ok: bool | None = None) -> dict:
    """One row; ok None: a figure without a target (or not measured when value is None)."""
    if value is None:
        result = NOT_MEASURED
    else:
        result = "" if ok is None else (PASS if ok else FAIL)
    return {"figure": name, "value": value if value is not None else NOT_MEASURED, "target": target, "result": result}


# --- step 1: pytest -m gpu -------------------------------------------------------------------------

def junit_counts(path: Path) -> dict | None:
    """Per test file: passed, failed (failures and errors), skipped; None without a report."""
    if not path.is_file():
        return None
    counts: dict[str, dict[str, int]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1] or "?"
        kind = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            kind = "failed"
        elif case.find("skipped") is not None:
            kind = "skipped"
        c = counts.setdefault(module, {"passed": 0, "failed": 0, "skipped": 0})
        c[kind] += 1
    return counts


# `pytest -v` result lines: "tests/f.py::id PASSED [ 5%]", with xdist "[gw0] [ 5%] PASSED tests/f.py::id",
# and the -r summary's "FAILED tests/f.py::id - message" (the same test again: counted once, by its id).
RESULT_AFTER = re.compile(r"(tests/[^\s:]+\.py::.+?) (PASSED|FAILED|ERROR|SKIPPED)\b")
RESULT_BEFORE = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED) (tests/[^\s:]+\.py::.+?)(?: - .*)?\s*$")


def log_counts(path: Path) -> dict | None:
    """The same counts from `pytest -v` output: a run stopped by its budget writes no JUnit report, but
    its log holds every test finished by then."""
    if not path.is_file():
        return None
    outcomes = {}
    for line in path.read_text(errors="replace").splitlines():
        if match := RESULT_AFTER.search(line):
            outcomes[match.group(1)] = match.group(2)
        elif match := RESULT_BEFORE.search(line):
            outcomes[match.group(2)] = match.group(1)
    counts: dict[str, dict[str, int]] = {}
    for test, outcome in outcomes.items():
        c = counts.setdefault(test.split("::")[0].split("/")[-1][:-3], {"passed": 0, "failed": 0, "skipped": 0})
        c["failed" if outcome == "ERROR" else outcome.lower()] += 1
    return counts or None


def pytest_figures(work: Path) -> list[dict]:
    counts = junit_counts(work / "tests.xml")
    partial = counts is None and log_counts(work / "logs" / "tests.log") is not None
    counts = counts if counts is not None else log_counts(work / "logs" / "tests.log")
    if counts is None:
        return [figure("GPU tests (pytest -m gpu)", None, "all pass"),
                figure("no host sync in a training step (test_gpu_sync)", None, "all pass")]
    total = {k: sum(c[k] for c in counts.values()) for k in ("passed", "failed", "skipped")}
    sync = counts.get("test_gpu_sync", {"passed": 0, "failed": 0, "skipped": 0})

    def describe(passed, failed, skipped):
        return f"{passed} passed, {failed} failed, {skipped} skipped" + (" (from the log of a run cut short)" if partial else "")

    return [
        figure("GPU tests (pytest -m gpu)", describe(**total), "all pass",
               not partial and total["failed"] == 0 and total["passed"] > 0),
        figure("no host sync in a training step (test_gpu_sync)", describe(**sync), "all pass",
               not partial and sync["failed"] == 0 and sync["passed"] > 0),
    ]


# --- step 2: InfoNCE --------------------------------------------------------------------------------

def infonce_figures(records: list[dict]) -> list[dict]:
    def find(impl, n, rows=None, dim=256):
        rows = rows or n
        return next((r for r in records if r["impl"] == impl and r["n"] == n and r.get("queries", n) == rows
                     and r["dim"] == dim and "ms" in r), None)

    def ms(r):
        return None if r is None else f"{r['ms']:.2f} ms"

    def gib(r):
        return None if r is None else f"{r['peak_mib'] / 1024:.3f} GiB"

    fused64, plain64 = find("fused", 65536), find("plain", 65536)
    rows = [
        figure("fused InfoNCE fwd+bwd, N=64k, D=256, bf16: time", ms(fused64), "<= 20 ms",
               None if fused64 is None else fused64["ms"] <= 20),
        figure("fused InfoNCE fwd+bwd, N=64k, D=256, bf16: peak memory", gib(fused64), "<= 1 GiB",
               None if fused64 is None else fused64["peak_mib"] <= 1024),
        figure("plain InfoNCE, N=64k: time", ms(plain64), "(H100: about 105 ms)"),
        figure("plain InfoNCE, N=64k: peak memory", gib(plain64), "(about 64 GiB)"),
    ]
    for n in (16384, 65536):
        plain, fused = find("plain", n), find("fused", n)
        both = plain is not None and fused is not None
        rows.append(figure(f"InfoNCE N={n // 1024}k: plain / fused time",
                           f"{plain['ms'] / fused['ms']:.2f}x" if both else None))
    fused256 = find("fused", 262144)
    rows.append(figure("fused InfoNCE, N=256k: runs", None if fused256 is None else f"{ms(fused256)}, {gib(fused256)}",
                       "runs", None if fused256 is None else True))
    for r in records:
        if r["impl"] == "fused" and r.get("queries", r["n"]) != r["n"]:
            rows.append(figure(f"fused InfoNCE {r['queries']} queries x {r['n']} keys, D={r['dim']}",
                               f"{ms(r)}, {gib(r)}" if "ms" in r else r.get("skipped", None), "runs", "ms" in r))
    return rows


# --- step 3: loader ---------------------------------------------------------------------------------

def loader_figures(records: list[dict]) -> list[dict]:
    base = next((r for r in records if r["name"].startswith("torchvision")), None)
    dali = [r for r in records if r["name"].startswith("dali gpu")]
    best = max(dali, key=lambda r: r["images_per_s"], default=None)
    rows = [
        figure("DALI loader, 2 views at 224, best hw_decoder_load: images/s",
               None if best is None else f"{best['images_per_s']:,.0f} ({best['name'].split()[-1]})", ">= 15,000",
               None if best is None else best["images_per_s"] >= 15000),
        figure("DALI / torchvision CPU loader",
               f"{best['images_per_s'] / base['images_per_s']:.1f}x" if best and base else None, ">= 8x",
               None if not (best and base) else best["images_per_s"] >= 8 * base["images_per_s"]),
        figure("torchvision CPU loader: images/s", None if base is None else
               f"{base['images_per_s']:,.0f} ({base['settings'].get('workers')} workers)"),
    ]
    rows += [figure(f"{r['name']}: images/s", f"{r['images_per_s']:,.0f}") for r in dali if r is not best]
    return rows


# --- step 4: training step --------------------------------------------------------------------------

def train_figures(records: list[dict]) -> list[dict]:
    by_name = {r["name"]: r for r in records}
    compute, e2e = by_name.get("compute-only"), by_name.get("end-to-end")
    both = compute is not None and e2e is not None
    ratio = e2e["images_per_s"] / compute["images_per_s"] if both else None
    what = "MoCo v3 ViT-S/16, ZeRO-2, bf16"
    return [
        figure(f"{what}: end-to-end / compute-only", None if ratio is None else f"{ratio:.3f}", ">= 0.9",
               None if ratio is None else ratio >= 0.9),
        figure(f"{what}: compute-only images/s", None if compute is None else f"{compute['images_per_s']:,.0f}"),
        figure(f"{what}: end-to-end images/s", None if e2e is None else f"{e2e['images_per_s']:,.0f}"),
    ]


# --- step 5: CIFAR-10 SimCLR run --------------------------------------------------------------------

def tensorboard_scalars(folder: Path, tag: str) -> list[float]:
    """The values of one scalar tag in a TensorBoard log folder, in step order."""
    if not folder.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]


def steady_rate(values: list[float]) -> float | None:
    """Median images/s over the logging intervals after the first (which holds the start-up)."""
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


def cifar_figures(work: Path) -> list[dict]:
    run = work / "cifar10-run"
    rate = steady_rate(tensorboard_scalars(run / "tensorboard", "throughput/images_per_s"))
    summary = last_json_line(work / "logs" / "cifar10.log", "epochs")  # cifar10.sh's last line
    knn = next((v for k, v in summary.items() if k.startswith("knn_top1")), None)
    epochs = summary.get("epochs")
    return [
        figure("CIFAR-10 SimCLR ResNet-18, 90 s from shards: images/s", None if rate is None else f"{rate:,.0f}",
               ">= 20,000", None if rate is None else rate >= 20000),
        figure("CIFAR-10 SimCLR, 90 s: kNN top-1 on the validation shards",
               None if knn is None else f"{knn:.2%}"),
        figure("CIFAR-10 SimCLR, 90 s: epochs", None if epochs is None else f"{epochs:.1f}"),
    ]


# --- extra step: each recipe's curve on the digits ------------------------------------------------

def recipe_figures(records: list[dict]) -> list[dict]:
    """One row per recipe (recipe_curves.py's JSON lines): it learns when its last epoch's mean loss is
    under its first's by 1% or more (a stall at chance stays flat)."""
    rows = []
    for r in records:
        means = r.get("epoch_means") or []
        if not means:
            rows.append(figure(f"recipe {r['recipe']} on the digits: loss, first -> last epoch", None))
            continue
        first, last = means[0], means[-1]
        knn = " -> ".join(f"{v:.1%}" for v in (r.get("knn_start"), r.get("knn_end")) if v is not None)
        chance = f", chance {r['chance']:.3f}" if r.get("chance") is not None else ""
        rows.append(figure(f"recipe {r['recipe']} on the digits, {len(means)} epochs: loss first -> last epoch{chance}; kNN {knn}",
                           f"{first:.3f} -> {last:.3f}", "falls >= 1%", last <= 0.99 * first))
    return rows


# --- the report -------------------------------------------------------------------------------------

def collect(work: Path) -> dict:
    run = json.loads((work / "run.json").read_text()) if (work / "run.json").is_file() else {}
    steps = read_jsonl(work / "steps.jsonl")
    status = {s["step"]: s["status"] for s in steps}
    results = {
        "tests": junit_counts(work / "tests.xml"),
        "infonce": read_jsonl(work / "infonce.jsonl"),
        "loader": read_jsonl(work / "loader.jsonl"),
        "train": read_jsonl(work / "train.jsonl"),
        "recipes": read_jsonl(work / "recipes.jsonl"),
    }
    sections = [
        ("tests", pytest_figures(work)),
        ("infonce", infonce_figures(results["infonce"])),
        ("loader", loader_figures(results["loader"])),
        ("train", train_figures(results["train"])),
        ("cifar10", cifar_figures(work)),
        ("recipes", recipe_figures(results["recipes"])),
    ]
    figures = []
    for step, rows in sections:
        for row in rows:
            if row["result"] == NOT_MEASURED:
                row["result"] = f"{NOT_MEASURED} ({status.get(step, 'not run')})"
            figures.append({"step": step, **row})
    return {**run, "steps": steps, "figures": figures, "results": results}


def markdown(report: dict) -> str:
    lines = [
        f"# GPU check, {report.get('date', '?')}, {report.get('device', '?')}",
        "",
        f"Revision {report.get('revision', '?')}; " + ", ".join(f"{k} {v}" for k, v in report.get("packages", {}).items()),
        "",
        "| step | budget s | took s | status |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {s['step']} | {s['budget_s']} | {s['seconds']:.0f} | {s['status']} |" for s in report["steps"]]
    lines += ["", "| figure | value | target | result |", "|---|---|---|---|"]
    lines += [f"| {f['figure']} | {f['value']} | {f['target']} | {f['result']} |" for f in report["figures"]]
    return "\n".join(lines) + "\n"


def joined_logs(work: Path) -> str:
    parts = []
    for log in sorted((work / "logs").glob("*.log"), key=lambda p: STEPS.index(p.stem) if p.stem in STEPS else 99):
        data = log.read_bytes()
        cut = len(data) > LOG_TAIL_BYTES
        text = data[-LOG_TAIL_BYTES:].decode("utf-8", "replace")
        parts.append(f"===== {log.stem}" + (f" (last {LOG_TAIL_BYTES} of {len(data)} bytes)" if cut else "") + f" =====\n{text}")
    return "\n".join(parts)


def write(work: Path, out: Path) -> dict:
    report = collect(work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    (out / "gpu_check.log").write_text(joined_logs(work))
    return report


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    report = write(Path(args[0]), Path(args[1]))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
