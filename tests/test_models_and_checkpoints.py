"""Backbones, heads, the momentum encoder, export to timm, and checkpoint bookkeeping (single process)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conftest import tiny_config
from models.backbones import create_backbone
from models.export import encoder_spec, write_timm_folder
from models.heads import mlp_head
from models.momentum import MomentumEncoder
from pipeline import checkpoint
from pipeline.config import HeadConfig, load_config
from pipeline.methods import build_method
from pipeline.methods.base import cosine_momentum


@pytest.mark.parametrize(
    "overrides, size",
    [
        (["model.backbone=resnet18", "model.cifar_stem=true"], 32),
        (["model.backbone=test_vit"], 16),
        (["model.backbone=test_resnet"], 24),
    ],
)
def test_export_round_trip_through_timm(tmp_path, overrides, size):
    cfg = load_config(None, overrides + [f"data.views=[{{size: {size}}}, {{size: {size}}}]", f"data.eval_size={size}", f"data.eval_resize={size}"])
    model = create_backbone(cfg.model, size).eval()
    for p in model.parameters():  # not the initial weights: the export must carry them
        p.data.add_(torch.randn_like(p) * 0.01)
    write_timm_folder(tmp_path / "out", model.state_dict(), encoder_spec(model), cfg, {"step": 1, "metrics": {"knn": 0.5}})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(2, 3, size, size)
    assert torch.equal(loaded(x), model(x))
    assert "knn: 0.5" in (tmp_path / "out" / "README.md").read_text()
    data_cfg = timm.data.resolve_data_config({}, model=loaded)
    assert data_cfg["input_size"] == (3, size, size) or list(data_cfg["input_size"]) == [3, size, size]


def test_cifar_stem_keeps_32x32_resolution():
    cfg = load_config(None, ["model.cifar_stem=true"])
    model = create_backbone(cfg.model, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4  # 32 / 8 after three stride-2 stages


def kinds(head):
    return [type(m).__name__ for m in head]


def test_heads():
    head = mlp_head(8, HeadConfig(hidden_dim=16, out_dim=4, layers=3, last_bn="no_affine"))
    assert kinds(head) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[-1].affine is False and all(m.bias is None for m in head if isinstance(m, torch.nn.Linear))
    assert head(torch.randn(5, 8)).shape == (5, 4)
    # SimCLR / SDCLR: BatchNorm with scale and shift after every layer, the output included.
    simclr = mlp_head(8, HeadConfig(hidden_dim=16, out_dim=4, layers=2, last_bn="affine"))
    assert kinds(simclr) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"] and simclr[-1].affine
    # MoCo v2: Linear-ReLU-Linear, both with biases; MoCo v3's ResNet predictor: no bias anywhere.
    mocov2 = mlp_head(8, HeadConfig(hidden_dim=16, out_dim=4, hidden_bn=False))
    assert kinds(mocov2) == ["Linear", "ReLU", "Linear"] and mocov2[0].bias is not None and mocov2[2].bias is not None
    plain = mlp_head(8, HeadConfig(hidden_dim=16, out_dim=4, bias=False))
    assert kinds(plain) == ["Linear", "BatchNorm1d", "ReLU", "Linear"] and plain[-1].bias is None


def test_momentum_update_is_an_fp32_ema():
    online = torch.nn.Linear(4, 4)
    ema = MomentumEncoder(online)
    start = ema.encoder.weight.detach().clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(online, 0.99)
    torch.testing.assert_close(ema.encoder.weight, 0.99 * start + 0.01 * online.weight.detach())
    assert not any(p.requires_grad for p in ema.parameters())
    # bf16 would lose this step: 1e-4 relative is below its resolution
    assert ema.encoder.weight.dtype == torch.float32


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["simclr", "mocov2", "mocov3", "sdmp_mocov3", "sdmp_simclr", "sdclr", "metaug"])
def test_each_method_trains_one_step(name):
    torch.manual_seed(0)
    shuffle = ["method.shuffle_groups=2", "method.batch_norm=shuffle"] if name == "mocov2" else []
    method = build_method(tiny_config(name, *shuffle))
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    loss, parts = method(views)
    loss.backward()
    assert torch.isfinite(loss) and parts and all(v.ndim == 0 for v in parts.values())
    assert all(p.grad is not None for n, p in method.named_parameters() if p.requires_grad and "momentum" not in n)
    assert method.after_step(0.5) == ({"momentum": method.momentum} if "moco" in name else {})


def test_mocov2_queue_is_a_ring_of_past_keys():
    torch.manual_seed(0)
    method = build_method(tiny_config("mocov2"))  # queue of 16 keys, batches of 4
    for _ in range(5):
        method([torch.randn(4, 3, 16, 16) for _ in range(2)])
    assert int(method.queue.position) == 5 * 4 % 16
    assert torch.allclose(method.queue.keys.norm(dim=1), torch.ones(16))


# --- checkpoints ------------------------------------------------------------------------------------------


def fake_checkpoint(folder: Path, step: int, fingerprint: dict, complete: bool = True) -> Path:
    path = folder / f"step-{step:08d}"
    path.mkdir(parents=True)
    if complete:
        (path / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint, "world_size": 1}))
    return path


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    fp = checkpoint.fingerprint(torch.nn.Linear(2, 2), tiny_config())
    fake_checkpoint(tmp_path, 10, fp)
    fake_checkpoint(tmp_path, 20, fp)
    fake_checkpoint(tmp_path, 30, fp, complete=False)  # a crash while saving
    assert checkpoint.resolve("auto", tmp_path).name == "step-00000020"
    assert checkpoint.resolve("never", tmp_path) is None
    assert checkpoint.resolve("auto", tmp_path / "empty") is None
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "step-00000030"), tmp_path)


def test_a_checkpoint_of_another_model_or_method_is_refused(tmp_path):
    cfg = tiny_config("simclr")
    model = build_method(cfg)
    path = fake_checkpoint(tmp_path, 1, checkpoint.fingerprint(model, cfg))
    checkpoint.check_fingerprint(path, checkpoint.fingerprint(model, cfg))
    other = tiny_config("mocov3")
    with pytest.raises(checkpoint.CheckpointError, match="written by method='simclr', this run has method='mocov3'"):
        checkpoint.check_fingerprint(path, checkpoint.fingerprint(build_method(other), other))
    wider = tiny_config("simclr", "model.projector={hidden_dim: 32, out_dim: 24, layers: 1}")
    with pytest.raises(checkpoint.CheckpointError, match="a different model: parameters differ, first \\['projector"):
        checkpoint.check_fingerprint(path, checkpoint.fingerprint(build_method(wider), wider))


def test_random_states_round_trip_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_optimizer_groups_skip_norms_biases_tokens_and_self_trained_modules():
    from pipeline.train import build_optimizer

    cfg = tiny_config("mocov3", "optim.name=adamw", "optim.weight_decay=0.1")
    method = build_method(cfg)
    own, groups = {id(p) for p in method.predictor.parameters()}, method.param_groups  # as MetAug leaves out its generators
    method.param_groups = lambda wd: [{**g, "params": [p for p in g["params"] if id(p) not in own]} for g in groups(wd)]
    optimizer, _ = build_optimizer(method, cfg, world_size=1, total_steps=10, steps_per_epoch=5)
    names = {id(p): n for n, p in method.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.norm1.weight"} <= decay[0.0]
    assert "backbone.blocks.0.attn.qkv.weight" in decay[0.1]
    assert not any(n.startswith(("predictor", "momentum_encoder")) for group in decay.values() for n in group)
