"""SDMP: soft targets by global index, the loss against a dense direct computation, each form against a
float64 computation of its definition, the λ band, the paste, the seeded view order, and gradients at world
size 2 against one process."""

import copy
import inspect

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import pipeline.data.mixing as mixing_module
import pipeline.methods.sdmp as sdmp_module
from conftest import tiny_config
from distributed_utils import spawn
from pipeline.data.mixing import METHODS, mix
from pipeline.methods import build_method
from pipeline.methods.sdmp import mixing_targets, soft_contrast

HEADS = ["model.predictor={hidden_dim: 32, out_dim: 16, layers: 1}"]


def _targets_worker(rank, world, out):
    lam = torch.tensor([0.9, 0.3, 0.6, 0.5]) + 0.01 * rank
    targets, clean, mixed = mixing_targets(lam, lam)
    save_file({"targets": targets, "clean": clean, "mixed": mixed}, f"{out}-{rank}.safetensors")


def test_targets_point_at_the_image_and_its_partner_by_global_index(tmp_path):
    spawn(_targets_worker, 2, str(tmp_path / "t"))
    for rank in range(2):
        got = load_file(tmp_path / f"t-{rank}.safetensors")
        own = torch.arange(4) + 4 * rank
        assert torch.equal(got["targets"], torch.stack([own, 4 * rank + 3 - torch.arange(4)], 1))
        for key in ("clean", "mixed"):
            torch.testing.assert_close(got[key].sum(1), torch.ones(4))
        lam = torch.tensor([0.9, 0.3, 0.6, 0.5]) + 0.01 * rank
        torch.testing.assert_close(got["clean"][:, 0], lam)
        lam_p = lam.flip(0)
        c = torch.minimum(lam, 1 - lam_p) + torch.minimum(1 - lam, lam_p)
        torch.testing.assert_close(got["mixed"][:, 1], c / (1 + c))


@pytest.mark.parametrize("form", ["soft_ce", "log_mixture"])
def test_soft_contrast_equals_a_dense_computation(form):
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    targets = torch.randint(0, 10, (6, 2), generator=g)
    lam = torch.rand(6, generator=g, dtype=torch.float64)
    weights = torch.stack([lam, 1 - lam], 1)
    got = soft_contrast(q, keys, targets, weights, 0.2, form, "reference")
    log_p = torch.log_softmax(q @ keys.T / 0.2, 1).gather(1, targets)
    if form == "soft_ce":
        expected = -(weights * log_p).sum(1).mean()
    else:
        expected = -torch.log((weights * log_p.exp()).sum(1)).mean()
    torch.testing.assert_close(got, expected)


def test_mixed_targets_reduce_to_infonce_without_mixing():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    targets, clean, _ = mixing_targets(torch.ones(4), torch.ones(4))
    plain = torch.nn.functional.cross_entropy(q @ keys.T / 0.2, torch.arange(4))
    for form in ("soft_ce", "log_mixture"):
        torch.testing.assert_close(soft_contrast(q, keys, targets, clean, 0.2, form, "reference"), plain)


# --- gradients: world size 2 against one process ---------------------------------------------------------

LAM = torch.tensor([0.7, 0.2, 0.55, 0.9, 0.35, 0.6, 0.8, 0.1])


def views(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]


def fixed_mixing(rows_per_rank: int):
    """Mixup with fixed λ and each rank's own partners, for any split of the global batch: a run on the
    whole batch mixes each rank's rows exactly as that rank does."""

    def mixed_pair(x1, x2):
        offset = dist.get_rank() * x1.shape[0] if dist.is_initialized() else 0
        parts = [range(s, s + rows_per_rank) for s in range(0, x1.shape[0], rows_per_rank)]
        m1 = torch.cat([mix(x1[p.start : p.stop], "mixup", lam=LAM[offset + p.start : offset + p.stop])[0] for p in parts])
        m2 = torch.cat([mix(x2[p.start : p.stop], "mixup", lam=LAM[offset + p.start : offset + p.stop])[0] for p in parts])
        lam = LAM[offset : offset + x1.shape[0]]
        if dist.is_initialized():
            return m1, m2, *mixing_targets(lam, lam)
        # one process: targets of each virtual rank's rows, by global index
        pieces = []
        for r, p in enumerate(parts):
            t, c, m = mixing_targets(lam[p.start : p.stop], lam[p.start : p.stop])
            pieces.append((t + r * rows_per_rank, c, m))
        return m1, m2, *(torch.cat(x) for x in zip(*pieces))

    return mixed_pair


