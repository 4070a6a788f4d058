"""MetAug in its released CMC setting (method metaug_cmc): OUCL over per-row score sets against its float64
definition and against `oucl_loss`, the encoder loss (originals, generated terms and R over the memory
bank's cross-view scores) against a float64 computation from the definition, the bank updated by the
original features only (at each of the step's three passes) and never by generated ones, two ranks against
one process, the configurations refused, the recipe, and two steps through the loop whose export gives
the L, ab and ori encoders as timm folders with the concatenated features back."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import logged, tiny_config
from distributed_utils import average_over_ranks, spawn
from models.generators import feature_generators
from pipeline.config import load_config
from pipeline.losses import oucl_loss, oucl_score_sets
from pipeline.methods.cmc import lab_views
from pipeline.methods.metaug_cmc import MetAugCMC
from test_cmc_memory_bank import INDICES, RAW_VIEWS, images, recording_draws

N_DATA, K = 20, 6
# beta 8 so that 16/beta matters; delta, R's weight and epsilon large so that every term does
LARGE = ("method.oucl.beta=8", "method.metaug.delta=0.5", "method.metaug.reg_weight=0.5", "method.metaug.inner_lr=0.5")
RELEASED_SWITCHES = ("method.oucl.weighted=false", "method.oucl.margins=false")


def config(*extra):
    return tiny_config("metaug_cmc", RAW_VIEWS, f"method.memory_bank={{negatives: {K}, momentum: 0.5}}",
                       "method.metaug.generator_hidden=8", *extra)


def built(*extra, generators=None, dtype=torch.float64):
    torch.manual_seed(0)
    method = MetAugCMC(config(*extra), generators)
    method.set_data_size(N_DATA)
    return method.to(dtype)


# --- OUCL over score sets ---------------------------------------------------------------------------------

def direct_oucl(s_pos, s_neg, beta, gamma, weighted, margins):
    """The paper's formula row by row, Γ held constant in derivatives (the circle-loss convention)."""
    rows = []
    for sp, sn in zip(s_pos, s_neg):
        g_pos = (1 + gamma - sp).clamp_min(0).detach() if weighted else torch.ones_like(sp)
        g_neg = (sn + gamma).clamp_min(0).detach() if weighted else torch.ones_like(sn)
        m_pos, m_neg = (1 - gamma, gamma) if margins else (0.0, 0.0)
        total = torch.exp(beta * g_neg * (sn - m_neg)).sum() * torch.exp(-beta * g_pos * (sp - m_pos)).sum()
        rows.append(torch.log1p(total))
    return torch.stack(rows).mean()


@pytest.mark.parametrize("weighted, margins", [(True, True), (False, False), (True, False)])
def test_oucl_over_score_sets_is_its_definition_in_value_and_gradient(weighted, margins):
    g = torch.Generator().manual_seed(0)
    s_pos = torch.rand(5, 6, generator=g, dtype=torch.float64).requires_grad_()
    s_neg = torch.rand(5, 30, generator=g, dtype=torch.float64).requires_grad_()
    options = dict(beta=16.0, gamma=0.25, weighting=weighted, margins=margins)
    got = oucl_score_sets(s_pos, s_neg, **options)
    expected = direct_oucl(s_pos, s_neg, 16.0, 0.25, weighted, margins)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(got, [s_pos, s_neg]), torch.autograd.grad(expected, [s_pos, s_neg])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_oucl_over_score_sets_equals_oucl_loss_on_the_scores_of_keys():
    g = torch.Generator().manual_seed(1)
    anchors = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    keys = F.normalize(torch.randn(15, 8, generator=g, dtype=torch.float64), dim=1)
    positives = torch.stack([torch.arange(6), torch.arange(6) + 6], 1)
    s = (anchors @ keys.T + 1) / 2
    is_pos = torch.zeros_like(s, dtype=torch.bool).scatter_(1, positives, True)
    s_pos, s_neg = s[is_pos].view(6, 2), s[~is_pos].view(6, 13)
    torch.testing.assert_close(oucl_score_sets(s_pos, s_neg), oucl_loss(anchors, keys, positives, impl="reference"))


def test_score_sets_of_different_rows_are_refused():
    with pytest.raises(ValueError, match=r"s_pos and s_neg must be \[B, P\] and \[B, Q\]"):
        oucl_score_sets(torch.rand(4, 2), torch.rand(3, 8))


# --- the encoder loss against its definition ------------------------------------------------------------

