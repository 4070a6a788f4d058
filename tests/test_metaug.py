"""MetAug with OUCL. The released form (the default): its step (encoder loss, then the meta step and the
generators' SGD update after the encoder's step) against a direct float64 computation. The meta_first form
(`metaug_config`): the meta step touches only the generators, its second-order gradient matches finite
differences, the regulariser keeps generated features from collapsing onto the originals, full steps in
both scopes. Both: OUCL's layout and R against direct computations, world size 2 against one process, the
generators' optimizer state through a checkpoint round trip, and the configurations refused."""

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import tiny_config
from distributed_utils import spawn
from models.generators import FeatureGenerator, feature_generators
from pipeline.config import load_config
from pipeline.methods.metaug import MetAug

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "launch" / "configs" / "metaug_resnet18_cifar.yaml"


def metaug_config(*extra: str):
    """The tiny ViT of conftest, a linear projector 64 → 16 and generators 16 → 8 → 8 → 16, in the meta_first
    form (what the tests below, and tests/test_oucl_second_order.py, were written for)."""
    return tiny_config("simclr", "method.name=metaug", "method.metaug.generator_hidden=8", "method.metaug.form=meta_first",
                       *extra)


def released_config(*extra: str):
    """As `metaug_config`, in the released form (the default)."""
    return tiny_config("simclr", "method.name=metaug", "method.metaug.generator_hidden=8", *extra)


def views(rows=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 3, 16, 16, generator=g, dtype=dtype) for _ in range(2)]


def encoder_params(method):
    return {n: p for n, p in method.named_parameters() if not n.startswith("generators.")}


# --- the two steps ---------------------------------------------------------------------------------------


def test_the_meta_step_changes_only_the_generators():
    torch.manual_seed(0)
    method = MetAug(metaug_config("method.metaug.scope=encoder"))
    assert not any(p.requires_grad for p in method.generators.parameters())
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    sentinel = {n: torch.full_like(p, 0.5) for n, p in encoder_params(method).items()}
    for n, p in encoder_params(method).items():
        p.grad = sentinel[n].clone()

    loss, parts = method(views())

    for n, p in encoder_params(method).items():
        assert torch.equal(p, before[n]), f"{n} changed in the meta step"
        assert torch.equal(p.grad, sentinel[n]), f"{n}.grad changed in the meta step"
    gens = dict(method.generators.named_parameters())
    assert all(p.grad is None for p in gens.values())
    assert any(not torch.equal(p, before[f"generators.{n}"]) for n, p in gens.items())
    logged = {"meta/reg", "meta/objective", "loss/oucl", "loss/oucl_generated", "meta/generated_cos_distance"}
    assert logged <= parts.keys()
    assert all(v.grad_fn is None and v.ndim == 0 for v in parts.values())

    loss.backward()  # the engine's backward: encoder only
    assert all(p.grad is None for p in method.generators.parameters())
    assert all(not torch.equal(p.grad, sentinel[n]) for n, p in encoder_params(method).items()
               if n.startswith("projector."))


def _meta_objective(method, xs, leaves, second_order=True):
    """M(φ) for generator weights `leaves`, from a fresh encoder pass; without `second_order` the fast
    weights are treated as constants (the first-order approximation)."""
    x, h, z = method.encode(xs)
    l_orig = method.contrast(z, method.impl_twice)
    if second_order:
        return method.meta_objective(x, h, z, l_orig, leaves)[0]
    inner, _ = method.objective(z, method.generate(z, leaves), l_orig, impl=method.impl_twice)
    fast = {m: {n: t.detach() for n, t in d.items()} for m, d in method.fast_weights(inner).items()}
    return method.meta_objective_at(fast, x, h, leaves)[0]


