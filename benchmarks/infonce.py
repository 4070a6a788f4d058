"""InfoNCE forward + backward: plain PyTorch (bf16 matmul, fp32 logits, cross-entropy) against the fused
Triton path (`info_nce(impl="triton")`), in one run, on the same inputs. Needs a CUDA GPU.

    python benchmarks/infonce.py                                   # N = 4k..256k, D = 128 and 256, bf16
    python benchmarks/infonce.py --sizes 4096 65536 --dims 256 --json out.jsonl
    python benchmarks/infonce.py --sizes 65536 --shapes 512x32768 8960x25088 25088x25088 --dims 256   # and DIM, CPC shapes

One GPU holds the whole batch: N L2-normalised queries against N keys, row i's positive is key i; with
--shapes BxN, B queries against N keys (B <= N), as DIM's global vectors against all gathered locals, or
one rank's CPC predictions against every patch target (64 images x 140 predictions at offsets 1-5 = 8960
queries against 512 x 49 = 25,088 targets: 8960x25088).
Before timing each (N, D), the fused path is checked against an fp32 computation from the same bf16
inputs on a random subset of rows (loss and gradients; exits on a mismatch). Plain PyTorch is skipped
where its logits would not fit in free GPU memory. Time: median of --repeats fwd+bwd steps after
--warmup (CUDA events). Memory: peak allocated during one step, over what the inputs already hold.
Prints one JSON line per measurement (or writes them to --json), then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project need not be installed (the GPU machine gets bare wheels)

from pipeline.losses import info_nce  # noqa: E402

# Plain PyTorch holds about four N×N fp32-sized buffers at its peak (fp32 logits, log-softmax, their
# gradients; bf16 copies on top): 16·N² bytes, which matches 64 GiB at N = 64k.
PLAIN_BYTES_PER_LOGIT = 16
BF16_TOLERANCE = 2e-2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 262144], help="N")
    p.add_argument("--shapes", type=queries_by_keys, nargs="*", default=[], metavar="BxN",
                   help="B queries against N keys, besides the N x N cases of --sizes")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 256], help="D")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one autotunes)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps")
    p.add_argument("--check-rows", type=int, default=1024, help="rows compared with fp32 before timing")
    p.add_argument("--json", type=Path, help="write the JSON lines here instead of stdout")
    return p.parse_args(argv)


def queries_by_keys(text: str) -> tuple[int, int]:
    try:
        rows, keys = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BxN, e.g. 512x32768") from None
    if not 0 < rows <= keys:
        raise argparse.ArgumentTypeError(f"{text!r}: needs 0 < B <= N (row i's positive is key i)")
    return rows, keys


def plain_info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = (q @ k.T).float() / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def fused_info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    return info_nce(q, k, temperature, impl="triton")


IMPLS = {"plain": plain_info_nce, "fused": fused_info_nce}


def plain_fits(n: int, free_bytes: int, rows: int | None = None) -> bool:
    return PLAIN_BYTES_PER_LOGIT * (rows or n) * n < 0.9 * free_bytes


def inputs(rows: int, n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda count: F.normalize(torch.randn(count, dim, device="cuda", generator=g), dim=1)  # noqa: E731
    return make(rows).bfloat16().requires_grad_(), make(n).bfloat16().requires_grad_()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def check_fused(q: torch.Tensor, k: torch.Tensor, temperature: float, rows: int) -> dict:
    """Fused loss and gradients of a random subset S of rows against fp32 logits from the same bf16 inputs.

    Weighting the per-row losses by the indicator of S makes both sides' gradients (all of dK, dQ on S)
    depend on S alone, so the check costs O(|S|·N) memory whatever N is.
    """
    subset = torch.randperm(q.shape[0], device=q.device)[:rows]
    weights = torch.zeros(q.shape[0], device=q.device).index_fill_(0, subset, 1.0 / len(subset))
    fused = (info_nce(q, k, temperature, reduction="none", impl="triton") * weights).sum()
    dq, dk = torch.autograd.grad(fused, (q, k))
    q32, k32 = q.detach()[subset].float().requires_grad_(), k.detach().float().requires_grad_()
    expected = F.cross_entropy(q32 @ k32.T / temperature, subset)
    eq, ek = torch.autograd.grad(expected, (q32, k32))
    errors = {
        "loss": relative_error(fused, expected),
        "grad_q": relative_error(dq[subset], eq),
        "grad_k": relative_error(dk, ek),
    }
    if max(errors.values()) > BF16_TOLERANCE:
        raise SystemExit(f"fused InfoNCE disagrees with fp32 at B={q.shape[0]}, N={k.shape[0]}, D={q.shape[1]}: {errors}")
    return errors


def time_and_memory(fn, q: torch.Tensor, k: torch.Tensor, temperature: float, warmup: int, repeats: int) -> dict:
    def step():
        q.grad = k.grad = None
        fn(q, k, temperature).backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q.grad = k.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - held
    return {"ms": statistics.median(times), "ms_min": min(times), "peak_mib": peak / 2**20}


def run(args, emit) -> list[dict]:
    records = []
    device = torch.cuda.get_device_name()
    cases = [(n, n) for n in args.sizes] + args.shapes
    for dim in args.dims:
        for rows, n in cases:
            q, k = inputs(rows, n, dim)
            base = {"queries": rows, "n": n, "dim": dim, "dtype": "bfloat16", "temperature": args.temperature,
                    "device": device}
            check = check_fused(q, k, args.temperature, min(args.check_rows, rows))
            for name, fn in IMPLS.items():
                record = dict(base, impl=name)
                free, _ = torch.cuda.mem_get_info()
                if name == "plain" and not plain_fits(n, free, rows):
                    record["skipped"] = f"needs about {PLAIN_BYTES_PER_LOGIT * rows * n / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
                else:
                    try:
                        record.update(time_and_memory(fn, q, k, args.temperature, args.warmup, args.repeats))
                    except torch.cuda.OutOfMemoryError:
                        record["skipped"] = "out of memory"
                if name == "fused":
                    record["check_relative_error"] = check
                records.append(record)
                emit(record)
                torch.cuda.empty_cache()
            del q, k
    return records


def table(records: list[dict]) -> str:
    """One line per (D, B, N): plain and fused time and memory, and their ratios (N alone where B = N)."""
    by_case: dict[tuple[int, int, int], dict[str, dict]] = {}
    for r in records:
        by_case.setdefault((r["dim"], r.get("queries", r["n"]), r["n"]), {})[r["impl"]] = r
    header = f"{'D':>5} {'N':>11} | {'plain ms':>9} {'plain GiB':>10} | {'fused ms':>9} {'fused GiB':>10} | {'speed-up':>8} {'memory':>8}"
    lines = [header, "-" * len(header)]
    for (dim, rows, n), impls in sorted(by_case.items(), key=lambda item: (item[0][0], item[0][2], item[0][1])):
        plain, fused = impls.get("plain", {}), impls.get("fused", {})
        cells = []
        for r in (plain, fused):
            timed = "ms" in r
            cells += [f"{r['ms']:9.2f}" if timed else f"{'-':>9}", f"{r['peak_mib'] / 1024:10.3f}" if timed else f"{'-':>10}"]
        both = "ms" in plain and "ms" in fused
        speedup = f"{plain['ms'] / fused['ms']:7.2f}x" if both else f"{'-':>8}"
        memory = f"{plain['peak_mib'] / fused['peak_mib']:7.0f}x" if both else f"{'-':>8}"
        keys = str(n) if rows == n else f"{rows}x{n}"
        lines.append(f"{dim:5d} {keys:>11} | {cells[0]} {cells[1]} | {cells[2]} {cells[3]} | {speedup} {memory}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/infonce.py needs a CUDA GPU: it times the Triton kernels against plain PyTorch there.",
              file=sys.stderr)
        return 2
    out = open(args.json, "w") if args.json else sys.stdout

    def emit(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    try:
        records = run(args, emit)
    finally:
        if args.json:
            out.close()
    print(f"InfoNCE fwd+bwd, bf16, on {torch.cuda.get_device_name()}")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
