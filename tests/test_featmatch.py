"""FeatMatch: k-means prototypes, the prototype-attention module (AugF), the three losses, and
semi-supervised fine-tuning end to end on a tiny shard set (CPU)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import encode, image_folder, make_shards
from models.feature_memory import FeatureMemory
from models.kmeans import cluster_means, kmeans
from models.prototype_attention import PrototypeAttention
from pipeline.losses.featmatch import featmatch_loss


def blobs(classes=4, per_class=50, dim=8, spread=0.05, seed=0):
    """Well-separated Gaussian clusters, shuffled: (points [N, dim], true cluster [N])."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    order = torch.randperm(len(labels), generator=g)
    return points[order], labels[order]


def recovered(assignments, truth):
    """True when the clustering equals the truth up to a permutation of cluster ids."""
    pairs = set(zip(assignments.tolist(), truth.tolist()))
    return len(pairs) == len(set(truth.tolist())) == len(set(assignments.tolist()))


# ---------------------------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_recovers_separable_clusters(metric, init):
    x, truth = blobs()
    if metric == "cosine":  # clusters by direction: scale each point differently, which must not matter
        x = x * torch.linspace(0.5, 3.0, len(x)).unsqueeze(1)
    seeds_ok = [recovered(kmeans(x, 4, iters=20, seed=s, init=init, metric=metric)[1], truth) for s in range(5)]
    if init == "k-means++":
        assert all(seeds_ok)  # k-means++ on well-separated blobs: every seed recovers them
    else:
        assert any(seeds_ok)
    centres, assign = kmeans(x, 4, iters=20, seed=0, metric=metric)
    assert centres.shape == (4, 8) and centres.dtype == torch.float32 and assign.shape == (len(x),)
    if metric == "cosine":
        torch.testing.assert_close(centres.norm(dim=1), torch.ones(4))
    else:  # the centres are the cluster means
        torch.testing.assert_close(centres, cluster_means(x, assign, 4), atol=1e-5, rtol=1e-5)


def test_kmeans_is_deterministic_and_checks_arguments():
    x, _ = blobs(classes=6, per_class=20, spread=1.0)  # overlapping: the seed matters
    a = kmeans(x, 6, iters=5, seed=3)
    b = kmeans(x, 6, iters=5, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert kmeans(x, len(x), iters=2)[1].unique().numel() == len(x)  # k = N: every point its own cluster
    for bad in (0, len(x) + 1):
        with pytest.raises(ValueError, match="k must be"):
            kmeans(x, bad)
    with pytest.raises(ValueError, match="metric"):
        kmeans(x, 2, metric="manhattan")
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 2, init="forgy")


def test_class_prototypes_per_class_from_labeled_and_pseudo_labeled_rows():
    x, truth = blobs(classes=3, per_class=30, dim=8)
    # Sub-clusters inside each class: class c's points split in two tight groups.
    offset = torch.zeros(len(x), 8)
    offset[torch.arange(len(x)) % 2 == 0, 0] = 1.0
    x = x + offset
    memory = FeatureMemory(200, 8)  # larger than the data: unwritten rows never count
    labels = truth.clone()
    labels[::7] = -1  # rows without a (pseudo-)label are left out
    memory.update(torch.arange(len(x)), x, labels, torch.ones(len(x)))
    protos, owners = memory.class_prototypes(num_classes=4, per_class=2, iters=10)
    assert protos.shape == (6, 8) and owners.tolist() == [0, 0, 1, 1, 2, 2]  # class 3 has no rows: none
    for c in range(3):
        rows = x[(labels == c)]
        for p in protos[owners == c]:  # each prototype is the mean of one sub-group of its class
            members = rows[(rows - p).norm(dim=1) < 0.5]
            assert len(members) > 0
            torch.testing.assert_close(p, members.mean(0), atol=1e-5, rtol=1e-5)
    # Fewer rows than prototypes per class: the rows themselves.
    few = FeatureMemory(3, 8)
    few.update(torch.tensor([0, 2]), x[:2], torch.tensor([1, 1]))
    protos, owners = few.class_prototypes(num_classes=2, per_class=5)
    assert torch.equal(protos, x[:2]) and owners.tolist() == [1, 1]
    with pytest.raises(ValueError, match="no labeled rows"):
        FeatureMemory(4, 8).class_prototypes(2, 2)
    # Unlabeled prototypes (for contrastive pretraining): k-means over every written row.
    assert memory.prototypes(3, iters=5).shape == (3, 8)


