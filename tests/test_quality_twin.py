"""The default method learns as its plain twin does: `launch/pretrain.py` (DeepSpeed, the method module,
timm's optimizer groups and scheduler, the kNN monitor between epochs) against the same recipe written as a
plain PyTorch loop (benchmarks/plain_simclr.py), from the same initial weights on the same batches, step by
step. A method that builds, initialises or optimises anything differently drifts away within a few steps."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks.plain_simclr import simclr_model, train_plain
from pipeline.config import load_config
from pipeline.methods import build_method

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 14  # the first epoch of the digits at batch 128 (11 steps), the kNN monitor, then 3 steps of the second


def logged_losses(run: Path) -> list[float]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("loss/total")]


def plain_twin(cfg):
    """The plain model, holding the initial weights `train()` starts from (it seeds with train.seed on rank 0)."""
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    model = simclr_model(cfg)
    model[0].load_state_dict(method.backbone.state_dict())
    model[1].load_state_dict(method.projector.state_dict())
    return model


def test_default_run_matches_its_plain_twin_step_by_step(digits, tmp_path):
    # fp32 on both sides: bf16 autocast is about 10x slower on CPUs without bf16 instructions (the twin
    # tested bf16 here too while the machine had them: same bands).
    overrides = [f"train.data={digits / 'train'}", f"train.val_data={digits / 'val'}", "train.epochs=2",
                 "optim.warmup_epochs=1", "train.log_every=1", "train.knn_every=1", "train.knn_k=20", "engine.precision=fp32",
                 f"train.max_steps={STEPS}"]
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(ROOT / "launch" / "configs" / "default.yaml"),
           "--output", str(tmp_path / "run"), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kNN top-1 after epoch 1" in done.stdout
    ours = logged_losses(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"run/command/text_summary", "run/git_revision/text_summary", "run/config/text_summary"} <= set(events.Tags()["tensors"])

    cfg = load_config(ROOT / "launch" / "configs" / "default.yaml", overrides)
    model = plain_twin(cfg)
    reference = train_plain(cfg, model, max_steps=STEPS, evaluate=False)["losses"]
    assert len(ours) == len(reference) == STEPS
    # Both runs do the same arithmetic in a different order (channels_last, fused vs dense logits), and
    # Adam's first steps amplify roundings: two plain runs that differ only in their thread count agree to
    # 0.01 for four steps and then drift apart by up to 0.21 (mean 0.05) within 22 steps (measured in
    # bf16 on the CPU). Hence a tight band while the weights are nearly the same and a looser one after.
    diff = (torch.tensor(ours) - torch.tensor(reference)).abs()
    assert diff[:4].max() <= 0.02, diff
    assert diff.max() <= 0.3 and diff.mean() <= 0.08, diff

    # The test has teeth: the twin without the projector's output BatchNorm (the default until 2026-12,
    # which stalled at chance) leaves the band at the first step.
    model = plain_twin(cfg)
    del model[1][-1]
    stalled = train_plain(cfg, model, max_steps=4, evaluate=False)["losses"]
    assert min(abs(a - b) for a, b in zip(ours, stalled)) > 0.5
