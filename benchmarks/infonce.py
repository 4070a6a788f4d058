"""InfoNCE forward + backward: plain PyTorch (bf16 matmul, fp32 logits, cross-entropy) against the fused
Triton path (`info_nce(impl="triton")`), in one run, on the same inputs, on a CUDA GPU; with `--device cpu`,
plain fp32 against the blockwise path the CPU trains with (`impl="chunked"`).

    python benchmarks/infonce.py                                   # N = 4k..256k, D = 128 and 256, bf16
    python benchmarks/infonce.py --sizes 4096 65536 --dims 256 --json out.jsonl
    python benchmarks/infonce.py --sizes 65536 --shapes 512x32768 8960x25088 25088x25088 --dims 256   # and DIM, CPC shapes
    python benchmarks/infonce.py --device cpu --sizes 8192 --shapes 512x32768 8960x25088 --dims 256 --repeats 3

One GPU holds the whole batch: N L2-normalised queries against N keys, row i's positive is key i; with
--shapes BxN, B queries against N keys (B <= N), as DIM's global vectors against all gathered locals, or
one rank's CPC predictions against every patch target (64 images x 140 predictions at offsets 1-5 = 8960
queries against 512 x 49 = 25,088 targets: 8960x25088).
Before timing each (N, D), the fused path is checked against an fp32 computation from the same bf16
inputs on a random subset of rows (loss and gradients; exits on a mismatch). Plain PyTorch is skipped
where its logits would not fit in free GPU memory. Time: median of --repeats fwd+bwd steps after
--warmup (CUDA events). Memory: peak allocated during one step, over what the inputs already hold (on
the CPU: the process's peak resident memory during the step, reset before it through
/proc/self/clear_refs, over its resident memory before it). Prints one JSON line per measurement (or
writes them to --json), then a table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project need not be installed (the GPU machine gets bare wheels)

from pipeline.losses import info_nce  # noqa: E402

# Plain PyTorch holds about four N×N fp32-sized buffers at its peak (fp32 logits, log-softmax, their
# gradients; bf16 copies on top): 16·N² bytes, which matches 64 GiB at N = 64k.
PLAIN_BYTES_PER_LOGIT = 16
TOLERANCE = {"cuda": 2e-2, "cpu": 1e-4}  # bf16 inputs on the GPU, fp32 on the CPU
FUSED_IMPL = {"cuda": "triton", "cpu": "chunked"}


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
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: fp32, the chunked path as the fused one (small sizes: every step is seconds there)")
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
    return info_nce(q, k, temperature, impl=FUSED_IMPL[q.device.type])


IMPLS = {"plain": plain_info_nce, "fused": fused_info_nce}


def plain_fits(n: int, free_bytes: int, rows: int | None = None) -> bool:
    return PLAIN_BYTES_PER_LOGIT * (rows or n) * n < 0.9 * free_bytes


def inputs(rows: int, n: int, dim: int, device: str = "cuda", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 on the GPU, fp32 on the CPU."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    make = lambda count: F.normalize(torch.randn(count, dim, device=device, generator=g), dim=1).to(dtype)  # noqa: E731
    return make(rows).requires_grad_(), make(n).requires_grad_()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def check_fused(q: torch.Tensor, k: torch.Tensor, temperature: float, rows: int) -> dict:
    """Fused loss and gradients of a random subset S of rows against fp32 logits from the same bf16 inputs.

    Weighting the per-row losses by the indicator of S makes both sides' gradients (all of dK, dQ on S)
    depend on S alone, so the check costs O(|S|·N) memory whatever N is.
    """
    subset = torch.randperm(q.shape[0], device=q.device)[:rows]
    weights = torch.zeros(q.shape[0], device=q.device).index_fill_(0, subset, 1.0 / len(subset))
    fused = (info_nce(q, k, temperature, reduction="none", impl=FUSED_IMPL[q.device.type]) * weights).sum()
    dq, dk = torch.autograd.grad(fused, (q, k))
    q32, k32 = q.detach()[subset].float().requires_grad_(), k.detach().float().requires_grad_()
    expected = F.cross_entropy(q32 @ k32.T / temperature, subset)
    eq, ek = torch.autograd.grad(expected, (q32, k32))
    errors = {
        "loss": relative_error(fused, expected),
        "grad_q": relative_error(dq[subset], eq),
        "grad_k": relative_error(dk, ek),
    }
    if max(errors.values()) > TOLERANCE[q.device.type]:
        raise SystemExit(f"fused InfoNCE disagrees with fp32 at B={q.shape[0]}, N={k.shape[0]}, D={q.shape[1]}: {errors}")
    return errors


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, from /proc/self/status."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) * 1024


def map_large_blocks() -> None:
    """glibc: serve every allocation of 64 KiB and more by mmap, so freeing it returns it at once (fixing
    the threshold also stops glibc raising it after each free, which would keep later buffers on the heap
    and hide them from the resident-memory measurement)."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 16)


def cpu_time_and_memory(step, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    held = resident_bytes("VmRSS")
    step()
    return {"ms": statistics.median(times), "ms_min": min(times), "peak_mib": (resident_bytes("VmHWM") - held) / 2**20}


def time_and_memory(fn, q: torch.Tensor, k: torch.Tensor, temperature: float, warmup: int, repeats: int) -> dict:
    def step():
        q.grad = k.grad = None
        fn(q, k, temperature).backward()

    if q.device.type == "cpu":
        return cpu_time_and_memory(step, warmup, repeats)
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
    gpu = args.device == "cuda"
    device = torch.cuda.get_device_name() if gpu else "cpu"
    if not gpu:
        map_large_blocks()
    cases = [(n, n) for n in args.sizes] + args.shapes
    for dim in args.dims:
        for rows, n in cases:
            q, k = inputs(rows, n, dim, args.device)
            base = {"queries": rows, "n": n, "dim": dim, "dtype": str(q.dtype).removeprefix("torch."),
                    "temperature": args.temperature, "device": device, "fused_impl": FUSED_IMPL[args.device]}
            check = check_fused(q, k, args.temperature, min(args.check_rows, rows))
            for name, fn in IMPLS.items():
                record = dict(base, impl=name)
                free = torch.cuda.mem_get_info()[0] if gpu else None
                if gpu and name == "plain" and not plain_fits(n, free, rows):
                    record["skipped"] = f"needs about {PLAIN_BYTES_PER_LOGIT * rows * n / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
                else:
                    try:
                        record.update(time_and_memory(fn, q, k, args.temperature, args.warmup, args.repeats))
                    except torch.OutOfMemoryError:
                        record["skipped"] = "out of memory"
                if name == "fused":
                    record["check_relative_error"] = check
                records.append(record)
                emit(record)
                if gpu:
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
        memory = f"{plain['peak_mib'] / fused['peak_mib']:7.0f}x" if both and fused["peak_mib"] > 0 else f"{'-':>8}"
        keys = str(n) if rows == n else f"{rows}x{n}"
        lines.append(f"{dim:5d} {keys:>11} | {cells[0]} {cells[1]} | {cells[2]} {cells[3]} | {speedup} {memory}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/infonce.py needs a CUDA GPU: it times the Triton kernels against plain PyTorch there "
              "(--device cpu times the chunked path instead).", file=sys.stderr)
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
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"the CPU ({torch.get_num_threads()} threads)"
    print(f"InfoNCE fwd+bwd, {records[0]['dtype'] if records else ''}, fused = {FUSED_IMPL[args.device]}, on {where}")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