def sdmp_gradients(name: str, rank: int, world: int) -> dict:
    """Both forms, two steps each (seed 1 draws the released view order swapped, then not)."""
    grads, rows = {}, 8 // world
    for form in ("released", "symmetric"):
        torch.manual_seed(0)
        method = build_method(tiny_config(name, *HEADS, f"method.sdmp.form={form}", "train.seed=1"))
        method.mixed_pair = fixed_mixing(4)
        orders = record_view_order(method)
        loss = sum(method([v[rank * rows : (rank + 1) * rows] for v in views(seed)])[0] for seed in (3, 4))
        loss.backward()
        assert orders == ([True, False] if form == "released" else [])
        grads.update({f"{form}/{n}": p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    return grads


def record_view_order(method) -> list[bool]:
    """Whether each released step swapped the views; the draws themselves stay the method's own."""
    swaps, draw = [], method.view_order

    def recording(x1, x2):
        a, b = draw(x1, x2)
        swaps.append(a is x2)
        return a, b

    method.view_order = recording
    return swaps


def _sdmp_worker(rank, world, name, out):
    grads = sdmp_gradients(name, rank, world)
    if rank == 0:
        save_file(grads, out)


@pytest.mark.parametrize("name", ["sdmp_mocov3", "sdmp_simclr"])
def test_sdmp_gradients_at_world_size_2_equal_one_process(tmp_path, name):
    """The released view order is drawn alike on every rank: were it not, the gradients would differ."""
    spawn(_sdmp_worker, 2, name, str(tmp_path / "g.safetensors"))
    got, expected = load_file(tmp_path / "g.safetensors"), sdmp_gradients(name, 0, 1)
    assert got.keys() == expected.keys()
    for key in expected:
        error = (got[key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)
        assert error < 1e-5, f"{key}: {error:.2e}"


# --- each form against its definition, in float64 ---------------------------------------------------------


def record_mixing(monkeypatch) -> list[tuple]:
    """(input, mixed, λ) of each mix() call SDMP makes, the draws its own."""
    calls = []

    def recording(x, *args, **kwargs):
        out = mix(x, *args, **kwargs)
        calls.append((x, *out))
        return out

    monkeypatch.setattr(sdmp_module, "mix", recording)
    return calls


def unit(t):
    return F.normalize(t.double(), dim=1)


def ctr(q, k, tau):
    """MoCo v3's ctr(q, k) = 2τ · CE(q·kᵀ/τ, own index)."""
    return 2 * tau * F.cross_entropy(q @ k.T / tau, torch.arange(q.shape[0]))


def nt_xent_rows(za, zb, tau):
    """NT-Xent's rows of anchors za: against [za; zb] without themselves, positive zb of the same image."""
    n = za.shape[0]
    logits = (za @ torch.cat([za, zb]).T / tau).index_put((torch.arange(n), torch.arange(n)), torch.tensor(-torch.inf, dtype=za.dtype))
    return F.cross_entropy(logits, torch.arange(n) + n)


def soft(q, k, tau, own):
    """-Σ_p w_p log softmax(q·kᵀ/τ)_p, weight `own` on the image itself and 1 - own on its partner B-1-i."""
    log_p, i = torch.log_softmax(q @ k.T / tau, 1), torch.arange(q.shape[0])
    return -(own * log_p[i, i] + (1 - own) * log_p[i, i.flip(0)]).mean()


def definition(method, x1, x2, swap, calls):
    """The loss as the module docstring defines it, in float64 on a float64 copy of the model, with the
    recorded mixing draws."""
    sdmp, tau, ref = method.cfg.method.sdmp, method.temperature, copy.deepcopy(method).double()
    (xq, mq, lam_q), (xk, mk, lam_k) = calls
    released = sdmp.form == "released"
    a, b = (x2, x1) if swap else (x1, x2)
    assert torch.equal(xq, b if released else x1) and torch.equal(xk, a if released else x2)  # the mixed query's view
    lam_p = lam_k.double().flip(0)
    lam_q = lam_q.double()
    shared = torch.minimum(lam_q, 1 - lam_p) + torch.minimum(1 - lam_q, lam_p)
    if method.cfg.method.name == "sdmp_mocov3":
        q = lambda x: unit(ref.predictor(ref.projector(ref.backbone(x.double()))))  # noqa: E731
        k = lambda x: unit(ref.momentum_encoder(x.double()))  # noqa: E731
        base = ctr(q(a), k(b), tau) if released else ctr(q(x1), k(x2), tau) + ctr(q(x2), k(x1), tau)
        clean = k(a if released else x2)
        against_clean = 2 * tau * soft(q(mq), clean, tau, lam_q)
        against_mixed = 2 * tau * soft(q(mq), k(mk), tau, 1 / (1 + shared))
    else:
        e = lambda x: unit(ref.projector(ref.backbone(x.double())))  # noqa: E731
        if released:
            base = nt_xent_rows(e(a), e(b), tau)
        else:
            base = (nt_xent_rows(e(x1), e(x2), tau) + nt_xent_rows(e(x2), e(x1), tau)) / 2
        clean = e(a if released else x2)
        against_clean = soft(e(mq), clean, tau, lam_q)
        against_mixed = soft(e(mq), e(mk), tau, 1 / (1 + shared))
    return base + sdmp.weight * (against_clean + against_mixed)


FORMS = [("released", False, []), ("released", True, []), ("symmetric", None, ["method.sdmp.weight=0.3"])]


@pytest.mark.parametrize("name", ["sdmp_mocov3", "sdmp_simclr"])
@pytest.mark.parametrize("form, swap, extra", FORMS)
def test_each_form_is_its_definition(monkeypatch, name, form, swap, extra):
    torch.manual_seed(0)
    method = build_method(tiny_config(name, f"method.sdmp.form={form}", "method.loss_impl=reference", "train.seed=6", *extra))
    method.view_order = lambda x1, x2: (x2, x1) if swap else (x1, x2)
    calls = record_mixing(monkeypatch)
    x1, x2 = views()
    for _ in range(3):  # seed 6 draws resizemix, mixup, cutmix
        calls.clear()
        loss, _ = method([x1, x2])
        torch.testing.assert_close(loss.double(), definition(method, x1, x2, swap, calls), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form, band", [("released", (0.1, 0.9)), ("symmetric", (0.0, 1.0))])
def test_lambda_is_drawn_in_the_forms_band(monkeypatch, form, band):
    """λ before any box: with mixup nothing recomputes it; Beta(0.2, 0.2) puts draws near both ends."""
    method = build_method(tiny_config("sdmp_mocov3", f"method.sdmp.form={form}", "method.sdmp.alpha=0.2", "method.sdmp.mix=mixup"))
    calls = record_mixing(monkeypatch)
    x = torch.randn(512, 1, 2, 2)
    method.mixed_pair(x, x)
    lam, eps = calls[0][2], 1e-6  # float32 rounding of the band's ends
    assert band[0] - eps <= lam.min() < band[0] + 0.02 and band[1] - 0.02 < lam.max() <= band[1] + eps


@pytest.mark.parametrize("how", METHODS)
def test_the_mixed_views_hold_the_partner(how):
    """The released code computes a box and its λ but never pastes; here the partner is in the image."""
    method = build_method(tiny_config("sdmp_mocov3", f"method.sdmp.mix={how}"))
    x = (torch.arange(4.0) + 1).view(-1, 1, 1, 1).expand(4, 3, 16, 16)  # image i is all i + 1
    for view in (x, x + 10):
        mixed, _, _, w_clean, _ = method.mixed_pair(view, view)
        lam = w_clean[:, 0].view(-1, 1, 1, 1)
        assert (lam < 0.95).all()  # at most 0.9 before a box: something is pasted
        if how == "mixup":
            torch.testing.assert_close(mixed, lam * view + (1 - lam) * view.flip(0))
        else:  # a constant partner resized is still constant: each pixel is the image's or the partner's
            own, other = (mixed - view).abs() < 1e-4, (mixed - view.flip(0)).abs() < 1e-4
            assert (own | other).all()
            torch.testing.assert_close(own.float().mean((1, 2, 3)), lam.flatten())


def test_the_view_order_is_seeded_alike_on_every_rank_and_takes_both_values():
    x1, x2 = views()

    def orders(seed):
        method = build_method(tiny_config("sdmp_simclr", f"train.seed={seed}"))
        return [method.view_order(x1, x2)[0] is x2 for _ in range(12)]

    first = orders(5)
    assert first == orders(5) and first != orders(6) and set(first) == {True, False}


def test_the_released_form_refuses_local_views():
    multicrop = "data.views=[{size: 16}, {size: 16}, {size: 8}]"
    with pytest.raises(ValueError, match="method.sdmp.form=symmetric"):
        tiny_config("sdmp_mocov3", multicrop)
    tiny_config("sdmp_mocov3", multicrop, "method.sdmp.form=symmetric")


def test_the_step_reads_nothing_back_to_the_host():
    for module in (sdmp_module, mixing_module):
        source = inspect.getsource(module)
        for call in (".item(", ".tolist(", ".cpu(", ".numpy(", "int(torch", "bool(torch", "float(torch"):
            assert call not in source, f"{module.__name__}: {call}"
