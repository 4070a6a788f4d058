"""FeatMatch's released form (GT-RIPL/FeatMatch): the loss against a float64 reference written from
train/featmatch.py and loss/common.py, the prototype extraction (`extract_fp`), the labeled sampler
(dataloader/base_loader.py), attention dropout (model/model.py) and the form's defaults."""

import importlib.util
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.feature_memory import FeatureMemory, mean_and_centres
from models.prototype_attention import PrototypeAttention
from pipeline.losses.featmatch import draw_mixup, featmatch_released_loss, mixup, rampup, soft_targets
import test_featmatch

ROOT = Path(__file__).resolve().parents[1]
colour_shards, tiny_backbone = test_featmatch.colour_shards, test_featmatch.tiny_backbone  # its fixtures, shared


def launch_module():
    spec = importlib.util.spec_from_file_location("launch_finetune", ROOT / "launch" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ the reference


def sharpen64(p, t):  # loss/common.py temerature_sharpening
    p = p ** (1.0 / t)
    return p / p.sum(1, keepdim=True)


def log_loss64(prob, logits):  # loss/common.py log_loss(None, prob_p, logits_q, None)
    return -torch.mean(torch.sum(prob * torch.log_softmax(logits, 1), 1))


def released_reference(weak_u, yl, x_l, x_u, lam, idx, model, c, t, coeff, mix, graph):
    """train2 in float64: xl [bsl, k, D], xu [bsu, k, D]; `model(x) -> (logits_g, logits_f)`."""
    k = x_l.shape[1]
    prob_u = sharpen64(torch.softmax(weak_u, 1), t).unsqueeze(1).repeat(1, k, 1).reshape(-1, c)
    xl, xu = x_l.reshape(-1, x_l.shape[-1]), x_u.reshape(-1, x_u.shape[-1])
    prob_l = torch.zeros(len(xl), c, dtype=torch.float64)
    prob_l.scatter_(1, yl.unsqueeze(1).repeat(1, k).reshape(-1, 1), 1.0)
    # data_mixup
    x, prob = torch.cat([xl, xu]), torch.cat([prob_l, prob_u])
    x = lam * x + (1 - lam) * x[idx]
    prob = lam * prob + (1 - lam) * prob[idx]
    prob = prob / prob.sum(1, keepdim=True)
    n = len(xl)
    logits_g, logits_f = model(x)
    pred = log_loss64(prob[:n], logits_g[:n])
    con = log_loss64(prob[n:], logits_g[n:])
    gr = log_loss64(prob[n:], logits_f[n:])
    return pred + coeff * (mix * con + graph * gr), pred, con, gr


def test_released_loss_equals_the_float64_reference():
    torch.manual_seed(0)
    bsl, bsu, k, d, c, t = 3, 5, 2, 6, 4, 0.75
    weak_logits = torch.randn(bsl + bsu, c, dtype=torch.float64) * 2
    yl = torch.tensor([2, 0, 3])
    labels = torch.cat([yl, torch.full((bsu,), -1)])
    xl, xu = torch.randn(bsl, k, d, dtype=torch.float64), torch.randn(bsu, k, d, dtype=torch.float64)
    w_g, w_f = torch.randn(d, c, dtype=torch.float64, requires_grad=True), torch.randn(d, c, dtype=torch.float64, requires_grad=True)
    lam, perm = draw_mixup((bsl + bsu) * k, np.random.default_rng(3))
    assert 0.5 <= lam <= 1 and sorted(perm.tolist()) == list(range((bsl + bsu) * k))

    # Ours: rows view-major (all images' view 0, then view 1), labeled rows wherever the labels say.
    x = torch.cat([torch.cat([xl[:, v], xu[:, v]]) for v in range(k)])
    targets = soft_targets(weak_logits, labels, t).double().repeat(k, 1)
    x_mix, t_mix = mixup(x, targets, lam, perm)
    ours = featmatch_released_loss(x_mix @ w_g, x_mix @ w_f, t_mix, (labels >= 0).repeat(k), coeff=0.3,
                                   lambda_g=0.5, lambda_f=2.0)
    grads = torch.autograd.grad(ours.total, [w_g, w_f])

    # The reference's rows are image-major, labeled first: the same permutation, re-indexed.
    ours_row = lambda i: (i % k) * (bsl + bsu) + i // k if i < bsl * k else (i % k) * (bsl + bsu) + bsl + (i - bsl * k) // k  # noqa: E731
    to_ours = torch.tensor([ours_row(i) for i in range((bsl + bsu) * k)])
    to_ref = torch.empty_like(to_ours)
    to_ref[to_ours] = torch.arange(len(to_ours))
    idx = to_ref[perm[to_ours]]
    ref = released_reference(weak_logits[bsl:], yl, xl, xu, lam, idx, lambda z: (z @ w_g, z @ w_f), c, t, 0.3, 0.5, 2.0)
    ref_grads = torch.autograd.grad(ref[0], [w_g, w_f])
    for a, b in zip((ours.total, ours.clf, ours.con_g, ours.con_f), ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sharpening_rampup_and_shape_errors():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    q = soft_targets(logits, torch.tensor([-1, 1]), 0.75)
    p = torch.softmax(logits[0].double(), 0) ** (1 / 0.75)
    torch.testing.assert_close(q[0].double(), p / p.sum())
    assert q[1].tolist() == [0.0, 1.0, 0.0]  # labeled rows: one-hot, whatever the logits
    # ssltrainer.get_consistency_coeff: curr_iter / coeff_rampup, then 1
    assert [rampup(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0] and rampup(0, 0) == 1.0
    with pytest.raises(ValueError, match="labeled"):
        featmatch_released_loss(logits, logits, q, torch.ones(3, dtype=torch.bool), coeff=1.0)


def test_released_step_in_the_loop_equals_the_reference():
    """pipeline.finetune.released_step: one forward without gradient for the targets, mixup, the loss."""
    from pipeline import finetune

    torch.manual_seed(1)
    d, c, b = 6, 3, 4
    backbone = torch.nn.Linear(d, d)
    backbone.num_features = d
    net = finetune.FeatMatchNet(backbone, c, heads=2).double()
    net.prototypes = torch.randn(5, d, dtype=torch.float64)
    views = [torch.randn(b, d, dtype=torch.float64) for _ in range(3)]
    labels = torch.tensor([1, -1, -1, 0])
    args = Namespace(temperature=0.75, lambda_g=0.5, lambda_f=2.0)
    autocast = {"device_type": "cpu", "enabled": False}
    loss, f_weak, weak_g = finetune.released_step(net, views, labels, 0.4, args, np.random.default_rng(5), autocast)
    lam, perm = draw_mixup(3 * b, np.random.default_rng(5))
    x = torch.cat(views)
    with torch.no_grad():
        _, _, logits_g = net(x)
        f = backbone(views[0])
    targets = soft_targets(logits_g[:b], labels).double().repeat(3, 1)
    x_mix, t_mix = lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]
    _, mixed_f, mixed_g = net(x_mix)
    rows = (labels >= 0).repeat(3)

    def ce(logits, sel):
        return -(t_mix[sel] * torch.log_softmax(logits[sel], 1)).sum(1).mean()

    expected = ce(mixed_g, rows) + 0.4 * (0.5 * ce(mixed_g, ~rows) + 2.0 * ce(mixed_f, ~rows))
    torch.testing.assert_close(loss.total.double(), expected)
    torch.testing.assert_close(f_weak, f)
    torch.testing.assert_close(weak_g, logits_g[:b])

    # train1, the AugF-free start: no prototypes, so plain logits everywhere, and no graph term
    net.prototypes = torch.zeros(0, d, dtype=torch.float64)
    loss, _, weak_g = finetune.released_step(net, views, labels, 0.4, args, np.random.default_rng(5), autocast, graph=False)
    with torch.no_grad():
        plain = net.classifier(backbone(x))
    targets = soft_targets(plain[:b], labels).double().repeat(3, 1)
    t_mix = lam * targets + (1 - lam) * targets[perm]
    mixed = net.classifier(backbone(x_mix))
    torch.testing.assert_close(loss.total.double(), ce(mixed, rows) + 0.4 * 0.5 * ce(mixed, ~rows))
    torch.testing.assert_close(weak_g, plain[:b])


# ------------------------------------------------------------------------------------ the schedule


def supconv_lr(it, pretrain, cycle, end, max_lr):
    """util/scheduler.py SupConvScheduler.compute_params' lr, from its milestones and slopes."""
    start, base, last = max_lr / 100, max_lr / 10, max_lr / 1e4
    if it < pretrain:
        return start + it * (base - start) / pretrain
    if it < pretrain + cycle:
        return base + (it - pretrain) * (max_lr - base) / cycle
    if it < pretrain + 2 * cycle:
        return max_lr - (it - pretrain - cycle) * (max_lr - base) / cycle
    return base - (it - pretrain - 2 * cycle) * (base - last) / end


def test_released_schedule_is_supconvscheduler_at_the_configs_shares():
    from pipeline import finetune

    assert finetune.released_phases(183000) == (3000, 75000, 75000, 30000)  # config/cifar10/*.json
    assert finetune.released_phases(183) == (3, 75, 75, 30)
    for total, (p, c, _, e) in ((183, (3, 75, 75, 30)), (183000, (3000, 75000, 75000, 30000))):
        for it in sorted({0, 1, p - 1, p, p + c // 2, p + c, p + 2 * c - 1, p + 2 * c, total - 1}):
            assert finetune.released_lr(it, total, 0.04) == pytest.approx(supconv_lr(it, p, c, e, 0.04), rel=1e-12), it
    assert finetune.released_lr(3000, 183000, 0.04) == pytest.approx(0.004)  # max / 10 when AugF comes in
    assert finetune.released_lr(78000, 183000, 0.04) == pytest.approx(0.04)  # the peak
    # a short run: phases still sum to the run, the AugF-free start may be empty
    assert finetune.released_phases(24) == (0, 10, 10, 4) and sum(finetune.released_phases(7)) == 7


def test_released_optimizer_is_the_official_sgd():
    """train/trainer.py: SGD(nesterov, momentum 0.95, weight decay 2e-4) over every parameter, norms and biases
    included; SupConvScheduler's lr set before the first step."""
    from pipeline import finetune

    backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    backbone.num_features = 8
    net = finetune.FeatMatchNet(backbone, 3, heads=2)
    args = launch_module().parse_args(["--backbone", "x", "--train", "t", "--val", "v", "--labels-per-class", "1",
                                       "--backbone-lr-scale", "0.5"])
    opt, schedule = finetune.build_optimizer(net, args, total_steps=183, steps_per_epoch=61)
    assert type(opt) is torch.optim.SGD
    assert all(g["nesterov"] and g["momentum"] == 0.95 and g["weight_decay"] == 2e-4 for g in opt.param_groups)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in net.parameters())
    assert lr_of[id(backbone[1].weight)] == pytest.approx(0.04 / 100 * 0.5)  # step 0: max/100, at the backbone's scale
    assert lr_of[id(net.classifier.bias)] == pytest.approx(0.04 / 100)
    schedule.step_update(78)
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.04) and opt.param_groups[0]["lr"] == pytest.approx(0.02)
    with pytest.raises(SystemExit):  # a warm-up belongs to the cosine schedule
        launch_module().parse_args(["--backbone", "x", "--train", "t", "--val", "v", "--labels-per-class", "1",
                                    "--warmup-epochs", "1"])


def test_released_run_starts_without_augf_and_extracts_prototypes_on_its_steps(colour_shards, tiny_backbone, capsys,
                                                                                 monkeypatch):
    """Phases at a quarter of the run each (24 steps: 6 without AugF) and --prototype-every 5: no prototypes
    through the first epoch's 6 steps, the first extraction at step 6, then at 10, 15 and 20 (train/featmatch.py
    forward_train: at pretrain_iters, then where the iteration is a multiple of sample_interval)."""
    import json

    from pipeline import finetune

    monkeypatch.setattr(finetune, "RELEASED_PHASES", (1, 1, 1, 1))
    argv = ["--backbone", f"local-dir:{tiny_backbone}", "--train", str(colour_shards / "train"),
            "--val", str(colour_shards / "val"), "--labels-per-class", "2", "--epochs", "4", "--batch-size", "12",
            "--prototypes-per-class", "3", "--heads", "2", "--strong-views", "1", "--prototype-every", "5"]
    assert launch_module().main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [e["prototypes"] for e in result["epochs"]][0] == 0 and result["epochs"][1]["prototypes"] > 0
    assert result["prototype_steps"] == [6, 10, 15, 20]


# --------------------------------------------------------------------------------------- prototypes


def memory_with(labeled_per_class, unlabeled_per_class, confidence, classes=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    n_l, n_u = labeled_per_class * classes, unlabeled_per_class * classes
    y = torch.cat([torch.arange(classes).repeat_interleave(labeled_per_class), torch.arange(classes).repeat_interleave(unlabeled_per_class)])
    x = centres[y] + torch.randn(n_l + n_u, dim, generator=g)
    memory = FeatureMemory(n_l + n_u + 4, dim)  # unwritten rows never count
    is_labeled = torch.zeros(n_l + n_u + 4, dtype=torch.bool)
    is_labeled[:n_l] = True
    memory.update(torch.arange(n_l + n_u), x, y, torch.cat([torch.ones(n_l), torch.full((n_u,), confidence)]))
    return memory, is_labeled, x, y, n_l


def test_released_prototypes_from_labeled_rows_are_the_class_mean_and_centres():
    pk = 4
    memory, is_labeled, x, y, n_l = memory_with(labeled_per_class=10, unlabeled_per_class=30, confidence=0.01)
    protos, owners = memory.released_class_prototypes(3, pk, is_labeled, iters=5)
    assert owners.tolist() == [0] * pk + [1] * pk + [2] * pk  # pk per class, all from labeled rows
    for c in range(3):
        mine = protos[owners == c]
        torch.testing.assert_close(mine[0], x[:n_l][y[:n_l] == c].mean(0))  # the class mean is one of them
        assert not any(torch.allclose(p, mine[0]) for p in mine[1:])
    # Fewer rows than pk - 1: the mean and the rows themselves (extract_fp_per_class's n >= len(fx)).
    rows = torch.randn(2, 8)
    torch.testing.assert_close(mean_and_centres(rows, 5), torch.cat([rows.mean(0, keepdim=True), rows]))
    torch.testing.assert_close(mean_and_centres(rows, 1), rows.mean(0, keepdim=True))


@pytest.mark.parametrize("confidence", [0.9, 0.2])  # 0.2: passes once 0.5 is halved twice
def test_released_prototypes_split_labeled_and_unlabeled(confidence):
    pk = 6
    memory, is_labeled, x, y, n_l = memory_with(labeled_per_class=10, unlabeled_per_class=30, confidence=confidence)
    protos, owners = memory.released_class_prototypes(3, pk, is_labeled, iters=5)
    assert torch.bincount(owners).tolist() == [pk] * 3
    for c in range(3):
        mine = protos[owners == c]  # round(6 · 0.5) = 3 from labeled rows (mean first), then 3 from unlabeled
        torch.testing.assert_close(mine[0], x[:n_l][y[:n_l] == c].mean(0))
        torch.testing.assert_close(mine[3], x[n_l:][y[n_l:] == c].mean(0))
    # A class short of confident unlabeled rows: every class back to labeled rows only.
    memory.confidence[n_l:n_l + 28] = 0.0  # class 0 keeps 2 of 30
    protos, owners = memory.released_class_prototypes(3, pk, is_labeled, iters=5)
    torch.testing.assert_close(protos[owners == 0][0], x[:n_l][y[:n_l] == 0].mean(0))
    assert torch.bincount(owners).tolist() == [pk] * 3
    assert not any(torch.allclose(p, x[n_l:][y[n_l:] == 1].mean(0)) for p in protos)


# ---------------------------------------------------------------------------------- labeled sampler


def test_batch_orders_as_the_released_infinite_sampler():
    from pipeline.data.labeled import batch_orders

    orders = batch_orders(10, 3, np.random.default_rng(0))
    for _ in range(4):  # each pass: 3 full batches of distinct positions, a fresh permutation
        batches = [next(orders) for _ in range(3)]
        flat = np.concatenate(batches)
        assert all(len(b) == 3 for b in batches) and len(set(flat.tolist())) == 9
    again = batch_orders(10, 3, np.random.default_rng(0))
    assert np.array_equal(next(again), next(batch_orders(10, 3, np.random.default_rng(0))))
    with pytest.raises(ValueError, match="batch_size"):
        next(batch_orders(3, 4, np.random.default_rng(0)))


def test_every_batch_holds_the_labeled_share(colour_shards):
    """LabeledLoader (RandAugment views on the CPU pipeline) joined with a ShardLoader, as the loop does."""
    from pipeline import finetune
    from pipeline.config import DataConfig
    from pipeline.data.labeled import LabeledLoader
    from pipeline.data.loader import ShardLoader

    train = colour_shards / "train"
    views = finetune.view_recipes(24, (0.5,) * 3, (0.25,) * 3, strong_views=2, strong="randaugment")
    assert [v.rand_augment is not None for v in views] == [False, True, True]
    cfg = DataConfig(views=views, batch_size=8, eval_size=24, eval_resize=24, seed=0)
    everything = ShardLoader(train, cfg, train=False, batch_size=16)
    true_label, eval_view = {}, {}
    for batch in everything:
        true_label.update({int(i): int(y) for i, y, ok in zip(batch.indices, batch.labels, batch.valid) if ok})
        eval_view.update({int(i): v for i, v, ok in zip(batch.indices, batch.views[0], batch.valid) if ok})
    chosen = [3, 7, 11, 20, 31, 40]
    labeled = LabeledLoader(train, chosen, cfg, 4, seed=0)
    rest = ShardLoader(train, cfg, train=True, batch_size=8)
    seen = []
    for step, batch in enumerate(rest):
        joined = finetune.join(next(labeled), batch)
        assert [v.shape for v in joined.views] == [(12, 3, 24, 24)] * 3 and all(torch.isfinite(v).all() for v in joined.views)
        head = joined.indices[:4].tolist()
        assert set(head) <= set(chosen) and len(set(head)) == 4  # 4 labeled rows, distinct, in every batch
        assert joined.labels[:4].tolist() == [true_label[i] for i in head]
        assert joined.indices[4:].tolist() == batch.indices.tolist()
        seen.append(head)
    assert step == 5 and len({i for h in seen for i in h}) == len(chosen)  # 6 batches; every labeled image drawn
    for _ in range(2):  # the unaugmented pass (prototypes' labeled features): each image once, as ShardLoader's
        batches = list(labeled.evaluation())
        assert [b.valid.tolist() for b in batches] == [[True] * 4, [True, True, False, False]]
        rows = [(int(i), v) for b in batches for i, v, ok in zip(b.indices, b.views[0], b.valid) if ok]
        assert [i for i, _ in rows] == chosen
        for i, v in rows:
            torch.testing.assert_close(v, eval_view[i])


# -------------------------------------------------------------------------------- attention dropout


def test_attention_dropout_is_on_in_training_and_off_in_evaluation():
    torch.manual_seed(0)
    attn = PrototypeAttention(16, heads=2, dropout=0.1)
    fx, fp = torch.randn(64, 16), torch.randn(10, 16)
    _, w = attn(fx, fp, return_weights=True)
    assert (w == 0).float().mean() > 0.03  # about 10% of the weights dropped, the rest scaled by 1/0.9
    assert not torch.allclose(w.sum(-1), torch.ones(64, 2))
    attn.eval()
    (out, w), again = attn(fx, fp, return_weights=True), attn(fx, fp)
    torch.testing.assert_close(w.sum(-1), torch.ones(64, 2))
    assert torch.equal(out, again)


def test_form_defaults():
    launch = launch_module()
    base = ["--backbone", "x", "--train", "t", "--val", "v", "--labels-per-class", "4", "--batch-size", "192"]
    released = launch.parse_args(base)
    # config/cifar10/*.json and model/model.py of GT-RIPL/FeatMatch
    expected = {"form": "released", "lambda_g": 0.5, "lambda_f": 2.0, "temperature": 0.75, "strong_views": 8,
                "strong_aug": "randaugment", "attention_dropout": 0.1, "prototypes_per_class": 20,
                "prototype_threshold": 0.5, "labeled_batch": 64, "rampup": 75000 / 183000, "schedule": "released",
                "lr": 0.04, "momentum": 0.95, "weight_decay": 2e-4, "prototype_every": 500}
    assert {k: getattr(released, k) for k in expected} == pytest.approx(expected)
    fixmatch = launch.parse_args(base + ["--form", "fixmatch", "--threshold", "0.9"])
    expected = {"lambda_g": 1.0, "lambda_f": 1.0, "strong_views": 1, "strong_aug": "jitter", "attention_dropout": 0.0,
                "rampup": 0.0, "prototype_threshold": 0.9, "labeled_batch": 0, "schedule": "cosine", "lr": 0.03,
                "momentum": 0.9, "weight_decay": 5e-4, "prototype_every": 0}
    assert {k: getattr(fixmatch, k) for k in expected} == expected
    from pipeline import finetune

    backbone = torch.nn.Identity()
    backbone.num_features = 8
    assert finetune.FeatMatchNet(backbone, 3, 2, released.attention_dropout).augf.dropout.p == 0.1
    with pytest.raises(SystemExit):
        launch.parse_args(base + ["--form", "fixmatch", "--strong-views", "2"])


def test_fixmatch_form_is_one_setting_away(colour_shards, tiny_backbone, capsys):
    """`--form fixmatch` is the form test_featmatch's few-label test ran before the released one: same bar."""
    import json

    argv = ["--backbone", f"local-dir:{tiny_backbone}", "--train", str(colour_shards / "train"),
            "--val", str(colour_shards / "val"), "--labels-per-class", "2", "--epochs", "6", "--batch-size", "12",
            "--lr", "0.05", "--threshold", "0.8", "--prototypes-per-class", "3", "--heads", "2", "--form", "fixmatch"]
    assert launch_module().main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["labeled_batch"] == 0 and result["settings"]["strong_aug"] == "jitter"
    assert result["val_top1"] >= 0.8 and result["val_top1_plain"] >= 0.8, result
