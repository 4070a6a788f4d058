"""Every Triton kernel of pipeline/losses/triton_lse.py compiles for sm_90 (H100/H200) without a GPU.

Triton's ahead-of-time path (`triton.compile` of an `ASTSource` for a `GPUTarget`) runs the whole chain
down to ptxas, which ships in the triton wheel, so a kernel that only fails to compile for Hopper fails
here. Compile-time arguments come from the module's own `_constants`, as at run time. Each compile prints
its registers, spilled bytes (ptxas' -v log: the loaded kernel's `n_spills` needs a driver) and shared
memory; a configuration over sm_90's 227 KiB per block can never launch (autotuning then skips it),
which is a warning, not a failure: the others still run.

Each compile costs seconds, so CI compiles each kernel twice: its largest tile on the hot path (bf16,
D = 256, InfoNCE) and its smallest on the other branches (wide D, OUCL's epilogue, excluded keys).
`TRITON_AOT=all` compiles every autotuning configuration of every case (91 compiles; the fp32 ones at
D = 256 take minutes each, their ieee-precision dots unrolled into FMAs):
    TRITON_AOT=all python -m pytest -q -s tests/test_triton_aot.py
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from pipeline.losses import triton_lse  # noqa: E402
from pipeline.losses.logits import CircleNegativeLogits, ScaledLogits, TanhClipLogits  # noqa: E402

if triton_lse.INTERPRETING:
    pytest.skip("TRITON_INTERPRET=1 replaces the kernels' configurations with one interpreter tile",
                allow_module_level=True)

SM90 = GPUTarget("cuda", 90, 32)  # (backend, compute capability, warp size)
SM90_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may opt into on sm_90
KERNELS = {
    "forward": triton_lse._forward_kernel,
    "query_grad": triton_lse._query_grad_kernel,
    "key_grad": triton_lse._key_grad_kernel,
}
INFO_NCE = ScaledLogits(scale=10.0)
OUCL = CircleNegativeLogits(beta=8.0, optimum=0.2, margin=0.4, detach_weight=False)
# name: (feature dtype, D, epilogue, excluded keys per row)
CASES = {
    "bf16-D256-infonce": (torch.bfloat16, 256, INFO_NCE, 0),
    "bf16-D128-infonce-exclude": (torch.bfloat16, 128, INFO_NCE, 1),
    "fp16-D64-infonce": (torch.float16, 64, INFO_NCE, 0),
    "fp32-D32-infonce": (torch.float32, 32, INFO_NCE, 0),  # the GPU tests' width
    "fp32-D256-infonce": (torch.float32, 256, INFO_NCE, 0),  # minutes per configuration: ieee dots unroll to FMAs
    "bf16-D512-oucl-exclude": (torch.bfloat16, 512, OUCL, 1),
    "bf16-D256-oucl-detached": (torch.bfloat16, 256, CircleNegativeLogits(8.0, 0.2, 0.4, detach_weight=True), 0),
    "bf16-D1024-amdim-exclude": (torch.bfloat16, 1024, TanhClipLogits(scale=1 / 32, clip=20.0), 25),  # r5: 25 own
}
FLOAT_ARGS = {"scale", "beta", "optimum", "margin"}
FP32_POINTERS = {"LSE", "GRAD"}
TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def biggest(configs):
    return max(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages, c.num_warps))


def smallest(configs):
    return min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages, c.num_warps))


def compilations():
    if os.environ.get("TRITON_AOT") == "all":
        return [(k, c, i) for k in KERNELS for c in CASES for i in range(len(KERNELS[k].configs))]
    picks = [("bf16-D256-infonce", biggest), ("bf16-D512-oucl-exclude", smallest)]
    return [(k, c, KERNELS[k].configs.index(pick(KERNELS[k].configs))) for k in KERNELS for c, pick in picks]


def source(kernel, case: str, config) -> ASTSource:
    """The kernel specialised as a launch with these inputs would specialise it: constexprs from
    `_constants`, absent excluded keys as None, 16-byte alignment of the pointers and row strides."""
    dtype, dim, logits, n_exclude = CASES[case]
    fn = kernel.fn
    features = torch.empty(0, dim, dtype=dtype)  # _constants reads only the width and dtype
    constants = dict(triton_lse._constants(features, logits), N_EXCLUDE=n_exclude, **config.kwargs)
    constexprs = {p.name: constants[p.name] for p in fn.params if p.is_constexpr}
    signature, aligned = {}, []
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name == "EXCLUDE":
            signature[name] = "*i32" if n_exclude else "constexpr"
            if not n_exclude:
                constexprs[name] = None
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name.isupper():
            signature[name] = "*fp32" if name in FP32_POINTERS else f"*{TRITON_DTYPE[dtype]}"
            aligned.append(name)
        else:
            signature[name] = "i32"
            if name.endswith("stride") and name != "exclude_stride":
                aligned.append(name)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


PTXAS_USAGE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """A cache of its own: a cached kernel would skip ptxas, and its log with it."""
    folder = tmp_path_factory.mktemp("triton-aot-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(folder))
        mp.setenv("TRITON_DUMP_PTXAS_LOG", "1")  # ptxas -v output to stdout, which the test reads
        yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_ptxas_is_in_the_wheel():
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    assert ptxas.is_file() and os.access(ptxas, os.X_OK), f"{ptxas} missing: the AOT compiles need it"


@pytest.mark.parametrize("kernel, case, index", compilations(),
                         ids=lambda v: str(v) if not isinstance(v, int) else f"config{v}")
def test_compiles_for_sm90(kernel, case, index, fresh_cache, capsys):
    config = KERNELS[kernel].configs[index]
    options = make_backend(SM90).parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source(KERNELS[kernel], case, config), target=SM90, options=options.__dict__)
    assert "cubin" in compiled.asm and compiled.asm["cubin"], f"{kernel} {case}: no cubin"
    usage = PTXAS_USAGE.search(log.getvalue())
    assert usage, f"no ptxas -v report in the compile log:\n{log.getvalue()[-2000:]}"
    spill_stores, spill_loads, registers = map(int, usage.groups())
    shared = compiled.metadata.shared
    tile = "BLOCK_M={BLOCK_M} BLOCK_N={BLOCK_N}".format(**config.kwargs)
    with capsys.disabled():
        print(f"\nsm_90 {kernel:<10} {case:<26} {tile} warps={config.num_warps} stages={config.num_stages}: "
              f"{registers} registers, spills {spill_stores} B stored / {spill_loads} B loaded, "
              f"{shared / 1024:.0f} KiB shared", end="")
    if shared > SM90_SHARED_BYTES:
        warnings.warn(f"{kernel} {case} {tile} warps={config.num_warps} stages={config.num_stages} needs "
                      f"{shared / 1024:.0f} KiB of shared memory, over sm_90's {SM90_SHARED_BYTES // 1024} KiB: "
                      "it can never launch there, and autotuning skips it")
