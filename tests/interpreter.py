"""Triton kernels on the CPU: TRITON_INTERPRET=1 must be set before the kernels are defined, so a test file
reruns (part of) itself in a pytest subprocess with it."""

import os
import subprocess
import sys
from pathlib import Path

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def run_under_interpreter(test_file: str, keyword: str | None = None) -> None:
    """pytest on `test_file` (only the tests matching `keyword`) with TRITON_INTERPRET=1; fails with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    # NumPy warns about log(0) in the padding rows of partial tiles, which are never stored.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
               *(["-k", keyword] if keyword else []), test_file]
    result = subprocess.run(command, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
