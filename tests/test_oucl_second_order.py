"""Second derivatives of OUCL, as MetAug's meta step takes them (autograd.grad with create_graph, then
again): Hessian-vector products of `oucl_loss` on the chunked and Triton paths against the dense reference
for every switch, and MetAug's meta gradient dM/dφ against a direct float64 computation in both scopes.

With detach_weights (the default), Γ is a constant in every derivative, as in the released code's meta
step; without it, Γ is differentiated everywhere. The Triton cases run under TRITON_INTERPRET=1 in a
subprocess, as in test_infonce_triton.py, and natively on a GPU.
"""

from __future__ import annotations

import importlib.util
import itertools
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from interpreter import INTERPRETING, run_under_interpreter
from pipeline.losses import chunked, oucl_loss
from test_infonce import relative_error, unit_rows

HAS_TRITON = importlib.util.find_spec("triton") is not None
DIM = 16  # the smallest feature dim the Triton kernels take

# Every combination of oucl_loss's switches; without weighting there is no Γ, so detach_weights does nothing.
SWITCHES = {
    f"weighting={w}, margins={m}" + (f", detach_weights={d}" if w else ""): dict(weighting=w, margins=m, detach_weights=d)
    for w, m, d in itertools.product([True, False], repeat=3) if w or d
}

# float64 inputs per layout; "k": None means the keys are the anchors themselves (MetAug's layout).
LAYOUTS = {
    "sets of one image, self masked": lambda g: dict(
        q=unit_rows(g, 12, DIM), k=None, mask_self=True,
        positives=torch.stack([(torch.arange(12) + 4) % 12, (torch.arange(12) + 8) % 12], 1),
    ),
    "anchors against keys, a repeated positive": lambda g: dict(
        q=unit_rows(g, 10, DIM), k=unit_rows(g, 21, DIM),
        positives=torch.stack([torch.arange(10), torch.arange(10) + 9, torch.arange(10)], 1),
    ),
    # Off the unit sphere Γ reaches its clamps (cos < -1 - 2γ); a small β gives those pairs weight.
    "clamped weights": lambda g: dict(
        q=1.8 * unit_rows(g, 12, DIM), k=None, mask_self=True, positives=(torch.arange(12) + 6) % 12,
        gamma=0.1, beta=1.0,
    ),
}


@pytest.fixture
def small_chunks(monkeypatch):
    """A few keys per chunk, so that the backward combines several chunks and a partial last one."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 60)


def gradient_and_hvp(layout: str, switches: dict, impl: str, dtype: torch.dtype, device: str = "cpu"):
    """(∇L, H·v) of the mean OUCL with respect to anchors and keys, for a fixed random direction v."""
    g = torch.Generator().manual_seed(0)
    inputs = LAYOUTS[layout](g)
    q = inputs.pop("q")
    k = inputs.pop("k")
    directions = [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in (q, k) if t is not None]
    leaves = [t.to(device, dtype, copy=True).requires_grad_() for t in (q, k) if t is not None]
    anchors, keys = leaves[0], leaves[-1]
    options = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in inputs.items()}
    loss = oucl_loss(anchors, keys, impl=impl, **options, **switches)
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    along = sum((gr * v.to(device, gr.dtype)).sum() for gr, v in zip(grads, directions))
    hvp = torch.autograd.grad(along, leaves)
    return flat(grads), flat(hvp)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten().cpu() for t in tensors])


def assert_matches_reference(layout: str, switches: dict, impl: str, dtype: torch.dtype, tolerance: float, device="cpu"):
    expected = gradient_and_hvp(layout, switches, "reference", torch.float64, device)
    actual = gradient_and_hvp(layout, switches, impl, dtype, device)
    for name, a, e in zip(("gradient", "Hessian-vector product"), actual, expected):
        err = relative_error(a, e)
        assert err <= tolerance, f"{layout}, {switches}, {impl}: {name} relative error {err:.2e}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_chunked_second_derivative_matches_reference(layout, switches, small_chunks):
    assert_matches_reference(layout, switches, "chunked", torch.float64, 1e-10)


def test_holding_gamma_constant_changes_the_second_derivative():
    """The check above can tell the two conventions apart: with Γ differentiated the product differs."""
    layout, weighted = "sets of one image, self masked", dict(weighting=True, margins=True)
    _, held = gradient_and_hvp(layout, dict(weighted, detach_weights=True), "reference", torch.float64)
    _, differentiated = gradient_and_hvp(layout, dict(weighted, detach_weights=False), "reference", torch.float64)
    assert relative_error(differentiated, held) > 0.1


# --- Triton -----------------------------------------------------------------------------------------------

DEVICES = [
    pytest.param("cpu", id="interpreter", marks=pytest.mark.skipif(
        not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess of test_triton_under_interpreter")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU (and no interpreter)")]),
]


@pytest.mark.skipif(INTERPRETING or not HAS_TRITON, reason="this process is the interpreter run, or no triton")
def test_triton_under_interpreter():
    run_under_interpreter(__file__, "triton_second_derivative")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS)[:1])
@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_triton_second_derivative_matches_reference(layout, switches, device):
    """fp32 kernels against the float64 reference: the forward, and the backward of the first gradient's
    dependence on lse, both query and key kernels (keys = anchors). The first gradient itself is PyTorch's
    under create_graph, the code tested above on every layout."""
    assert_matches_reference(layout, switches, "triton", torch.float32, 1e-5, device)


# --- MetAug's meta gradient -------------------------------------------------------------------------------


def direct_oucl(sets, beta, gamma):
    """OUCL of METHODS.md over feature sets of the same images, dense, with Γ held constant: positives are
    the anchor's image in the other sets, negatives every other image."""
    feats = torch.cat(sets)
    image = torch.arange(sets[0].shape[0]).repeat(len(sets))
    same = image[:, None] == image[None, :]
    positive = same & ~torch.eye(len(feats), dtype=torch.bool)
    s = (feats @ feats.T + 1) / 2
    weight_pos, weight_neg = (1 + gamma - s).clamp_min(0).detach(), (s + gamma).clamp_min(0).detach()
    negatives = torch.where(same, 0.0, torch.exp(beta * weight_neg * (s - gamma))).sum(1)
    positives = torch.where(positive, torch.exp(-beta * weight_pos * (s - (1 - gamma))), 0.0).sum(1)
    return torch.log1p(negatives * positives).mean()