@pytest.mark.parametrize("scope", ["projector", "encoder"])
def test_meta_gradient_matches_finite_differences(scope):
    """fp64, large δ, R weight and ε so that every path matters. OUCL with the released switches (Γ = 1) is
    a smooth function; with Γ the loss module's weights are stop-gradient (circle-loss convention), so its
    gradient is a surrogate that finite differences cannot check."""
    torch.manual_seed(0)
    cfg = metaug_config(f"method.metaug.scope={scope}", "method.metaug.delta=0.5", "method.metaug.reg_weight=0.5",
                        "method.metaug.inner_lr=0.5", "method.oucl.weighted=false")
    method = MetAug(cfg).double()
    xs = views(dtype=torch.float64)
    leaves = method.generator_leaves()
    weight = leaves[0]["net.0.weight"]
    analytic = torch.autograd.grad(_meta_objective(method, xs, leaves), weight)[0]
    first_order = torch.autograd.grad(_meta_objective(method, xs, leaves, second_order=False), weight)[0]
    step = 1e-6
    for index in [(3, 5), (7, 15)]:
        value = weight[index].item()
        with torch.no_grad():
            weight[index] = value + step
        plus = _meta_objective(method, xs, leaves).item()
        with torch.no_grad():
            weight[index] = value - step
        minus = _meta_objective(method, xs, leaves).item()
        with torch.no_grad():
            weight[index] = value
        numeric = (plus - minus) / (2 * step)
        assert analytic[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
        # the second-order path through θ'(φ) is what makes the difference
        assert abs(first_order[index].item() - numeric) > 1e-3


def test_without_the_regulariser_generated_features_collapse_onto_the_originals():
    """Meta steps only (the encoder fixed), on spread-out features: two noisy views of 32 random points
    through the linear projector. Released δ = 1e-5; R at 100·δ (OUCL's gradients at β = 16 outweigh R's
    at equal weight)."""

    def distance_after(reg_weight: float, steps: int = 30) -> tuple[float, float]:
        torch.manual_seed(0)
        cfg = metaug_config("method.metaug.delta=1e-5", f"method.metaug.reg_weight={reg_weight}",
                            "method.metaug.generator_lr=1e-2", "method.metaug.generator_hidden=32")
        method = MetAug(cfg)
        g = torch.Generator().manual_seed(1)
        points = torch.randn(32, method.backbone.num_features, generator=g)
        h = torch.cat([points + 0.5 * torch.randn(points.shape, generator=g) for _ in range(2)])

        def distance():
            with torch.no_grad():
                z = method.project(method.projector(h))
                return torch.stack([1 - (a * b).sum(1).mean() for a, b in zip(method.generate(z), z)]).mean().item()

        start = distance()
        for _ in range(steps):
            z = method.project(method.projector(h))
            method.meta_step(None, h, z, method.contrast(z, method.impl_twice))
        return start, distance()

    start, collapsed = distance_after(0.0)
    same_start, kept = distance_after(1e-3)
    assert start == same_start > 0.8  # random generators: nearly orthogonal to the originals
    assert collapsed < 0.4 * start, (start, collapsed)
    assert kept > collapsed + 0.2, (collapsed, kept)


@pytest.mark.parametrize("scope", ["projector", "encoder"])
def test_a_full_method_step_runs(scope):
    torch.manual_seed(0)
    method = MetAug(metaug_config(f"method.metaug.scope={scope}"))
    encoder = [p for p in encoder_params(method).values() if p.requires_grad]
    optimizer = torch.optim.SGD(encoder, lr=0.1)
    start = [p.detach().clone() for p in encoder]
    generators = [p.detach().clone() for p in method.generators.parameters()]
    for seed in range(2):
        optimizer.zero_grad()
        loss, parts = method(views(seed=seed))
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
        loss.backward()
        assert all(p.grad is not None for p in encoder)
        optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(start, encoder))
    assert all(not torch.equal(a, b) for a, b in zip(generators, method.generators.parameters()))


# --- the released step ----------------------------------------------------------------------------------


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def released_objective(z, g, beta, gamma, delta, reg_weight):
    """train_MetAug.py's loss in the in-batch setting: (16/β)·[OUCL(z) + δ·(each view replaced by its
    generated features, then both)] + w·R with R's positive term scaled by 1e-4; Γ constant."""
    def oucl(sets):
        return direct_oucl(sets, beta, gamma, weighted=True, margins=True, constant_weights=True)

    generated_terms = oucl([g[0], z[1]]) + oucl([z[0], g[1]]) + oucl(g)
    return 16 / beta * (oucl(z) + delta * generated_terms) + reg_weight * direct_regulariser(z, g, 1e-4)