# ------------------------------------------------------------------------------------------ attention


def test_attention_shapes_weights_and_gradients():
    torch.manual_seed(0)
    attn = PrototypeAttention(12, heads=3)
    fx, fp = torch.randn(5, 12, requires_grad=True), torch.randn(7, 12)
    out, w = attn(fx, fp, return_weights=True)
    assert out.shape == fx.shape and w.shape == (5, 3, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 3))
    assert (out >= 0).all()  # the outer relu
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())
    assert attn(torch.randn(2, 4, 12), fp).shape == (2, 4, 12)  # any leading dims
    with pytest.raises(ValueError, match="no prototypes"):
        attn(fx, fp[:0])
    with pytest.raises(ValueError, match="expected features"):
        attn(torch.randn(5, 11), fp)


def test_attention_residual_form():
    torch.manual_seed(0)
    fx, fp = torch.randn(6, 8), torch.randn(4, 8)
    zero = PrototypeAttention(8, heads=2, zero_init=True)
    torch.testing.assert_close(zero(fx, fp), F.relu(fx))  # φᵣ = 0: relu(fₓ)
    attn = PrototypeAttention(8, heads=2)
    with torch.no_grad():
        attn.residual.weight.zero_()
        attn.residual.bias.zero_()
    torch.testing.assert_close(attn(fx, fp), F.relu(fx))
    plain = PrototypeAttention(8, heads=2, final_relu=False, zero_init=True)
    torch.testing.assert_close(plain(fx, fp), fx)  # without the outer relu: the identity


