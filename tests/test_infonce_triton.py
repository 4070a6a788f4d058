"""The Triton kernels against the float64 reference, on the cases of test_infonce.py.

Triton chooses between compiling and interpreting when it defines a kernel, so the CPU run needs
TRITON_INTERPRET=1 before the kernels are imported. `test_kernels_under_interpreter` therefore runs this
file again in a fresh pytest process with the variable set, where the "interpreter" cases run (tiny sizes:
the interpreter executes every tile in NumPy). On a GPU the "cuda" cases run natively in this process.
"""

from __future__ import annotations


import pytest
import torch

from interpreter import INTERPRETING, run_under_interpreter
from pipeline.losses.checks import resolve_impl
from test_infonce import (
    INFO_NCE_CASES,
    OUCL_CASES,
    assert_info_nce_matches,
    assert_matches_reference,
    assert_oucl_matches,
    soft_weights,
    unit_rows,
)

pytest.importorskip("triton")

DEVICES = [
    pytest.param("cpu", id="interpreter", marks=pytest.mark.skipif(
        not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernels_under_interpreter")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU (and no interpreter)")]),
]


@pytest.mark.skipif(INTERPRETING, reason="this process is the interpreter run")
def test_kernels_under_interpreter():
    run_under_interpreter(__file__)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", INFO_NCE_CASES)
def test_info_nce(case, dtype, device):
    assert_info_nce_matches(case, "triton", dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim, dtype", [(16, torch.float16), (48, torch.bfloat16), (288, torch.float32)], ids=str)
def test_feature_dims(dim, dtype, device):
    """The smallest D, one that is not a power of two (masked chunk), one over 256 (several chunks)."""
    assert_info_nce_matches("soft targets + queue", "triton", dtype, device, dim=dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", OUCL_CASES)
def test_oucl(case, dtype, device):
    assert_oucl_matches(case, "triton", dtype, device)


needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_gpu)])
def test_many_tiles(dtype, dim, device):
    """Sizes that span many of the H100 tiles, none a multiple of them; soft targets, mask_self, a queue."""
    g = torch.Generator().manual_seed(7)
    rows, keys = 1000, 3001
    own = torch.arange(rows)
    partners = own + 1000 + torch.randint(0, 1000, (rows,), generator=g)  # in 1000..2998
    inputs = dict(
        q=unit_rows(g, rows, dim), k=unit_rows(g, keys, dim), temperature=0.07, queue=unit_rows(g, 517, dim),
        targets=torch.stack([own, partners], 1), target_weights=soft_weights(g, rows, 2), mask_self=own + 2001,
    )
    assert_matches_reference(inputs, "triton", dtype, device, label="many tiles")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_gpu)])
def test_auto_is_triton_on_cuda(device):
    assert resolve_impl("auto", torch.zeros(2, 16, device=device)) == "triton"