def test_released_step_matches_the_direct_computation():
    """fp64, β = 8 (so 16/β matters), large δ, R weight and ε; the engine's optimizer is plain SGD. One step:
    the encoder loss and its gradient at θ, the encoder's SGD step to θ₁, then `after_step`: fast weights
    θ' = θ₁ − ε·∇θ F(θ₁) over backbone and projector, M = F(θ'), the generators' first SGD step
    (momentum buffer = dM/dφ + 1e-4·φ, φ₁ = φ − 0.03·buffer)."""
    torch.manual_seed(0)
    cfg = released_config("method.oucl.beta=8", "method.metaug.delta=0.5", "method.metaug.reg_weight=0.5",
                          "method.metaug.inner_lr=0.5")
    method = MetAug(cfg).double()
    xs, encoder_lr, generator_lr, decay = views(dtype=torch.float64), 0.1, 0.03, 1e-4
    objective = partial(released_objective, beta=8.0, gamma=0.25, delta=0.5, reg_weight=0.5)
    modules = {"backbone": method.backbone, "projector": method.projector}
    theta = {m: {n: p.detach().clone().requires_grad_() for n, p in mod.named_parameters()} for m, mod in modules.items()}
    phi = [{n: p.detach().clone().requires_grad_() for n, p in g.named_parameters()} for g in method.generators]
    phi_flat = [t for d in phi for t in d.values()]

    def call(module, params, x):
        return functional_call(module, {**{n: b.clone() for n, b in module.named_buffers()}, **params}, (x,))

    def features(weights, generator_weights):
        with sdpa_kernel(SDPBackend.MATH):
            h = call(method.backbone, weights["backbone"], torch.cat(xs))
        z = list(F.normalize(call(method.projector, weights["projector"], h), dim=1).chunk(2))
        return z, [F.normalize(call(gen, p, zv), dim=1) for gen, p, zv in zip(method.generators, generator_weights, z)]

    def flat(weights):
        return [t for d in weights.values() for t in d.values()]

    frozen_phi = [{n: t.detach() for n, t in d.items()} for d in phi]
    encoder_loss = objective(*features(theta, frozen_phi))
    encoder_grads = torch.autograd.grad(encoder_loss, flat(theta))
    steps = iter(encoder_grads)
    theta_1 = {m: {n: (t - encoder_lr * next(steps)).detach().requires_grad_() for n, t in d.items()} for m, d in theta.items()}
    inner = iter(torch.autograd.grad(objective(*features(theta_1, phi)), flat(theta_1), create_graph=True))
    fast = {m: {n: t - 0.5 * next(inner) for n, t in d.items()} for m, d in theta_1.items()}
    meta_grads = torch.autograd.grad(objective(*features(fast, phi)), phi_flat)
    buffers = [g + decay * t.detach() for g, t in zip(meta_grads, phi_flat)]
    phi_1 = [t.detach() - generator_lr * b for t, b in zip(phi_flat, buffers)]

    encoder = [p for n, p in method.named_parameters() if not n.startswith("generators.")]
    optimizer = torch.optim.SGD(encoder, lr=encoder_lr)
    loss, parts = method(xs)
    torch.testing.assert_close(loss, encoder_loss, rtol=1e-12, atol=0)
    loss.backward()
    for p, expected in zip(encoder, encoder_grads):
        assert relative_error(p.grad, expected) < 1e-10
    optimizer.step()
    assert all(torch.equal(p, t) for p, t in zip(method.generators.parameters(), phi_flat))  # the encoder step first
    stepped = [(p.detach().clone(), p.grad.clone()) for p in encoder]
    assert method.after_step(0.0) == {} and not method.pending
    assert all(torch.equal(p, w) and torch.equal(p.grad, g) for p, (w, g) in zip(encoder, stepped))  # generators only
    generators = list(method.generators.parameters())
    for p, expected, b, start in zip(generators, phi_1, buffers, phi_flat):
        assert relative_error(p.detach() - start, expected - start) < 1e-10
        assert relative_error(method.generator_optimizer.state[p]["momentum_buffer"], b) < 1e-10
    assert any((p - t).abs().max() > 1e-6 for p, t in zip(generators, phi_flat))
    # the meta step's parts come with the next forward, for the meter to average
    assert {"meta/objective", "meta/reg", "meta/generator_grad_norm"} <= method(xs)[1].keys()


