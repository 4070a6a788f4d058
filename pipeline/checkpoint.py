"""Checkpoints: DeepSpeed's state (model with momentum encoder and queue, optimizer, ZeRO partitions) plus
what DeepSpeed does not keep: each rank's data position and random states, the run's step and config,
and the online backbone as safetensors (what export and evaluation read; no pickle there).

A checkpoint is the folder CKPT_DIR/step-NNNNNNNN. Its `meta.json` is written last, atomically, after
every rank has finished: a folder without it is incomplete and is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from models.export import write_timm_folder
from pipeline.config import Config

META = "meta.json"
BACKBONE = "backbone.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used by this run (the message says why)."""


def fingerprint(model: torch.nn.Module, cfg) -> dict:
    """What must match for a checkpoint to load: method, backbone and every parameter's shape."""
    shapes = {name: list(t.shape) for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    return {"method": cfg.method.name, "backbone": cfg.model.backbone, "cifar_stem": cfg.model.cifar_stem, "shapes": shapes}


def check_fingerprint(path: Path, expected: dict) -> dict:
    meta = read_meta(path)
    found = meta["fingerprint"]
    for key in ("method", "backbone", "cifar_stem"):
        if found[key] != expected[key]:
            raise CheckpointError(f"{path}: written by {key}={found[key]!r}, this run has {key}={expected[key]!r}")
    if found["shapes"] != expected["shapes"]:
        names = set(found["shapes"]) | set(expected["shapes"])
        differ = sorted(k for k in names if found["shapes"].get(k) != expected["shapes"].get(k))
        raise CheckpointError(f"{path}: a different model: parameters differ, first {differ[:3]}")
    return meta


def read_meta(path: Path) -> dict:
    meta = Path(path) / META
    if not meta.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META})")
    return json.loads(meta.read_text())


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / META).is_file())


def rng_state() -> dict:
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rank_state_file(path: Path, rank: int) -> Path:
    return path / f"rank-{rank:05d}.json"


def save(engine, folder: Path, step: int, rank: int, rank_state: dict, meta: dict, backbone_state: dict | None, keep: int) -> Path:
    """Collective: every rank calls it. Rank 0 writes the backbone and, after all ranks are done, the meta
    file that marks the checkpoint complete, then removes all but the newest `keep` complete ones."""
    tag = f"step-{step:08d}"
    path = folder / tag
    engine.save_checkpoint(str(folder), tag=tag)
    _atomic_write(rank_state_file(path, rank), json.dumps({**rank_state, "rng": rng_state()}))
    if rank == 0 and backbone_state is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in backbone_state.items()}, str(path / BACKBONE))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _atomic_write(path / META, json.dumps({**meta, "step": step}, indent=1))
        for old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def to_universal(path: Path, rank: int) -> Path:
    """DeepSpeed's universal form of checkpoint `path`, which loads at any world size (ZeRO 1-3).
    Collective: rank 0 converts, every rank waits; returns the folder holding the converted tag."""
    out = path.parent / f"universal-{path.name}"
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(out / path.name), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckpointError(f"{path}: conversion to DeepSpeed's universal checkpoint failed:\n{done.stderr[-2000:]}")
    if dist.is_initialized():
        dist.barrier()
    return out


def plan_reshard(path: Path, cfg, rank: int) -> tuple[Path, bool]:
    """How to load checkpoint `path` at another world size: (folder to load from, module only).

    AdamW's state is re-cut by DeepSpeed's universal form (which restores trainable weights only: call
    `restore_untrained_state` after it); other optimizers' state cannot follow, so only the module
    (weights, momentum encoder, queue) loads. ZeRO-3 keeps the module partitioned: no way across.
    """
    if cfg.engine.zero_stage == 3:
        raise CheckpointError(f"{path}: a ZeRO-3 checkpoint loads only at the world size that wrote it ({read_meta(path)['world_size']})")
    if cfg.optim.name == "adamw":
        return to_universal(path, rank), False
    return path.parent, True


def restore_untrained_state(module: torch.nn.Module, path: Path) -> None:
    """Buffers and frozen parameters (momentum encoder, queue, BatchNorm statistics) from the checkpoint's
    module file, which DeepSpeed's universal loading skips."""
    saved = torch.load(Path(path) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    untrained = {k: v for k, v in saved.items() if k not in trained}
    missing = [k for k in module.state_dict() if k not in trained and k not in untrained]
    if missing:
        raise CheckpointError(f"{path}: module file lacks {missing[:3]}")
    module.load_state_dict(untrained, strict=False)


def resolve(resume: str, folder: Path) -> Path | None:
    """`auto`: the newest complete checkpoint in `folder` (or none); `never`; or a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(folder)
        return found[-1] if found else None
    path = Path(resume)
    read_meta(path)  # raises if incomplete
    return path


def export_backbone(path: Path, out: Path) -> Path:
    """Write the checkpoint's online backbone as a timm folder (see models.export)."""
    meta = read_meta(path)
    state = load_file(str(Path(path) / BACKBONE))
    write_timm_folder(Path(out), state, Config.model_validate(meta["config"]), meta, meta["num_features"])
    return Path(out)
