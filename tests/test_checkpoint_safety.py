"""Checkpoints are safe to resume from: nothing in one executes (a planted pickle payload never runs on
resume, on a resume at another world size, in export or evaluate), a crash or a full disk while saving
loses nothing, and a damaged checkpoint is named and passed over for the newest intact one."""

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config
import distributed_utils
from distributed_utils import free_port
from models.export import encoder_spec
from pipeline import checkpoint

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "launch" / "pretrain.py")
TINY = [
    "data.views=[{size: 16}, {size: 16}]", "data.batch_size=6", "data.num_threads=1",
    "data.eval_size=16", "data.eval_resize=16", "model.backbone=test_vit", "method.name=mocov3",
    "model.projector={hidden_dim: 32, out_dim: 16}", "model.predictor={hidden_dim: 32, out_dim: 16}",
    "engine.precision=fp32", "optim.name=adamw", "engine.zero_stage=2",
    "train.log_every=1", "train.knn_every=0", "train.knn_k=5", "train.checkpoint_every=1", "train.keep_checkpoints=5",
]


# --- helpers ------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def plant(ckpt: Path, name: str, marker: Path) -> None:
    """Put a payload into checkpoint file `name` and record its new size and hash in meta.json, as an
    attacker who can write the folder would: the hashes guard against damage, not against intent."""
    f = ckpt / name
    state = torch.load(f, map_location="cpu", weights_only=False)
    state["payload"] = Payload(marker)
    torch.save(state, f)
    meta = json.loads((ckpt / "meta.json").read_text())
    if "files" in meta:
        meta["files"][name] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def run(cmd, expect_rc=0, timeout=600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == expect_rc, f"{cmd}\nrc {out.returncode}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-5000:]}"
    return out


def pretrain(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, PRETRAIN, "--data", str(shards), "--output", str(out), *TINY, *extra]


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()), *args]


def load_launch(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spawn(fn, world_size: int, *args) -> None:
    """On gloo ranks; a rank stuck in a collective times out after 90 s."""
    distributed_utils.spawn(fn, world_size, *args, timeout=90)


def tiny_engine(world: int):
    import deepspeed

    from pipeline.methods import build_method
    from pipeline.train import deepspeed_config

    torch.manual_seed(0)
    cfg = tiny_config("mocov3", "engine.zero_stage=2")
    method = build_method(cfg)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=method, optimizer=optimizer, config=deepspeed_config(cfg))
    loss, _ = engine([torch.randn(4, 3, 16, 16) for _ in range(2)])
    engine.backward(loss)
    engine.step()
    meta = {"world_size": world, "fingerprint": checkpoint.fingerprint(method, cfg), "encoders": {"backbone": encoder_spec(method.backbone)},
            "config": cfg.model_dump(mode="json"), "metrics": {}}
    return engine, method, meta


def save_step(engine, method, meta, folder: Path, step: int, rank: int) -> Path:
    backbone = {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}
    return checkpoint.save(engine, folder, step, rank, {"data": None}, meta, {"backbone": backbone}, keep=5)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- 1. nothing from a checkpoint executes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank_run(small_shards, tmp_path_factory) -> Path:
    """Two complete checkpoints (steps 1 and 2) of a one-rank ZeRO-2 AdamW run."""
    out = tmp_path_factory.mktemp("one-rank") / "run"
    run(pretrain(small_shards, out, "--max-steps", "2"))
    return out


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], ids=["model", "optimizer"])
def test_a_planted_payload_never_runs_on_resume(one_rank_run, small_shards, tmp_path, name):
    out, marker = copy_run(one_rank_run, tmp_path), tmp_path / "payload-ran"
    plant(out / "checkpoints" / "step-00000002", name, marker)
    done = run(pretrain(small_shards, out, "--max-steps", "3", "--resume", "auto"), expect_rc=2)
    assert not marker.exists(), "the payload ran"
    assert f"step-00000002/{name}: refused" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "checkpoints" / "step-00000003").exists()


def test_a_normal_resume_still_works(one_rank_run, small_shards, tmp_path):
    out = copy_run(one_rank_run, tmp_path)
    done = run(pretrain(small_shards, out, "--max-steps", "3", "--resume", "auto"))
    assert "resumed from" in done.stdout + done.stderr
    assert checkpoint.complete_checkpoints(out / "checkpoints")[-1].name == "step-00000003"
    checkpoint.verify(out / "checkpoints" / "step-00000003")