# --- OUCL layout and the regulariser against direct computations -----------------------------------------


def direct_oucl(sets, beta, gamma, weighted, margins, constant_weights=False):
    """The paper's formula row by row: positives = same image in the other sets, the anchor itself out;
    `constant_weights`: Γ held constant in derivatives (the circle-loss convention)."""
    count, rows = len(sets), sets[0].shape[0]
    feats = torch.cat(sets)
    image = torch.arange(rows).repeat(count)
    losses = []
    for a in range(count * rows):
        s = (feats @ feats[a] + 1) / 2
        pos = (image == image[a]) & (torch.arange(count * rows) != a)
        neg = image != image[a]
        g_pos = (1 + gamma - s[pos]).clamp_min(0) if weighted else torch.ones_like(s[pos])
        g_neg = (s[neg] + gamma).clamp_min(0) if weighted else torch.ones_like(s[neg])
        if constant_weights:
            g_pos, g_neg = g_pos.detach(), g_neg.detach()
        m_pos, m_neg = (1 - gamma, gamma) if margins else (0.0, 0.0)
        total = torch.exp(beta * g_neg * (s[neg] - m_neg)).sum() * torch.exp(-beta * g_pos * (s[pos] - m_pos)).sum()
        losses.append(torch.log1p(total))
    return torch.stack(losses).mean()


def unit_sets(count, rows=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1) for _ in range(count)]


@pytest.mark.parametrize("switches", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("count", [2, 4])
def test_oucl_over_feature_sets_equals_the_direct_formula(switches, count):
    weighted, margins = switches
    method = MetAug(metaug_config(f"method.oucl.weighted={str(weighted).lower()}",
                                  f"method.oucl.margins={str(margins).lower()}"))
    sets = unit_sets(count)
    for impl in ("reference", "chunked"):
        torch.testing.assert_close(method.contrast(sets, impl), direct_oucl(sets, 16.0, 0.25, weighted, margins))


def test_released_switches_reduce_to_multi_positive_infonce_at_temperature_2_over_beta():
    method = MetAug(metaug_config("method.oucl.weighted=false", "method.oucl.margins=false", "method.oucl.beta=8"))
    t = 2 / 8
    z1, z2 = unit_sets(2)
    # two sets: NT-Xent (SimCLR's loss) at T = 2/β
    feats = torch.cat([z1, z2])
    logits = (feats @ feats.T / t).fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(5) + 5, torch.arange(5)])
    torch.testing.assert_close(method.contrast([z1, z2]), F.cross_entropy(logits, targets))
    # originals and generated: log[1 + Σ_neg Σ_pos exp((cos⁻ − cos⁺)/T)] with three positives per anchor
    sets = unit_sets(4, seed=1)
    feats, image = torch.cat(sets), torch.arange(5).repeat(4)
    cos = feats @ feats.T
    rows = []
    for a in range(20):
        pos = (image == image[a]) & (torch.arange(20) != a)
        neg = image != image[a]
        rows.append(torch.log1p(torch.exp((cos[a, neg][:, None] - cos[a, pos][None, :]) / t).sum()))
    torch.testing.assert_close(method.contrast(sets), torch.stack(rows).mean())


