"""The main job end to end on the CPU: the embedded default, resume after SIGKILL, ZeRO 1-3 on two ranks,
two simulated nodes, export to timm."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from distributed_utils import free_port
from pipeline.checkpoint import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "launch" / "pretrain.py")
TINY = [
    "data.views=[{size: 16}, {size: 16}]", "data.batch_size=6", "data.num_threads=1",
    "data.eval_size=16", "data.eval_resize=16",
    "model.projector={hidden_dim: 32, out_dim: 16}", "model.predictor={hidden_dim: 32, out_dim: 16}",
    "train.log_every=1", "train.knn_every=0", "train.knn_k=5",
]
pytestmark = pytest.mark.slow


def run(cmd, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"{cmd}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-5000:]}"
    return out


def test_embedded_default_short(tmp_path):
    out = run([sys.executable, PRETRAIN, "--max-steps", "2", "train.knn_every=0"], cwd=tmp_path)
    text = out.stdout + out.stderr
    assert "kNN top-1 before training" in text and "kNN top-1 after training" in text
    run_dir = tmp_path / "runs" / "default"
    ckpt = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert ckpt.name == "step-00000002" and any((run_dir / "tensorboard").iterdir())
    # The exported backbone loads with plain timm and gives the trained online backbone's features.
    model = timm.create_model(f"local-dir:{run_dir / 'backbone'}", pretrained=True).eval()
    assert not (run_dir / "backbone" / "features.json").exists()  # SimCLR evaluates its backbone's output
    from models.backbones import create_backbone
    from pipeline.config import Config

    cfg = Config.model_validate(json.loads((ckpt / "meta.json").read_text())["config"])
    online = create_backbone(cfg.model, 32)
    online.load_state_dict(load_file(ckpt / "backbone.safetensors"))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), online.eval()(x))
    evaluate = [str(ROOT / "launch" / "evaluate.py"), "--backbone", str(ckpt), "--train", "data/sample/train",
                "--val", "data/sample/val", "--knn"]
    report = json.loads(run([sys.executable, *evaluate], cwd=tmp_path).stdout)
    assert report["val_images"] == 359 and 0.1 <= report["knn_top1_k20"] <= 1
    # Spread over two processes by accelerate: every sample counted once, the same accuracy.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    spread = json.loads(run([*accelerate, *evaluate], cwd=tmp_path).stdout)
    assert spread["val_images"] == 359 and spread["knn_top1_k20"] == report["knn_top1_k20"]


def tiny_run(shards: Path, out: Path, *extra: str) -> list[str]:
    return [PRETRAIN, "--data", str(shards), "--output", str(out), *TINY, *extra]


def test_resume_after_sigkill_matches_an_uninterrupted_run(small_shards, tmp_path):
    args = ["model.backbone=test_vit", "method.name=mocov3", "engine.precision=fp32", "train.deterministic=true",
            "train.checkpoint_every=2", "train.keep_checkpoints=5", "--max-steps", "7"]
    run([sys.executable, *tiny_run(small_shards, tmp_path / "a", *args)])

    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, *tiny_run(small_shards, b, *args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (b / "checkpoints" / "step-00000004" / "meta.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not complete_checkpoints(b / "checkpoints")[-1].name.endswith("7"), "killed too late to test anything"
    run([sys.executable, *tiny_run(small_shards, b, *args, "--resume", "auto")])

    final_a, final_b = (complete_checkpoints(d / "checkpoints")[-1] for d in (tmp_path / "a", b))
    assert final_a.name == final_b.name == "step-00000007"
    wa, wb = load_file(final_a / "backbone.safetensors"), load_file(final_b / "backbone.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    data_a, data_b = (json.loads((p / "rank-00000.json").read_text())["data"] for p in (final_a, final_b))
    assert data_a == data_b  # same epoch, step, and DALI reader position and random state


def deepspeed_cmd(*args: str, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port or free_port()), *args]


@pytest.mark.parametrize("backbone, method, stage, precision", [
    # each stage once and each precision at least once (stage 2 with fp16's loss scaler)
    *[pytest.param("test_resnet", "simclr", stage, precision, id=f"test_resnet-simclr-zero{stage}-{precision}")
      for stage, precision in [(1, "bf16"), (3, "bf16"), (2, "fp16")]],
    # the ViT with a momentum encoder at ZeRO-3 only, where its parameters are partitioned (the other stages
    # add nothing the ResNet runs do not test, at twice their time)
    pytest.param("test_vit", "mocov3", 3, "bf16", id="test_vit-mocov3-zero3-bf16"),
])
def test_zero_stages_on_two_ranks_in_mixed_precision(small_shards, tmp_path, stage, precision, backbone, method):
    out = tmp_path / "run"
    run(deepspeed_cmd("--num_gpus", "2", *tiny_run(small_shards, out, f"model.backbone={backbone}", f"method.name={method}",
                                                   f"engine.zero_stage={stage}", f"engine.precision={precision}", "--max-steps", "3")))
    ckpt = complete_checkpoints(out / "checkpoints")[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 3
    assert (ckpt / "rank-00000.json").exists() and (ckpt / "rank-00001.json").exists()
    weights = load_file(ckpt / "backbone.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_two_simulated_nodes_train_checkpoint_and_resume(small_shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"

    def both_nodes(max_steps: int):
        port = free_port()
        procs = [
            subprocess.Popen(
                deepspeed_cmd("--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                              *tiny_run(small_shards, out, "model.backbone=test_vit", "--max-steps", str(max_steps)), port=port),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for node in (0, 1)
        ]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-3000:] for o in outputs)
        return outputs

    both_nodes(2)
    assert complete_checkpoints(out / "checkpoints")[-1].name == "step-00000002"
    outputs = both_nodes(4)
    assert "resumed from" in outputs[0] and complete_checkpoints(out / "checkpoints")[-1].name == "step-00000004"


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(small_shards, tmp_path):
    args = ["optim.name=adamw", "optim.lr=1e30", "optim.warmup_epochs=0", "engine.precision=fp32",
            "train.checkpoint_every=1", "train.keep_checkpoints=5", "--max-steps", "6"]
    out = subprocess.run([sys.executable, *tiny_run(small_shards, tmp_path / "run", *args)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and "the loss is not finite (" in out.stderr, out.stderr[-2000:]
    step = int(out.stderr.split("error: step ")[1].split(":")[0])
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved and saved[-1].name == f"step-{step - 1:08d}"  # every finite step saved, nothing after