def direct_regulariser(originals, generated):
    """R of METHODS.md: generated positives easier than m⁺, generated negatives easier than m⁻."""
    feats, gen = torch.cat(originals), torch.cat(generated)
    image = torch.arange(originals[0].shape[0]).repeat(len(originals))
    same = image[:, None] == image[None, :]
    s, s_gen = (feats @ feats.T + 1) / 2, (feats @ gen.T + 1) / 2
    hardest_pos = s.masked_fill(~same | torch.eye(len(feats), dtype=torch.bool), float("inf")).amin(1, keepdim=True)
    hardest_neg = s.masked_fill(same, float("-inf")).amax(1, keepdim=True)
    m_pos, m_neg = torch.minimum(hardest_pos, hardest_neg), torch.maximum(hardest_pos, hardest_neg)
    return (s_gen - m_pos).clamp_min(0)[same].mean() + (m_neg - s_gen).clamp_min(0)[~same].mean()


def direct_meta_gradient(method, xs):
    """dM/dφ from the definitions: θ' = θ − ε·∇θ L(θ, φ) over the scope's weights with the graph kept,
    M = L(θ', φ) + w·R(z(θ'), g(θ', φ)), L = OUCL(z) + δ·OUCL(z, g). Buffers are copies, as in the method."""
    beta, gamma, delta = method.oucl["beta"], method.oucl["gamma"], method.delta
    modules = {"backbone": method.backbone, "projector": method.projector}
    scope = ["projector"] if method.scope == "projector" else ["backbone", "projector"]
    theta = {m: {n: p for n, p in modules[m].named_parameters() if p.requires_grad} for m in scope}
    phi = [{n: p.detach().clone().requires_grad_() for n, p in g.named_parameters()} for g in method.generators]

    def call(module, params, x):
        return functional_call(module, {**{n: b.clone() for n, b in module.named_buffers()}, **params}, (x,))

    def features(weights):
        attention = sdpa_kernel(SDPBackend.MATH) if method.scope == "encoder" else nullcontext()
        with attention:
            h = call(method.backbone, weights.get("backbone", {}), torch.cat(xs))
        z = F.normalize(call(method.projector, weights["projector"], h), dim=1).chunk(2)
        g = [F.normalize(call(gen, p, zv), dim=1) for gen, p, zv in zip(method.generators, phi, z)]
        return list(z), g

    def inner_loss(z, g):
        return direct_oucl(z, beta, gamma) + delta * direct_oucl(z + g, beta, gamma)

    flat = [p for m in scope for p in theta[m].values()]
    grads = iter(torch.autograd.grad(inner_loss(*features(theta)), flat, create_graph=True))
    fast = {m: {n: p - method.inner_lr * next(grads) for n, p in theta[m].items()} for m in scope}
    z, g = features(fast)
    objective = inner_loss(z, g) + method.reg_weight * direct_regulariser(z, g)
    return torch.autograd.grad(objective, [t for d in phi for t in d.values()])


@pytest.mark.parametrize("scope", ["projector", "encoder"])
def test_meta_gradient_matches_the_direct_computation(scope):
    """fp64, the paper's OUCL (Γ weights, margins), large δ, R weight and ε so that every path matters; the
    twice-differentiated loss on the chunked path, what the method runs unless told to use the reference."""
    from test_metaug import metaug_config, views
    from pipeline.methods.metaug import MetAug

    torch.manual_seed(0)
    cfg = metaug_config(f"method.metaug.scope={scope}", "method.metaug.delta=0.5", "method.metaug.reg_weight=0.5",
                        "method.metaug.inner_lr=0.5")
    method = MetAug(cfg).double()
    assert method.impl_twice == "chunked"
    xs = views(dtype=torch.float64)
    expected = flat(direct_meta_gradient(method, xs))
    x, h, z = method.encode(xs)
    got, _ = method.meta_gradients(x, h, z, method.contrast(z, method.impl_twice))
    err = relative_error(flat(got), expected)
    assert err <= 1e-12, f"{scope}: dM/dφ relative error {err:.2e}"
