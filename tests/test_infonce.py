"""InfoNCE and OUCL: the dense reference against textbook cross-entropy, the chunked path against the
reference in float64 (loss and gradients), and clear errors for bad input.

The harness here (cases, `assert_info_nce_matches`, `assert_oucl_matches`) is shared with
test_infonce_triton.py, which runs the same cases on the Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import chunked, gathered_info_nce, info_nce, oucl_log_sum_exps, oucl_loss
from pipeline.losses.checks import resolve_impl, value_checks_enabled

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def unit_rows(g: torch.Generator, rows: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, dtype=torch.float64, generator=g), dim=1)


def soft_weights(g: torch.Generator, rows: int, columns: int) -> torch.Tensor:
    w = torch.rand(rows, columns, dtype=torch.float64, generator=g) + 0.1
    return w / w.sum(1, keepdim=True)


def zero_some(g: torch.Generator, rows: int) -> torch.Tensor:
    """Upstream gradient for reduction="none": random, exactly zero on every third row."""
    upstream = torch.rand(rows, dtype=torch.float64, generator=g) + 0.5
    upstream[::3] = 0
    return upstream


# Each case builds float64 inputs for info_nce from a generator and a feature dim. "k": None means the
# keys are the queries themselves (NT-Xent); "upstream" weights the per-row losses of reduction="none".
INFO_NCE_CASES = {
    "B<N": lambda g, d: dict(q=unit_rows(g, 21, d), k=unit_rows(g, 37, d), temperature=0.1),
    "B>N, sum": lambda g, d: dict(
        q=unit_rows(g, 40, d), k=unit_rows(g, 23, d), temperature=0.1, reduction="sum",
        targets=torch.randint(0, 23, (40,), generator=g),
    ),
    "NT-Xent": lambda g, d: dict(
        q=unit_rows(g, 26, d), k=None, temperature=0.2, mask_self=True, targets=(torch.arange(26) + 13) % 26,
    ),
    "soft targets + queue": lambda g, d: dict(
        q=unit_rows(g, 19, d), k=unit_rows(g, 33, d), temperature=0.1, queue=unit_rows(g, 17, d),
        targets=torch.stack([torch.arange(19), 18 - torch.arange(19)], 1), target_weights=soft_weights(g, 19, 2),
    ),
    "gathered offsets": lambda g, d: dict(
        q=unit_rows(g, 13, d), k=unit_rows(g, 40, d), temperature=0.1, reduction="sum",
        mask_self=torch.arange(13) + 20, targets=(torch.arange(13) + 21) % 40,
    ),
    "MoCo v2": lambda g, d: dict(
        q=unit_rows(g, 24, d), k=unit_rows(g, 24, d), temperature=0.2, queue=unit_rows(g, 29, d),
        in_batch_negatives=False,
    ),
    "own positives only, repeated": lambda g, d: dict(
        q=unit_rows(g, 17, d), k=unit_rows(g, 22, d), temperature=0.1, in_batch_negatives=False,
        targets=torch.stack([torch.arange(17), torch.arange(17) + 5, torch.arange(17)], 1),
        target_weights=soft_weights(g, 17, 3),
    ),
    "sharp, zero-gradient rows": lambda g, d: dict(
        q=unit_rows(g, 22, d), k=unit_rows(g, 35, d), temperature=0.02, reduction="none",
        upstream=zero_some(g, 22),
    ),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def _run(fn, inputs: dict, dtype: torch.dtype, device: str, **fixed):
    """Call fn on copies of the float64 inputs; returns (output, grad q, grad k)."""
    inputs = dict(inputs)
    upstream = inputs.pop("upstream", None)
    q = inputs.pop("q").to(device, dtype, copy=True).requires_grad_()
    k_in = inputs.pop("k")
    k = q if k_in is None else k_in.to(device, dtype, copy=True).requires_grad_()
    options = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if name == "queue" else value.to(device)
        options[name] = value
    out = fn(q, k, **options, **fixed)
    total = out if upstream is None else (out * upstream.to(device, out.dtype)).sum()
    total.backward()
    return out.detach(), q.grad, None if k_in is None else k.grad


def assert_info_nce_matches(case: str, impl: str, dtype: torch.dtype, device: str = "cpu", dim: int = 32, seed: int = 0):
    inputs = INFO_NCE_CASES[case](torch.Generator().manual_seed(seed), dim)
    assert_matches_reference(inputs, impl, dtype, device, label=f"{case}, D={dim}")


def assert_matches_reference(inputs: dict, impl: str, dtype: torch.dtype, device: str, label: str):
    expected = _run(info_nce, inputs, torch.float64, device, impl="reference")
    actual = _run(info_nce, inputs, dtype, device, impl=impl)
    for name, a, e in zip(("loss", "grad q", "grad k"), actual, expected):
        if e is not None:
            assert a.dtype == (torch.float32 if name == "loss" else dtype)
            err = relative_error(a, e)
            assert err <= TOLERANCE[dtype], f"{label}, {impl}, {dtype}: {name} relative error {err:.2e}"
    if "upstream" in inputs:  # rows whose loss gets no gradient give their query none at all
        assert (actual[1][inputs["upstream"] == 0] == 0).all()


def _oucl_rows(anchors, keys, **options):
    return torch.stack(oucl_log_sum_exps(anchors, keys, **options), 1)


OUCL_CASES = {
    "paper form": lambda g, d: dict(
        q=unit_rows(g, 23, d), k=unit_rows(g, 31, d), positives=torch.stack([torch.arange(23), torch.arange(23) + 8], 1),
    ),
    "paper form, weights differentiated": lambda g, d: dict(
        q=unit_rows(g, 23, d), k=unit_rows(g, 31, d), positives=torch.arange(23) + 3, detach_weights=False,
    ),
    "released form": lambda g, d: dict(
        q=unit_rows(g, 23, d), k=unit_rows(g, 31, d), positives=torch.stack([torch.arange(23), torch.arange(23)], 1),
        weighting=False, margins=False,
    ),
    # Features off the unit sphere reach the clamps of Γ (cos < -1 - 2γ), which unit features never do;
    # a small β gives the clamped pairs a visible share of the softmax.
    "NT-Xent, clamped weights": lambda g, d: dict(
        q=1.8 * unit_rows(g, 30, d), k=None, positives=(torch.arange(30) + 15) % 30, mask_self=True,
        detach_weights=False, gamma=0.1, beta=1.0,
    ),
    # Row 0 leaves out all of keys 0-15: a whole key tile under the interpreter.
    "a tile of positives": lambda g, d: dict(
        q=unit_rows(g, 6, d), k=unit_rows(g, 40, d), positives=(torch.arange(16) + 3 * torch.arange(6)[:, None]) % 40,
    ),
}


def assert_oucl_matches(case: str, impl: str, dtype: torch.dtype, device: str = "cpu", dim: int = 32, seed: int = 0):
    inputs = OUCL_CASES[case](torch.Generator().manual_seed(seed), dim)
    inputs["upstream"] = torch.tensor([1.0, 0.5], dtype=torch.float64)  # weigh LSE_neg and LSE_pos apart
    expected = _run(_oucl_rows, inputs, torch.float64, device, impl="reference")
    actual = _run(_oucl_rows, inputs, dtype, device, impl=impl)
    for name, a, e in zip(("log-sum-exps", "grad anchors", "grad keys"), actual, expected):
        if e is not None:
            err = relative_error(a, e)
            assert err <= TOLERANCE[dtype], f"OUCL {case}, {impl}, {dtype}: {name} relative error {err:.2e}"


@pytest.fixture
def small_chunks(monkeypatch):
    """A few keys per chunk, so the online log-sum-exp combines many chunks and a partial last one."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 200)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", INFO_NCE_CASES)
