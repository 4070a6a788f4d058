"""The standard linear evaluation (pipeline/linear.py, launch/linear.py): against a float64 computation of
the protocol on one and two ranks (gloo), on the embedded digits, resume, presets, bad input."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from timm.models._hub import save_for_hf

from conftest import encode, image_folder, make_shards
from distributed_utils import spawn

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "linear.py"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def launch_module():
    spec = importlib.util.spec_from_file_location("launch_linear", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export(folder: Path, size: int, model: torch.nn.Module | None = None) -> Path:
    """`model` (default: a randomly initialised timm test ResNet, which has BatchNorm) saved as timm saves a
    model, at `size` px."""
    torch.manual_seed(0)
    model = model or timm.create_model("test_resnet", num_classes=0)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size), "crop_pct": 1.0, "mean": MEAN, "std": STD}
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def colour_set(tmp_path_factory):
    """3 classes of noisy solid-colour 16x16 PNGs (lossless, square: a full-image crop is the image): 24 to
    train on, 12 to score."""
    root = tmp_path_factory.mktemp("linear")
    rng = np.random.default_rng(0)
    images = {}
    for c, colour in enumerate(COLOURS):
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 60, (16, 16, 3)), 0, 255).astype(np.uint8)
            images[f"c{c}/{i:03d}.png"] = encode(pixels)
    src = image_folder(root / "src", images)
    return make_shards(src, root / "shards", "--val-fraction", "0.34"), export(root / "backbone", 16)


# ------------------------------------------------------------------------------- float64 reference


def training_images(shard_set: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training image (float64 [N, 3, H, W], normalised) and label, read from the tars directly."""
    import io
    import tarfile

    members: dict[str, dict[str, bytes]] = {}
    for tar in sorted(shard_set.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = t.extractfile(m).read()
    pixels = [np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"), dtype=np.float64) / 255 for s in members.values()]
    labels = torch.tensor([int(s["cls"]) for s in members.values()])
    x = (torch.tensor(np.stack(pixels)) - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64)
    return x.permute(0, 3, 1, 2), labels


def reference_classifier(shards: Path, backbone: Path, epochs: int, base_lr: float, seed: int):
    """The protocol written out in float64 with full-image views and one full batch per epoch: frozen
    eval-mode features of every training image, N(0, 0.01²) weights from `seed`, zero bias, cross-entropy,
    SGD with momentum 0.9 (torch's form: buf = 0.9 buf + grad), lr = base_lr·N/256·(1 + cos(πe/E))/2."""
    model = timm.create_model(f"local-dir:{backbone}", pretrained=True).double().eval()
    images, labels = training_images(shards / "train")
    with torch.no_grad():
        features = model(images)
    n, dim = features.shape
    classes = 3
    weight = torch.empty(classes, dim).normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed)).double()
    bias = torch.zeros(classes, dtype=torch.float64)
    buffers = None
    for e in range(epochs):
        lr = base_lr * n / 256 * (1 + math.cos(math.pi * e / epochs)) / 2
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        F.cross_entropy(features @ w.T + b, labels).backward()
        grads = (w.grad, b.grad)
        buffers = list(grads) if buffers is None else [0.9 * v + g for v, g in zip(buffers, grads)]
        weight, bias = weight - lr * buffers[0], bias - lr * buffers[1]
    return weight, bias, n


def _run_worker(rank, world_size, backbone, train, val, output, overrides):
    import pipeline.methods  # noqa: F401
    from pipeline.linear import linear_eval

    linear_eval(f"local-dir:{backbone}", train, val, preset="cifar", overrides=overrides, output=output, log_every=1)


def test_protocol_on_two_ranks_equals_the_float64_one_process_reference(colour_set, tmp_path):
    """Full-image views (crop area and aspect 1, no flip) and one full batch per epoch make the protocol a
    fixed computation: 2 ranks (each half a batch, the gradients averaged) must give the classifier of the
    float64 one-process reference. Train-mode BatchNorm or a gradient summed instead of averaged would not."""
    world_size = 2
    shards, backbone = colour_set
    epochs, base_lr, seed = 3, 2.0, 5
    weight, bias, n = reference_classifier(shards, backbone, epochs, base_lr, seed)
    overrides = {"epochs": epochs, "batch_size": n, "base_lr": base_lr, "seed": seed, "scale": (1.0, 1.0),
                 "ratio": (1.0, 1.0), "flip": 0.0}
    out = tmp_path / "run"
    spawn(_run_worker, world_size, str(backbone), str(shards / "train"), str(shards / "val"), str(out), overrides, timeout=120)
    got = load_file(str(out / "classifier.safetensors"))
    torch.testing.assert_close(got["weight"].double(), weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["bias"].double(), bias, rtol=1e-4, atol=1e-6)
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == world_size and result["steps"] == epochs and list(result)[-2:] == ["top1", "top5"]
    assert result["top5"] == 1.0  # 3 classes: the top 5 hold every class


# ------------------------------------------------------------------------------- the digits, resume