def features(method, x):
    """z and g of the method's modules, in float64, as the definition reads them."""
    views = lab_views(x, whole="ori" in method.view_names)
    z = [F.normalize(getattr(method, f"{n}_projector")(getattr(method, f"{n}_backbone")(v)), dim=1)
         for n, v in zip(method.view_names, views)]
    return z, [F.normalize(gen(zv), dim=1) for gen, zv in zip(method.generators, z)]


def bank_scores(queries, rows, indices, negatives):
    """Image i, every ordered pair of views v != w: x⁺ = rows[w][y_i]·q_v[i], x⁻_k = rows[w][n_ik]·q_v[i], then
    s = (x + 1)/2; ([B, V(V-1)], [B, V(V-1)K])."""
    pos, neg = [], []
    for i in range(queries[0].shape[0]):
        pairs = [(v, w) for v in range(len(queries)) for w in range(len(queries)) if v != w]
        pos.append(torch.stack([rows[w][indices[i]] @ queries[v][i] for v, w in pairs]))
        neg.append(torch.stack([rows[w][n] @ queries[v][i] for v, w in pairs for n in negatives[i]]))
    return (torch.stack(pos) + 1) / 2, (torch.stack(neg) + 1) / 2


def direct_regulariser(s_pos, s_neg, g_pos, g_neg, positive_weight):
    """R per image: m⁺ = min(min s⁺, max s⁻), m⁻ = max(min s⁺, max s⁻) of its original scores, then
    positive_weight·mean([ŝ⁺ − m⁺]₊) + mean([m⁻ − ŝ⁻]₊) over every generated score."""
    easy_pos, easy_neg = [], []
    for sp, sn, gp, gn in zip(s_pos, s_neg, g_pos, g_neg):
        m_pos, m_neg = torch.minimum(sp.min(), sn.max()), torch.maximum(sp.min(), sn.max())
        easy_pos.append((gp - m_pos).clamp_min(0))
        easy_neg.append((m_neg - gn).clamp_min(0))
    return positive_weight * torch.cat(easy_pos).mean() + torch.cat(easy_neg).mean()


def moved(rows, indices, z):
    """The bank after the originals' update: row y of view v <- normalize(0.5 row + 0.5 z_v)."""
    out = rows.clone()
    for v, zv in enumerate(z):
        out[v, indices] = F.normalize(0.5 * rows[v, indices] + 0.5 * zv, dim=1)
    return out


def reference_loss(z, g, rows, indices, draws, beta, weighted, margins, delta, reg_weight):
    """train_MetAug.py's encoder loss over the bank: (16/β)·[O(z) + δ·Σ O(each view replaced by its generated
    features, then all)] + w·R, R's positive term ×1e-4; O(z) on draw 0 against the rows as they were, then
    the rows moved to the originals, each generated term on a draw of its own, R on the last."""
    def oucl(sets, draw, bank):
        return direct_oucl(*bank_scores(sets, bank, indices, draw), beta, 0.25, weighted, margins)

    after = moved(rows, indices, [zv.detach() for zv in z])
    terms = [z[:v] + [g[v]] + z[v + 1:] for v in range(len(z))] + [g]
    generated = sum(oucl(sets, draw, after) for sets, draw in zip(terms, draws[1:]))
    reg = direct_regulariser(*bank_scores(z, after, indices, draws[-1]), *bank_scores(g, after, indices, draws[-1]), 1e-4)
    return 16 / beta * (oucl(z, draws[0], rows) + delta * generated) + reg_weight * reg, after


