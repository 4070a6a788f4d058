"""benchmarks/infonce.py: the refusal without a GPU, the skip rule, the table, and its CPU mode on a small case."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "infonce.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_infonce", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_refuses_to_run_without_a_gpu(bench, capsys):
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_plain_is_skipped_where_its_logits_do_not_fit(bench):
    free = 79 * 2**30  # an H100
    assert bench.plain_fits(65536, free)  # 64 GiB, as measured there
    assert not bench.plain_fits(262144, free)


def test_table_pairs_plain_and_fused(bench):
    args = bench.parse_args([])
    assert args.sizes == [4096, 16384, 32768, 65536, 262144] and args.dims == [128, 256]
    records = [
        dict(impl="plain", n=65536, dim=256, ms=105.0, peak_mib=65536.0),
        dict(impl="fused", n=65536, dim=256, ms=21.0, peak_mib=512.0),
        dict(impl="plain", n=262144, dim=256, skipped="needs about 1024 GiB"),
        dict(impl="fused", n=262144, dim=256, ms=330.0, peak_mib=2048.0),
    ]
    lines = bench.table(records).splitlines()
    assert lines[2].split() == ["256", "65536", "|", "105.00", "64.000", "|", "21.00", "0.500", "|", "5.00x", "128x"]
    assert lines[3].split() == ["256", "262144", "|", "-", "-", "|", "330.00", "2.000", "|", "-", "-"]


def test_cpu_mode_times_plain_and_chunked_after_checking_them(tmp_path):
    """In a process of its own: the CPU mode sets glibc's mmap threshold for the process it runs in."""
    import json
    import subprocess
    import sys

    out = tmp_path / "records.jsonl"
    done = subprocess.run([sys.executable, str(PATH), "--device", "cpu", "--sizes", "256", "--shapes", "32x512", "--dims", "16",
                           "--repeats", "1", "--warmup", "0", "--check-rows", "16", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["queries"], r["n"], r["impl"]) for r in records] == [(256, 256, "plain"), (256, 256, "fused"),
                                                                     (32, 512, "plain"), (32, 512, "fused")]
    assert all(r["device"] == "cpu" and r["dtype"] == "float32" and r["ms"] > 0 and "peak_mib" in r for r in records)
    assert max(records[1]["check_relative_error"].values()) < 1e-4
    assert "fused = chunked, on the CPU" in done.stdout