def run_on_digits(digits: Path, backbone: Path, out: Path, *extra: str) -> tuple[list[str], dict]:
    """`python launch/linear.py` on the embedded digits at 8 px (the scans' own resolution), with crops of half
    the image or more (on 8 px digits, random features learn little from crops down to 8% of the area), 2
    epochs of 11 steps; its argv and printed result."""
    argv = ["--backbone", f"local-dir:{backbone}", "--train", str(digits / "train"), "--val", str(digits / "val"),
            "--epochs", "2", "--batch-size", "128", "--lr", "3", "--crop-scale", "0.5", "1", *extra, "--output", str(out)]
    done = subprocess.run([sys.executable, str(LAUNCH), *argv], capture_output=True, text=True, cwd=out.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return argv, json.loads(done.stdout[done.stdout.index("{\n"):])


@pytest.fixture(scope="module")
def digits_run(digits, tmp_path_factory):
    """The protocol on a random backbone, with a checkpoint every 4 steps and at each epoch's end."""
    root = tmp_path_factory.mktemp("digits-linear")
    out = root / "run"
    argv, result = run_on_digits(digits, export(root / "backbone", 8), out, "--checkpoint-every", "4", "--keep-checkpoints", "10")
    return argv, out, result


def supervised_backbone(digits: Path) -> torch.nn.Module:
    """The random backbone of `export`, then trained with the labels: 40 full-batch Adam steps of
    cross-entropy on the full training images at 8 px (a backbone whose features are known to be good)."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    images, labels = training_images(digits / "train")
    images = F.interpolate(images.float(), size=8, mode="area")  # the 32-px files, as the protocol's 8-px views
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    model.reset_classifier(0)
    return model


def test_protocol_on_the_digits_beats_chance(digits_run):
    """Random-backbone features: well above chance (10 classes) after 2 epochs; without training the
    N(0, 0.01²) classifier is at chance."""
    _, out, result = digits_run
    assert list(result)[-2:] == ["top1", "top5"]
    assert result["protocol"]["preset"] == "cifar" and result["lr"] == 3 * 128 / 256
    assert result["train_images"] == 1438 and result["val_images"] == 359 and result["steps"] == 22
    assert result["protocol"]["scale"] == [0.5, 1.0]
    assert result["top1"] > 0.2 and result["top5"] > 0.6, result  # measured: 0.30 and 0.70
    assert json.loads((out / "result.json").read_text()) == result
    assert any((out / "tensorboard").iterdir())


def test_protocol_scores_a_trained_backbone_above_the_untrained_one(digits, digits_run, tmp_path):
    """What the protocol is for: the same run on a backbone trained on the digits scores well above the
    untrained backbone's features."""
    _, _, untrained = digits_run
    _, trained = run_on_digits(digits, export(tmp_path / "backbone", 8, supervised_backbone(digits)), tmp_path / "run")
    assert trained["top1"] > untrained["top1"] + 0.3, (trained["top1"], untrained["top1"])


def test_resume_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(digits_run, tmp_path):
    argv, out, result = digits_run
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps == [f"step-{s:08d}" for s in (4, 8, 11, 12, 16, 20, 22)]  # every 4 steps and each epoch's end
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-00000016", resumed / "checkpoints" / "step-00000016")  # epoch 2, step 5
    argv = argv[:-1] + [str(resumed)]
    done = subprocess.run([sys.executable, str(LAUNCH), *argv], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    again = json.loads(done.stdout[done.stdout.index("{\n"):])
    for key in ("top1", "top5", "balanced", "steps"):
        assert again[key] == result[key], key
    first, second = (load_file(str(folder / "classifier.safetensors")) for folder in (out, resumed))
    assert all(torch.equal(first[k], second[k]) for k in first)


# ------------------------------------------------------------------------------- presets, bad input


def test_presets_follow_the_official_settings(tmp_path):
    from pipeline.linear import PRESETS, protocol_for

    resnet = timm.create_model("test_resnet", num_classes=0)  # 160 px: imagenet
    vit = timm.create_model("test_vit", num_classes=0)
    small = timm.create_model(f"local-dir:{export(tmp_path / 'small', 32)}", pretrained=True)
    imagenet = protocol_for("auto", resnet)
    assert (imagenet.preset, imagenet.epochs, imagenet.batch_size, imagenet.lr) == ("imagenet", 90, 1024, 0.1 * 1024 / 256)
    assert (imagenet.momentum, imagenet.weight_decay, imagenet.scale, imagenet.flip) == (0.9, 0.0, (0.08, 1.0), 0.5)
    assert protocol_for("auto", vit).base_lr == 3.0  # MoCo v3 CONFIG.md, ViT linear classification
    cifar = protocol_for("auto", small)
    assert (cifar.preset, cifar.epochs, cifar.batch_size, cifar.lr) == ("cifar", 100, 256, 0.1)
    assert protocol_for("imagenet", small, epochs=3, base_lr=None).epochs == 3 and PRESETS["imagenet"].epochs == 90
    with pytest.raises(ValueError, match="preset"):
        protocol_for("stl", small)


def test_cosine_per_epoch_as_main_lincls():
    from timm.scheduler import CosineLRScheduler

    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.4)
    schedule = CosineLRScheduler(opt, t_initial=90, lr_min=0.0, t_in_epochs=True)
    for epoch in (0, 1, 45, 89):
        schedule.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * epoch / 90)))


def test_bad_input_is_one_clear_error(colour_set, tmp_path, capsys):
    shards, backbone = colour_set
    linear = launch_module()
    common = ["--output", str(tmp_path / "out")]
    assert linear.main(["--backbone", f"local-dir:{tmp_path / 'missing'}", "--train", str(shards / "train"),
                        "--val", str(shards / "val"), *common]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    unlabeled = make_shards(image_folder(tmp_path / "flat", {f"{i}.png": encode(np.zeros((8, 8, 3), np.uint8) + i) for i in range(8)}),
                            tmp_path / "unlabeled")
    assert linear.main(["--backbone", f"local-dir:{backbone}", "--train", str(unlabeled), "--val", str(unlabeled), *common]) == 2
    assert "unlabeled shards, where labeled ones are needed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything started
    with pytest.raises(SystemExit):
        linear.parse_args(["--backbone", "x", "--train", "t", "--val", "v", "--epochs", "0"])