def direct_regulariser(originals, generated, positive_weight=1.0):
    """R of METHODS.md anchor by anchor, its positive term scaled by `positive_weight`."""
    count, rows = len(originals), originals[0].shape[0]
    orig, gen = torch.cat(originals), torch.cat(generated)
    image = torch.arange(rows).repeat(count)
    easy_pos, easy_neg = [], []
    for a in range(count * rows):
        s = (orig @ orig[a] + 1) / 2
        s_gen = (gen @ orig[a] + 1) / 2
        same = image == image[a]
        hardest_pos = s[same & (torch.arange(count * rows) != a)].min()
        hardest_neg = s[~same].max()
        m_pos, m_neg = torch.minimum(hardest_pos, hardest_neg), torch.maximum(hardest_pos, hardest_neg)
        easy_pos += list((s_gen[same] - m_pos).clamp_min(0))
        easy_neg += list((m_neg - s_gen[~same]).clamp_min(0))
    return positive_weight * torch.stack(easy_pos).mean() + torch.stack(easy_neg).mean()


@pytest.mark.parametrize("config, positive_weight", [(metaug_config, 1.0), (released_config, 1e-4)])
def test_margin_regulariser_matches_its_definition(config, positive_weight):
    method = MetAug(config())
    originals, generated = unit_sets(2, seed=2), unit_sets(2, seed=3)
    got = method.margin_regulariser(originals, generated)
    torch.testing.assert_close(got, direct_regulariser(originals, generated, positive_weight))
    assert got > 0


def test_generators_are_the_released_mlp():
    gen = FeatureGenerator(128, 2048)
    linears = [m for m in gen.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 2048), (2048, 2048), (2048, 128)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in gen.modules()) == 2
    assert len(feature_generators(2, 16, 8)) == 2
    method = MetAug(metaug_config())
    own = {id(p) for p in method.generators.parameters()}
    assert len(method.generators) == 2 and not any(id(p) in own for g in method.param_groups(0.1) for p in g["params"])


# --- world size 2 against one process ---------------------------------------------------------------------


# released across ranks adds its terms' gathers and `after_step`; the encoder scope's are meta_first's
WORLD_FORMS = {"meta_first-projector": (metaug_config, "projector"), "meta_first-encoder": (metaug_config, "encoder"),
               "released": (released_config, "projector")}


def _world_run(rank: int, world: int, form: str) -> dict:
    """On this rank's rows: the returned loss's (rank-averaged) encoder gradients and the meta gradients,
    for released as the generators' update by `after_step`; fp64, generators without BatchNorm so nothing
    depends on how the batch is split."""
    torch.manual_seed(0)
    config, scope = WORLD_FORMS[form]
    cfg = config(f"method.metaug.scope={scope}", "method.metaug.delta=0.5", "method.metaug.reg_weight=0.5",
                 "method.metaug.inner_lr=0.5")
    method = MetAug(cfg, generators=feature_generators(2, 16, 8, batch_norm=False)).double()
    rows = 8 // world
    xs = [v[rank * rows : (rank + 1) * rows] for v in views(rows=8, seed=5, dtype=torch.float64)]
    out = {}
    if not method.released:
        x, h, z = method.encode(xs)
        grads, _ = method.meta_gradients(x, h, z, method.contrast(z, method.impl_twice))
        out = {f"meta.{i}": g for i, g in enumerate(grads)}
    loss, _ = method(xs)
    loss.backward()
    for n, p in encoder_params(method).items():
        if p.grad is not None:
            g = p.grad.clone()
            if world > 1:
                dist.all_reduce(g)
                g /= world
            out[f"encoder.{n}"] = g
    if method.released:
        before = [p.detach().clone() for p in method.generators.parameters()]
        method.after_step(0.0)
        out.update({f"update.{i}": p.detach() - b for i, (p, b) in enumerate(zip(method.generators.parameters(), before))})
    return out


def _world_worker(rank, world, out):
    for form in WORLD_FORMS:
        result = _world_run(rank, world, form)
        if rank == 0:
            save_file(result, f"{out}-{form}.safetensors")