def test_a_planted_payload_never_runs_on_a_resume_at_another_world_size(small_shards, tmp_path):
    """Written by two ranks, resumed by one: the optimizer states pass through DeepSpeed's universal
    conversion (a subprocess) before loading."""
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    run(launcher("--num_gpus", "2", *pretrain(small_shards, out, "--max-steps", "1")[1:]))
    ckpt = out / "checkpoints" / "step-00000001"
    assert checkpoint.read_meta(ckpt)["world_size"] == 2
    plant(ckpt, "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    done = run(pretrain(small_shards, out, "--max-steps", "2", "--resume", "auto"), expect_rc=2)
    assert not marker.exists(), "the payload ran"
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: refused" in done.stderr and "Traceback" not in done.stderr


def test_a_planted_payload_never_runs_in_export_or_evaluate(one_rank_run, small_shards, tmp_path, capsys):
    out, marker = copy_run(one_rank_run, tmp_path), tmp_path / "payload-ran"
    ckpt = out / "checkpoints" / "step-00000002"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        plant(ckpt, name, marker)
    assert load_launch("export").main([str(ckpt), str(tmp_path / "export")]) == 0  # reads safetensors only
    # A pickle posing as the backbone's safetensors: refused, named, not run.
    torch.save({"w": Payload(marker)}, ckpt / checkpoint.encoder_file("backbone"))
    capsys.readouterr()
    assert load_launch("export").main([str(ckpt), str(tmp_path / "export2")]) == 2
    assert f"{ckpt / checkpoint.encoder_file('backbone')}: damaged" in capsys.readouterr().err
    evaluate = load_launch("evaluate")
    assert evaluate.main(["--backbone", str(ckpt), "--train", str(small_shards), "--val", str(small_shards), "--knn"]) == 2
    torch.save({"w": Payload(marker)}, tmp_path / "export" / "model.safetensors")
    assert evaluate.main(["--backbone", f"local-dir:{tmp_path / 'export'}", "--train", str(small_shards),
                          "--val", str(small_shards), "--knn"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: damaged" in err and "Traceback" not in err
    assert not marker.exists(), "the payload ran"


def test_weights_only_loading_refuses_any_pickled_code_and_names_the_file(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"x": torch.ones(1), "p": Payload(tmp_path / "ran")}, f)
    with checkpoint.weights_only_loading(), pytest.raises(checkpoint.CheckpointError, match=f"{f}: refused"):
        torch.load(f, map_location="cpu", weights_only=False)  # as DeepSpeed asks
    assert not (tmp_path / "ran").exists()
    assert torch.load.__module__ == "torch.serialization"  # restored


# --- 2. a crash or a damaged file loses nothing -------------------------------------------------------------------


def _two_checkpoints_worker(rank, world, folder):
    engine, method, meta = tiny_engine(world)
    for step in (1, 2):
        save_step(engine, method, meta, Path(folder), step, rank)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A folder with complete checkpoints step-00000001 and step-00000002 written by checkpoint.save."""
    folder = tmp_path_factory.mktemp("saved") / "checkpoints"
    spawn(_two_checkpoints_worker, 1, str(folder))
    return folder


def test_checkpoints_record_every_file_and_leave_no_staging(saved):
    step = saved / "step-00000002"
    meta = checkpoint.verify(step)
    on_disk = {p.name for p in step.iterdir() if p.is_file()} - {"meta.json"}
    assert set(meta["files"]) == on_disk and {"mp_rank_00_model_states.pt", "backbone.safetensors", "rank-00000.json"} <= on_disk
    assert not list(saved.glob(".staging-*"))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "meta-json": ("meta.json", lambda f: f.write_text('{"step": 2, "fingerprint": ')),
    "truncated-pt": ("mp_rank_00_model_states.pt", _truncate),
    "truncated-optimizer": ("zero_pp_rank_0_mp_rank_00_optim_states.pt", _truncate),
    "truncated-safetensors": ("backbone.safetensors", _truncate),
    "garbage-rank-file": ("rank-00000.json", lambda f: f.write_bytes(os.urandom(f.stat().st_size))),
    "missing-file": ("mp_rank_00_model_states.pt", lambda f: f.unlink()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_auto_names_a_damaged_checkpoint_and_falls_back(saved, tmp_path, capsys, damage):
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    name, spoil = DAMAGE[damage]
    spoil(folder / "step-00000002" / name)
    assert checkpoint.resolve("auto", folder) == folder / "step-00000001"
    assert str(folder / "step-00000002" / name) in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match=f"step-00000002/{name}"):
        checkpoint.resolve(str(folder / "step-00000002"), folder)
    # export reads meta.json and the backbone: damage there is one line naming the file, elsewhere harmless
    rc = load_launch("export").main([str(folder / "step-00000002"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    if name in ("meta.json", "backbone.safetensors"):
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and f"step-00000002/{name}" in err
    else:
        assert rc == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_resume_auto_with_no_intact_checkpoint_says_so(saved, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    for step in ("step-00000001", "step-00000002"):
        _truncate(folder / step / "backbone.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint"):
        checkpoint.resolve("auto", folder)


@pytest.mark.parametrize("damage", ["bad-config", "truncated-weights", "missing-weights"])
def test_evaluate_on_a_damaged_export_is_one_line(saved, small_shards, tmp_path, capsys, damage):
    out = checkpoint.export_encoders(saved / "step-00000002", tmp_path / "export")
    if damage == "bad-config":
        (out / "config.json").write_text("{architecture")
    elif damage == "truncated-weights":
        _truncate(out / "model.safetensors")
    else:
        (out / "model.safetensors").unlink()
    rc = load_launch("evaluate").main(["--backbone", f"local-dir:{out}", "--train", str(small_shards), "--val", str(small_shards)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and str(out) in err


def _crash_while_resaving_worker(rank, world, folder):
    engine, method, meta = tiny_engine(world)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # half a file, then the process is killed
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        os._exit(9)

    torch.save = dying_save
    try:
        save_step(engine, method, meta, Path(folder), 2, rank)
    finally:
        torch.save = real_save


def test_a_crash_while_saving_over_an_existing_step_loses_nothing(saved, tmp_path):
    """After `--resume` of an older step the run saves into step folders that exist: until the new
    checkpoint is complete, the old one stays whole."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    before = snapshot(folder / "step-00000002")
    with pytest.raises(mp.ProcessExitedException):
        spawn(_crash_while_resaving_worker, 1, str(folder))
    assert snapshot(folder / "step-00000002") == before
    assert checkpoint.resolve("auto", folder) == folder / "step-00000002"


def test_a_crash_between_the_two_renames_is_finished_on_resume(saved, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    staging = folder / ".staging-step-00000002"
    staging.mkdir()
    shutil.copytree(folder / "step-00000002", staging / "step-00000002")  # the new one, complete
    os.rename(folder / "step-00000002", staging / "replaced")  # the old one, moved aside
    assert checkpoint.resolve("auto", folder) == folder / "step-00000002"
    checkpoint.verify(folder / "step-00000002")


def _full_disk_worker(rank, world, folder, result):
    import safetensors.torch

    engine, method, meta = tiny_engine(world)
    save_step(engine, method, meta, Path(folder), 1, rank)
    real_save, real_file = torch.save, safetensors.torch.save_file

    def full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    if rank == 1:
        torch.save = full  # DeepSpeed's files of this rank
    else:
        checkpoint.save_file = full  # the backbone, on rank 0
    try:
        save_step(engine, method, meta, Path(folder), 2, rank)
        message = "saved"
    except checkpoint.CheckpointError as e:
        message = str(e)
    finally:
        torch.save, checkpoint.save_file = real_save, real_file
    Path(f"{result}-{rank}").write_text(message)


def test_a_full_disk_while_saving_is_one_clear_error_on_every_rank(tmp_path):
    folder = tmp_path / "checkpoints"
    spawn(_full_disk_worker, 2, str(folder), str(tmp_path / "result"))
    for rank in (0, 1):
        message = (tmp_path / f"result-{rank}").read_text()
        assert message.startswith(f"no space left on {folder}") and "while saving checkpoint step-00000002 (needed ~" in message
        assert " MB)" in message
    assert [p.name for p in folder.iterdir()] == ["step-00000001"]  # no staging folder, no half step 2
    checkpoint.verify(folder / "step-00000001")