def test_chunked_matches_reference(case, dtype, small_chunks):
    assert_info_nce_matches(case, "chunked", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", OUCL_CASES)
def test_oucl_chunked_matches_reference(case, dtype, small_chunks):
    assert_oucl_matches(case, "chunked", dtype)


def test_auto_is_chunked_on_the_cpu():
    assert resolve_impl("auto", torch.zeros(2, 16)) == "chunked"
    g = torch.Generator().manual_seed(1)
    q, k = unit_rows(g, 9, 16).float(), unit_rows(g, 12, 16).float()
    assert torch.equal(info_nce(q, k, 0.1), info_nce(q, k, 0.1, impl="chunked"))


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_queue_gets_no_gradient(impl):
    g = torch.Generator().manual_seed(6)
    q, k = unit_rows(g, 5, 16).requires_grad_(), unit_rows(g, 7, 16)
    queue = unit_rows(g, 4, 16).requires_grad_()
    info_nce(q, k, 0.1, queue=queue, impl=impl).backward()
    assert queue.grad is None and q.grad is not None


# The reference is the definition; check it against PyTorch's cross-entropy written out per method.
def test_reference_is_cross_entropy():
    g = torch.Generator().manual_seed(2)
    q, k, queue = unit_rows(g, 10, 16), unit_rows(g, 14, 16), unit_rows(g, 6, 16)
    logits, queue_logits = q @ k.T / 0.1, q @ queue.T / 0.1

    assert torch.allclose(info_nce(q, k, 0.1, impl="reference"), F.cross_entropy(logits, torch.arange(10)))

    targets = torch.stack([torch.arange(10), 13 - torch.arange(10)], 1)
    weights = soft_weights(g, 10, 2)
    dense = torch.zeros(10, 20, dtype=torch.float64).scatter_add_(1, targets, weights)
    soft = info_nce(q, k, 0.1, targets=targets, target_weights=weights, queue=queue, impl="reference")
    assert torch.allclose(soft, F.cross_entropy(torch.cat([logits, queue_logits], 1), dense))

    moco = info_nce(q, k, 0.1, queue=queue, in_batch_negatives=False, reduction="sum", impl="reference")
    positive = (q * k[:10]).sum(1, keepdim=True) / 0.1
    expected = F.cross_entropy(torch.cat([positive, queue_logits], 1), torch.zeros(10, dtype=torch.long), reduction="sum")
    assert torch.allclose(moco, expected)

    z = unit_rows(g, 8, 16)
    ntxent = info_nce(z, z, 0.5, targets=(torch.arange(8) + 4) % 8, mask_self=True, reduction="none", impl="reference")
    masked = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
    assert torch.allclose(ntxent, F.cross_entropy(masked, (torch.arange(8) + 4) % 8, reduction="none"))


def test_released_oucl_with_one_positive_is_infonce():
    """Γ = 1 and no margins: log[1 + Σ_neg exp((cos⁻ − cos⁺)/T)] with T = 2/β, i.e. InfoNCE at T."""
    g = torch.Generator().manual_seed(3)
    a, k = unit_rows(g, 12, 16), unit_rows(g, 15, 16)
    released = oucl_loss(a, k, torch.arange(12), beta=16.0, weighting=False, margins=False, impl="chunked")
    assert torch.allclose(released, info_nce(a, k, 2 / 16.0, impl="reference"))


def test_gathered_info_nce_without_process_group_is_info_nce():
    g = torch.Generator().manual_seed(4)
    z = unit_rows(g, 10, 16)
    targets = (torch.arange(10) + 5) % 10
    assert torch.equal(
        gathered_info_nce(z, z, 0.2, targets=targets, mask_self=True),
        info_nce(z, z, 0.2, targets=targets, mask_self=True),
    )


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_value_checks_are_skipped_off_the_cpu_unless_anomaly_mode():
    meta = torch.empty(2, 16, device="meta")
    assert value_checks_enabled(torch.zeros(2, 16), None)
    assert not value_checks_enabled(meta)
    with torch.autograd.detect_anomaly(check_nan=False):
        assert value_checks_enabled(meta)


def _inputs(b=6, n=8, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return unit_rows(g, b, d).to(dtype), unit_rows(g, n, d).to(dtype)


q6, k8 = _inputs()
BAD_INPUTS = [
    (dict(q=q6[0]), ValueError, "q must be a 2-D tensor"),
    (dict(k=k8[:, :8]), ValueError, "k has feature dim D=8 but q has D=16"),
    (dict(k=k8.double()), TypeError, "k is torch.float64 but q is torch.float32"),
    (dict(queue=k8.bfloat16()), TypeError, "queue is torch.bfloat16"),
    (dict(k=k8.to("meta")), ValueError, "k is on meta but q is on cpu"),
    (dict(q=q6.index_fill(0, torch.tensor([2]), float("nan"))), ValueError, "q contains non-finite"),
    (dict(queue=k8.index_fill(0, torch.tensor([1]), float("inf"))), ValueError, "queue contains non-finite"),
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, 8])), IndexError, "targets must index 8 keys"),
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, -1])), IndexError, "targets must index 8 keys"),
    (dict(targets=torch.zeros(6)), TypeError, "targets must be an integer tensor"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "shape \\[B\\] or \\[B, P\\] with B=6"),
    (dict(target_weights=torch.ones(6, 1)), ValueError, "target_weights \\[B, P\\] needs targets"),
    (dict(targets=torch.zeros(6, 2, dtype=torch.long), target_weights=torch.full((6, 2), 0.6)), ValueError, "sum to 1"),
    (dict(targets=torch.zeros(6, 2, dtype=torch.long), target_weights=torch.tensor([[1.5, -0.5]] * 6)), ValueError, "non-negative"),
    (dict(targets=torch.zeros(6, 2, dtype=torch.long), target_weights=torch.ones(6, 3) / 3), ValueError, "must match targets"),
    (dict(mask_self=True, in_batch_negatives=False), ValueError, "in_batch_negatives=False"),
    (dict(mask_self=True), ValueError, "own positive key"),
    (dict(mask_self=torch.arange(6) + 3, targets=torch.arange(6) + 2), IndexError, "mask_self must index 8 keys"),
    (dict(mask_self="yes"), TypeError, "mask_self must be a bool or an integer tensor"),
    (dict(q=_inputs(b=9)[0], targets=None), ValueError, "needs N >= B"),
    (dict(k=k8[:1], targets=torch.zeros(6, dtype=torch.long), mask_self=torch.zeros(6, dtype=torch.long)), ValueError,
     "no key left"),
    (dict(temperature=0.0), ValueError, "temperature must be positive"),
    (dict(temperature=torch.tensor(0.1)), TypeError, "temperature must be a Python number"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
]


@pytest.mark.parametrize("bad, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_a_clear_error(bad, error, message):
    args = dict(q=q6, k=k8, temperature=0.1, targets=torch.arange(6))
    args.update(bad)
    with pytest.raises(error, match=message):
        info_nce(**args)


def test_triton_requirements_are_explained(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        info_nce(q6, k8, 0.1, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, to the ones after it
    with pytest.raises(ValueError, match="multiple of 16"):
        info_nce(q6[:, :12], k8[:, :12], 0.1, impl="triton")
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        info_nce(q6.double(), k8.double(), 0.1, impl="triton")


def test_oucl_bad_input_is_a_clear_error():
    with pytest.raises(IndexError, match="positives must index 8 keys"):
        oucl_loss(q6, k8, torch.arange(6) + 3)
    with pytest.raises(ValueError, match="listed among its positives"):
        oucl_loss(q6, k8, torch.arange(6), mask_self=True)
    with pytest.raises(ValueError, match="reduction must be one of"):
        oucl_loss(q6, k8, torch.arange(6), reduction="avg")