@pytest.mark.parametrize("ori, switches", [(True, RELEASED_SWITCHES), (False, ())], ids=["released-3-views", "paper-2-views"])
def test_the_encoder_loss_and_its_gradient_are_the_definition_and_the_bank_moves_once(ori, switches):
    method = built(*LARGE, *switches, f"method.ori={str(ori).lower()}")
    assert method.view_names == (("l", "ab", "ori") if ori else ("l", "ab"))
    x = images().double()
    rows = method.bank.rows.clone()
    draws = recording_draws(method.bank)
    loss, parts = method([x], indices=INDICES)
    views = len(method.view_names)
    assert len(draws) == 1 + (views + 1) + 1 and all(d.shape == (8, K) for d in draws)  # originals, terms, R
    encoder = [p for n, p in method.named_parameters() if not n.startswith("generators.")]
    grads = torch.autograd.grad(loss, encoder)
    z, g = features(method, x)
    weighted = not switches
    expected, after = reference_loss(z, g, rows, INDICES, draws, 8.0, weighted, weighted, 0.5, 0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    for p, got, want in zip(encoder, grads, torch.autograd.grad(expected, encoder, allow_unused=True)):
        want = torch.zeros_like(p) if want is None else want
        assert (got - want).norm() <= 1e-10 * want.norm().clamp_min(1e-12)
    assert {"loss/oucl", "loss/oucl_generated", "loss/reg"} <= parts.keys() and parts["loss/reg"] > 0
    # the originals' update only: each view's rows of the batch, nothing from the generated features
    torch.testing.assert_close(method.bank.rows, after, rtol=1e-12, atol=1e-14)


def test_generated_terms_do_not_touch_the_bank_and_the_meta_step_moves_it_by_originals_only():
    method = built(dtype=torch.float32)  # ε = 1e-3: the fast weights' features stay close to θ₁'s
    x = images()
    optimizer = torch.optim.SGD([p for group in method.param_groups(0.0) for p in group["params"]], lr=0.1)
    updates, update = [], method.bank.update
    method.bank.update = lambda indices, f: updates.append([t.detach().clone() for t in f]) or update(indices, f)
    method.before_step(0)
    loss, _ = method([x], indices=INDICES)
    x_batch, _, z = method.encode(([x], INDICES))
    rows = method.bank.rows.clone()
    generated = method.generate(z)
    for sets in method.generated_sets(z, generated):
        method.contrast(sets)
    assert torch.equal(method.bank.rows, rows) and len(updates) == 1  # the forward's originals only
    torch.testing.assert_close(updates.pop(), z)
    loss.backward()
    optimizer.step()
    _, z_1 = method.features_of(x_batch, update_buffers=False)
    method.after_step(0.0)
    assert len(updates) == 2  # the meta step's passes: at θ₁, then at the fast weights θ'
    for got, want in zip(updates[0], z_1):
        torch.testing.assert_close(got, want.detach())
    for fast, at_1, gen in zip(updates[1], z_1, generated):  # ε-close to the originals, far from the generated
        assert (fast * at_1).sum(1).min() > 0.99 > (fast * gen).sum(1).abs().max()


# --- two ranks against one process ----------------------------------------------------------------------------

def one_step(rank=0, world=1):
    """fp64, generators without BatchNorm (nothing depends on how the batch is split): the loss, the
    rank-averaged encoder gradients, the generators' update by `after_step` and the bank after it."""
    torch.manual_seed(1)  # the same generators on every rank
    method = built(*LARGE, generators=feature_generators(3, 16, 8, batch_norm=False))
    method.before_step(3)
    rows = 8 // world
    mine = slice(rank * rows, (rank + 1) * rows)
    loss, _ = method([images().double()[mine]], indices=INDICES[mine])
    loss.backward()
    out = {f"encoder.{n}": p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    average_over_ranks(out.values())
    out["loss"] = loss.detach().reshape(1)
    average_over_ranks([out["loss"]])
    before = [p.detach().clone() for p in method.generators.parameters()]
    method.after_step(0.0)
    out.update({f"update.{i}": p.detach() - b for i, (p, b) in enumerate(zip(method.generators.parameters(), before))})
    out["rows"] = method.bank.rows.clone()
    return out


def _ranks_worker(rank, world, folder):
    save_file(one_step(rank, world), f"{folder}/rank{rank}.safetensors")


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    spawn(_ranks_worker, 2, str(tmp_path), timeout=120)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    expected = one_step()
    assert ranks[0].keys() == expected.keys() and torch.equal(ranks[0]["rows"], ranks[1]["rows"])
    assert {k.split(".")[1] for k in expected if k.startswith("encoder.")} == {
        f"{n}_{kind}" for n in ("l", "ab", "ori") for kind in ("backbone", "projector")}
    for key in expected:
        error = (ranks[0][key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)
        assert error <= 1e-9, f"{key}: relative error {error:.2e}"


# --- configurations ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ("method.metaug.form=meta_first", "method.metaug.form=meta_first: method.name=metaug_cmc runs the released form"),
    ("method.loss_impl=chunked", "method.loss_impl=chunked: method.name=metaug_cmc scores"),
    ("engine.zero_stage=3", "zero_stage=3"),
])
def test_what_it_cannot_run_is_refused(override, words):
    with pytest.raises(ValueError, match=words):
        MetAugCMC.check(config(override), 1)


def test_views_must_be_raw_srgb_and_the_forward_needs_indices():
    with pytest.raises(ValueError, match="method.name=metaug_cmc takes unnormalised sRGB views"):
        MetAugCMC.check(tiny_config("metaug_cmc", "data.views=[{size: 16}]"), 1)
    with pytest.raises(ValueError, match="needs each sample's dataset index"):
        built(dtype=torch.float32)([images()])


def test_the_engine_trains_the_encoders_and_the_generators_are_the_methods_own():
    method = built(dtype=torch.float32)
    trained = {id(p) for group in method.param_groups(1e-4) for p in group["params"]}
    names = {n.split(".")[0] for n, p in method.named_parameters() if id(p) in trained}
    assert names == {f"{v}_{kind}" for v in ("l", "ab", "ori") for kind in ("backbone", "projector")}
    assert len(method.generators) == 3 and not any(id(p) in trained for p in method.generators.parameters())
    assert list(method.encoders()) == ["l", "ab", "ori"] and method.bank.rows.shape == (3, N_DATA, 16)


# --- through the loop -------------------------------------------------------------------------------------------

def _train(rank, world, shards, out):
    from pipeline.train import train

    train(load_config(None, [
        "method.name=metaug_cmc", f"method.memory_bank={{negatives: {K}, momentum: 0.5}}", "method.metaug.generator_hidden=8",
        f"train.data={shards}", f"train.output={out}", RAW_VIEWS, "data.eval_size=16", "data.eval_resize=16",
        "data.batch_size=8", "data.num_threads=1", "model.backbone=test_vit",
        "model.projector={hidden_dim: 32, out_dim: 16, layers: 1}", "engine.precision=fp32", "train.max_steps=2",
        "train.log_every=1", "train.knn_every=0", "optim.name=sgd", "optim.lr=0.03",
    ]))


@pytest.mark.slow
def test_two_steps_through_the_loop_and_the_export_of_the_three_encoders(digits, tmp_path):
    import timm
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.frozen import load_backbone

    spawn(_train, 1, str(digits / "train"), str(tmp_path / "run"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"loss/oucl", "loss/oucl_generated", "loss/reg", "meta/objective"} <= set(events.Tags()["scalars"])
    losses = [e.value for e in events.Scalars("loss/total")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    out = tmp_path / "run" / "backbone"
    encoders = [timm.create_model(f"local-dir:{out / n}", pretrained=True).eval() for n in ("l", "ab", "ori")]
    assert [e.patch_embed.proj.in_channels for e in encoders] == [1, 2, 3]
    x = images(3)
    expected = torch.cat([e(v) for e, v in zip(encoders, lab_views(x, whole=True))], dim=1)
    features = load_backbone(f"local-dir:{out}").eval()
    torch.testing.assert_close(features(x), expected)


def _train_on_digits(rank, world, digits, out):
    from pipeline.train import train

    view = "{size: 16, scale: [0.3, 1.0], color_jitter: null, grayscale: 0.0, mean: [0, 0, 0], std: [1, 1, 1]}"
    train(load_config(None, [
        "method.name=metaug_cmc", "method.memory_bank={negatives: 256, momentum: 0.5}", "method.metaug.generator_hidden=64",
        f"data.views=[{view}]", f"train.data={digits}/train", f"train.val_data={digits}/val", f"train.output={out}",
        "data.eval_size=16", "data.eval_resize=16", "data.batch_size=16", "data.num_threads=1", "model.backbone=test_resnet",
        "model.projector={out_dim: 32, layers: 1, bias: true}", "engine.precision=fp32", "train.max_steps=100",
        "train.log_every=50", "train.knn_every=0", "train.knn_k=20", "optim.name=adamw", "optim.lr=1e-3",
        "optim.scale_lr=false", "optim.weight_decay=0.0", "optim.warmup_epochs=0",
    ]))


@pytest.mark.slow
def test_training_on_the_digits_lifts_knn_of_the_concatenated_features(digits, tmp_path):
    """100 steps of the embedded digits through the DeepSpeed loop, the released step with its meta step:
    the kNN monitor on the concatenated L, ab and ori features ends clearly above the untrained encoders'."""
    spawn(_train_on_digits, 1, str(digits), str(tmp_path / "run"))
    before, after = logged(tmp_path / "run", "eval/knn_top1")
    assert after > before + 0.025, (before, after)  # measured: 0.864 -> 0.908 (0.919 after 200 steps)