def test_world_size_2_equals_one_process_on_the_whole_batch(tmp_path):
    spawn(_world_worker, 2, str(tmp_path / "w"))
    for form in WORLD_FORMS:
        got, expected = load_file(tmp_path / f"w-{form}.safetensors"), _world_run(0, 1, form)
        assert got.keys() == expected.keys()
        for key in expected:
            error = (got[key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)
            assert error < 1e-9, f"{form} {key}: {error:.2e}"


# --- configurations ----------------------------------------------------------------------------------------


def test_forms_set_their_defaults_and_explicit_values_win():
    released, today = released_config().method.metaug, metaug_config().method.metaug
    assert (released.form, released.scope, released.inner_lr, released.generator_lr) == ("released", "encoder", 1e-3, 0.03)
    assert (today.form, today.scope, today.inner_lr, today.generator_lr) == ("meta_first", "projector", 0.01, 1e-3)
    assert metaug_config("method.metaug.inner_lr=0.2").method.metaug.inner_lr == 0.2
    assert isinstance(MetAug(released_config()).generator_optimizer, torch.optim.SGD)
    assert isinstance(MetAug(metaug_config()).generator_optimizer, torch.optim.Adam)
    with pytest.raises(Exception, match="form"):
        released_config("method.metaug.form=paper")


@pytest.mark.parametrize("override, words", [
    ("engine.zero_stage=3", "zero_stage=3"),
    ("model.compile=true", "model.compile"),
    ("method.batch_norm=sync", "batch_norm=sync"),
    ("engine.precision=fp16", "fp16"),
])
def test_check_config_refuses_what_the_meta_step_cannot_run(override, words):
    with pytest.raises(ValueError, match=words):
        MetAug.check(metaug_config(override), 1)


def test_encoder_scope_refuses_gradient_checkpointing():
    with pytest.raises(ValueError, match="grad_checkpointing"):
        MetAug.check(metaug_config("method.metaug.scope=encoder", "model.grad_checkpointing=true"), 1)
    MetAug.check(metaug_config("method.metaug.scope=projector", "model.grad_checkpointing=true"), 1)
    MetAug.check(metaug_config("method.metaug.scope=encoder", "engine.zero_stage=2"), 1)


def test_recipe_validates():
    cfg = load_config(RECIPE)
    MetAug.check(cfg, 1)
    assert cfg.method.name == "metaug" and cfg.model.cifar_stem and cfg.model.backbone == "resnet18"
    assert (cfg.method.oucl.beta, cfg.method.oucl.gamma) == (16.0, 0.25)
    assert (cfg.model.projector.hidden_dim, cfg.model.projector.out_dim) == (2048, 128)
    m = cfg.method.metaug
    assert (m.form, m.scope, m.inner_lr, m.generator_lr, m.delta) == ("released", "encoder", 1e-3, 0.03, 1e-5)
    assert all(v.size == 32 for v in cfg.data.view_recipes())


@pytest.mark.parametrize("config", [released_config, metaug_config], ids=["released", "meta_first"])
def test_generator_optimizer_state_survives_a_checkpoint_round_trip(config, tmp_path):
    """The generators' optimizer state (SGD momentum, Adam moments) is module state, the `_extra_state` that
    DeepSpeed's module file holds (and torch.load(weights_only=True) reads): after save and load it is the
    same, and the next step moves the generators as the uninterrupted run does."""
    torch.manual_seed(0)
    cfg = config("method.metaug.scope=projector")  # the cheap scope: the state is the same either way
    xs = [views(seed=seed) for seed in range(2)]

    def step(method, inputs):
        method(inputs)[0].backward()
        method.after_step(0.0)
        return [p.detach().clone() for p in method.generators.parameters()]

    method = MetAug(cfg)
    step(method, xs[0])
    assert method.generator_optimizer.state_dict()["state"]
    torch.save(method.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(1)
    restored = MetAug(cfg)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    saved, loaded = method.generator_optimizer.state_dict(), restored.generator_optimizer.state_dict()
    assert saved["state"].keys() == loaded["state"].keys() and saved["param_groups"] == loaded["param_groups"]
    assert all(torch.equal(v, loaded["state"][i][k]) for i, state in saved["state"].items() for k, v in state.items())
    uninterrupted, resumed = step(method, xs[1]), step(restored, xs[1])
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))