def test_attention_equals_direct_computation():
    torch.manual_seed(1)
    dim, heads, hd = 8, 2, 4
    attn = PrototypeAttention(dim, heads=heads)
    fx, fp = torch.randn(3, dim), torch.randn(5, dim)
    expected = torch.empty(3, dim)
    for i in range(3):
        parts = []
        for h in range(heads):
            rows = slice(h * hd, (h + 1) * hd)
            ex = attn.embed.weight[rows] @ fx[i] + attn.embed.bias[rows]
            ep = fp @ attn.embed.weight[rows].T + attn.embed.bias[rows]  # [P, hd]
            w = torch.softmax(ep @ ex / math.sqrt(hd), dim=0)
            agg = (w.unsqueeze(1) * ep).sum(0)
            joined = torch.cat([ex, agg])
            parts.append(torch.relu(joined @ attn.aggregate_weight[h] + attn.aggregate_bias[h]))
        fa = torch.cat(parts)
        expected[i] = torch.relu(fx[i] + attn.residual.weight @ fa + attn.residual.bias)
    torch.testing.assert_close(attn(fx, fp), expected.detach(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- losses


def test_featmatch_loss_equals_direct_computation():
    torch.manual_seed(0)
    b, c, tau = 10, 4, 0.6
    weak_g = torch.randn(b, c) * 3
    strong_g, strong_f = torch.randn(b, c, requires_grad=True), torch.randn(b, c, requires_grad=True)
    labels = torch.tensor([2, -1, -1, 0, -1, -1, -1, 1, -1, -1])
    out = featmatch_loss(weak_g, strong_g, strong_f, labels, threshold=tau, lambda_g=0.7, lambda_f=1.3)

    def ce(logits, target):
        return -torch.log_softmax(logits, 0)[target]

    labeled = [i for i in range(b) if labels[i] >= 0]
    unlabeled = [i for i in range(b) if labels[i] < 0]
    clf = sum(ce(weak_g[i], labels[i]) for i in labeled) / len(labeled)
    con_g = con_f = 0.0
    used = []
    for i in unlabeled:
        p = torch.softmax(weak_g[i], 0)
        if p.max() >= tau:
            used.append(i)
            con_g = con_g + ce(strong_g[i], p.argmax())
            con_f = con_f + ce(strong_f[i], p.argmax())
    con_g, con_f = con_g / len(unlabeled), con_f / len(unlabeled)  # FixMatch: over every unlabeled row
    assert 0 < len(used) < len(unlabeled)  # the threshold matters in this example
    torch.testing.assert_close(out.clf, clf)
    torch.testing.assert_close(out.con_g, con_g)
    torch.testing.assert_close(out.con_f, con_f)
    torch.testing.assert_close(out.total, clf + 0.7 * con_g + 1.3 * con_f)
    assert out.mask.nonzero().flatten().tolist() == used
    out.total.backward()
    assert strong_g.grad[labeled].abs().sum() == 0  # labeled rows are not in the consistency terms


def test_featmatch_loss_without_labeled_or_unlabeled_rows_and_shape_errors():
    logits = torch.randn(4, 3)
    none_labeled = featmatch_loss(logits, logits, logits, torch.full((4,), -1))
    assert none_labeled.clf == 0 and torch.isfinite(none_labeled.total)
    all_labeled = featmatch_loss(logits, logits, logits, torch.tensor([0, 1, 2, 0]))
    assert all_labeled.con_g == 0 and all_labeled.con_f == 0 and not all_labeled.mask.any()
    torch.testing.assert_close(all_labeled.total, F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])))
    with pytest.raises(ValueError, match="logits"):
        featmatch_loss(logits, logits[:3], logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        featmatch_loss(logits, logits, logits, torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------- fine-tuning, end to end


ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "finetune.py"


def finetune_module():
    from pipeline import finetune

    return finetune


def launch_module():
    """launch/finetune.py, the entry point (argument parsing; the loop is pipeline.finetune)."""
    spec = importlib.util.spec_from_file_location("launch_finetune", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_labeled_subset_is_seeded_by_global_index():
    finetune = finetune_module()
    labels = torch.arange(30) % 3
    labels[:3] = torch.tensor([1, 1, 1])  # class counts 9, 12, 9
    a = finetune.choose_labeled(labels, 4, 3, seed=0)
    assert torch.equal(a, finetune.choose_labeled(labels, 4, 3, seed=0))
    assert not torch.equal(a, finetune.choose_labeled(labels, 4, 3, seed=1))
    assert torch.bincount(labels[a], minlength=3).tolist() == [4, 4, 4]
    assert torch.bincount(labels[finetune.choose_labeled(labels, 10, 3, seed=0)], minlength=3).tolist() == [9, 10, 9]


def test_warm_start_classifier_equals_the_linear_probe():
    from pipeline.eval import train_linear_probe

    finetune = finetune_module()
    x, labels = blobs(classes=3, per_class=20, dim=8, spread=0.5)
    backbone = torch.nn.Identity()
    backbone.num_features = 8
    net = finetune.FeatMatchNet(backbone, 3, heads=2)
    finetune.warm_start(net, x, labels, 3, seed=0)
    probe = train_linear_probe(x.relu(), labels, x.relu(), labels, num_classes=3, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(net.classifier(x.relu()), probe.head(x.relu()), atol=1e-4, rtol=1e-4)


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory):
    """3 classes of noisy solid-colour 32x32 images: 16 per class for training, 8 for validation."""
    root = tmp_path_factory.mktemp("featmatch")
    rng = np.random.default_rng(0)
    images = {}
    for c, colour in enumerate(COLOURS):
        for i in range(24):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            images[f"c{c}/{i:03d}.png"] = encode(pixels)
    src = image_folder(root / "src", images)
    return make_shards(src, root / "shards", "--val-fraction", "0.34")


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    from models.backbones import create_backbone
    from models.export import encoder_spec, write_timm_folder
    from pipeline.config import load_config

    cfg = load_config(None, ["model.backbone=test_resnet", "data.views=[{size: 24}, {size: 24}]",
                             "data.eval_size=24", "data.eval_resize=32"])
    torch.manual_seed(0)
    model = create_backbone(cfg.model, 24)
    out = tmp_path_factory.mktemp("backbone") / "test_resnet"
    write_timm_folder(out, model.state_dict(), encoder_spec(model), cfg, {"step": 0})
    return out


def test_finetune_learns_from_few_labels(colour_shards, tiny_backbone, tmp_path, capsys):
    import timm

    finetune = launch_module()
    out = tmp_path / "out"
    argv = ["--backbone", f"local-dir:{tiny_backbone}", "--train", str(colour_shards / "train"),
            "--val", str(colour_shards / "val"), "--labels-per-class", "2", "--epochs", "6", "--batch-size", "12",
            "--lr", "0.05", "--threshold", "0.8", "--prototypes-per-class", "3", "--heads", "2",
            "--strong-views", "1", "--output", str(out)]  # the released form, with 1 of its 8 RandAugment views
    assert finetune.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["labeled_images"] == 6 and result["train_images"] == 48 and result["val_images"] == 24
    assert len(result["epochs"]) == 6
    assert result["epochs"][-1]["prototypes"] >= 6  # at least the labeled images of every class
    # From a random classifier (about chance) to well above chance (1/3) on held-out images.
    assert result["val_top1"] >= 0.8 and result["val_top1_plain"] >= 0.8, result
    assert result["epochs"][-1]["clf"] < result["epochs"][0]["clf"]
    # The output is a timm classifier.
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 3)
    assert (out / "augf.safetensors").is_file() and (out / "result.json").is_file()


def test_optimizer_uses_timm_groups_per_part_and_the_train_schedule():
    finetune = finetune_module()
    backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    backbone.num_features = 8
    net = finetune.FeatMatchNet(backbone, 3, heads=2)
    args = launch_module().parse_args(["--backbone", "x", "--train", "t", "--val", "v", "--labels-per-class", "1",
                                       "--lr", "0.1", "--backbone-lr-scale", "0.5", "--weight-decay", "0.01", "--form", "fixmatch"])
    assert args.warmup_epochs == 0
    opt, sched = finetune.build_optimizer(net, args, total_steps=10, steps_per_epoch=5)
    assert isinstance(opt, torch.optim.SGD) and all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)
    decay_of = {id(p): (g["weight_decay"], g["lr"]) for g in opt.param_groups for p in g["params"]}
    assert len(decay_of) == sum(1 for _ in net.parameters())
    assert decay_of[id(backbone[0].weight)] == (0.01, 0.05) and decay_of[id(backbone[0].bias)] == (0.0, 0.05)
    assert decay_of[id(backbone[1].weight)] == (0.0, 0.05)  # a norm's scale: no weight decay
    assert decay_of[id(net.classifier.weight)] == (0.01, 0.1) and decay_of[id(net.classifier.bias)] == (0.0, 0.1)
    # No warm-up: cosine from lr to 0 over every step, per group (what the hand-written LambdaLR gave).
    lrs = []
    for step in range(1, 11):
        sched.step_update(step)
        lrs.append([g["lr"] for g in opt.param_groups])
    for step, row in enumerate(lrs, 1):
        factor = 0.5 * (1 + math.cos(math.pi * step / 10))
        assert row == pytest.approx([g["initial_lr"] * factor for g in opt.param_groups], abs=1e-12)
    # With warm-up: linear to lr over the warm-up steps, then cosine over the remaining ones.
    args.warmup_epochs = 0.4
    opt, sched = finetune.build_optimizer(net, args, total_steps=10, steps_per_epoch=5)
    head = opt.param_groups[-1]  # the classifier's, at lr
    sched.step_update(0)
    assert head["lr"] == pytest.approx(0.1 * 1e-3)
    sched.step_update(2)
    assert head["lr"] == pytest.approx(0.1)
    sched.step_update(6)
    assert head["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_launch_finetune_runs_end_to_end(colour_shards, tiny_backbone, tmp_path):
    """`python launch/finetune.py` as a user runs it: one epoch on the tiny set, JSON on stdout."""
    cmd = [sys.executable, str(LAUNCH), "--backbone", f"local-dir:{tiny_backbone}", "--train", str(colour_shards / "train"),
           "--val", str(colour_shards / "val"), "--labels-per-class", "2", "--epochs", "1", "--batch-size", "12",
           "--schedule", "cosine", "--warmup-epochs", "0.5", "--prototypes-per-class", "2", "--heads", "2", "--strong-views", "1", "--device", "cpu",
           "--output", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["labeled_images"] == 6 and len(result["epochs"]) == 1 and math.isfinite(result["epochs"][0]["loss"])
    assert result["settings"]["warmup_epochs"] == 0.5
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # Bad input: a clear error and exit status 2, from the entry point.
    missing = subprocess.run(cmd[:4] + ["--train", str(tmp_path / "none")] + cmd[6:], capture_output=True, text=True,
                             cwd=tmp_path, timeout=600)
    assert missing.returncode == 2 and "error:" in missing.stderr and "none" in missing.stderr
    bad = subprocess.run(cmd + ["--warmup-epochs", "-1"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert bad.returncode == 2 and "--warmup-epochs" in bad.stderr
