"""Checkpoints: DeepSpeed's state (model with momentum encoder and queue, optimizer, ZeRO partitions) plus
what DeepSpeed does not keep: each rank's data position and random states, the run's step and config,
and each encoder the method exports as safetensors, `ENCODER.safetensors` (what export and evaluation
read; no pickle there; `backbone.safetensors` for most methods).

A checkpoint is the folder CKPT_DIR/step-NNNNNNNN, complete exactly when its `meta.json` is there: every
rank writes into a staging folder (CKPT_DIR/.staging-step-NNNNNNNN/step-NNNNNNNN), rank 0 then records each
file's size and sha256 in `meta.json` and renames the finished folder into place, so a crash or a full
disk while saving leaves the checkpoints already there as they were. `--resume auto` checks the recorded
sizes and hashes and falls back to the newest intact checkpoint.

Nothing in a checkpoint executes: every `torch.load` of its files (DeepSpeed's own, which ask for
`weights_only=False`, and those of its universal conversion) runs weights-only, allowing tensors,
containers and the few plain DeepSpeed types its files hold (`weights_only_loading`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.export import write_timm_folder
from pipeline.config import Config

META = "meta.json"
STAGING = ".staging-"
ROOT = Path(__file__).resolve().parents[1]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used by this run (the message says why)."""


# --- nothing from a checkpoint executes ------------------------------------------------------------------


def deepspeed_types() -> list:
    """The classes DeepSpeed pickles into its checkpoint files beside tensors and containers (found with
    `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 0-3 checkpoints of SGD, LARS and AdamW in
    fp32, bf16 and fp16): plain data holders, rebuilt without running any code of the file's choosing."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    names = ("LossScaler", "DynamicLossScaler", "LossScaleConfig", "LossScaleProfile")
    return [ZeroStageEnum, fragment_address, *(getattr(loss_scaler, n) for n in names if hasattr(loss_scaler, n))]


def _first_line(e: BaseException) -> str:
    text = str(e)
    for marker in ("WeightsUnpickler error: ",):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip().split("\n")[0][:300]


@contextmanager
def weights_only_loading():
    """Within: every `torch.load` in this process loads weights only (whatever its caller asks), allowing
    `deepspeed_types()`; a file that needs anything else, or cannot be read, raises CheckpointError naming it.
    TORCH_FORCE_WEIGHTS_ONLY_LOAD covers callers that hold their own reference to torch.load."""
    original = torch.load
    if getattr(original, "_weights_only_guard", False):  # nested
        yield
        return
    allowed = deepspeed_types()

    def guarded(f, map_location=None, *args, **kwargs):
        kwargs.pop("pickle_module", None)
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, map_location, **kwargs)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{f}: refused: it holds more than tensors and DeepSpeed's own types "
                                  f"({_first_line(e)}); nothing in it was run") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{f}: cannot be read ({_first_line(e)})") from None

    guarded._weights_only_guard = True
    env = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_engine_state(engine, resume_from: Path, load_from: Path, module_only: bool, universal: bool) -> None:
    """engine.load_checkpoint of checkpoint `resume_from` (from `load_from`, its folder or the universal
    copy), weights only; after a universal load, the untrained state from the checkpoint's module file."""
    with weights_only_loading():
        engine.load_checkpoint(str(load_from), tag=resume_from.name, load_lr_scheduler_states=False,
                               load_module_only=module_only)
        if universal:
            restore_untrained_state(engine.module, resume_from)


def universal_main(argv: list[str]) -> int:
    """`deepspeed.checkpoint.ds_to_universal` (same arguments) with weights-only loading; its worker
    processes fork, so they inherit it. Run by `to_universal` in a subprocess."""
    import multiprocessing

    from deepspeed.checkpoint import ds_to_universal

    multiprocessing.set_start_method("fork", force=True)
    sys.argv = ["ds_to_universal", *argv]
    try:
        with weights_only_loading():
            ds_to_universal.main(ds_to_universal.parse_arguments())
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# --- bookkeeping ---------------------------------------------------------------------------------------------


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
    try:
        found = json.loads(meta.read_bytes())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{meta}: damaged: not valid JSON ({e})") from None
    if not isinstance(found, dict) or not isinstance(found.get("step"), int) or not isinstance(found.get("fingerprint"), dict):
        raise CheckpointError(f"{meta}: damaged: not a checkpoint's meta file (no step or fingerprint)")
    if "files" in found and not (isinstance(found["files"], dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str) for v in found["files"].values())):
        raise CheckpointError(f"{meta}: damaged: its file list is malformed")
    return found


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / META).is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(value) -> list:
    """Every rank's `value`, on every rank (a list of one without a process group)."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _hash_files(path: Path, names: list[str], collective: bool = True) -> dict:
    """{name: {size, sha256}} of files in `path`; `collective` (when a process group exists): every rank
    calls it, the ranks share the hashing and all get the whole result."""
    rank, world = _world() if collective else (0, 1)
    mine = {n: {"size": (path / n).stat().st_size, "sha256": _sha256(path / n)} for n in names[rank::world]}
    return {k: v for part in (_gather(mine) if collective else [mine]) for k, v in part.items()}


def verify(path: Path, only: tuple[str, ...] | None = None, collective: bool = False) -> dict:
    """The checkpoint's meta after checking every file it records (or those in `only`): size and sha256;
    CheckpointError naming the first damaged or missing file. `collective`: every rank calls it and they
    share the hashing. Checkpoints written before hashes were recorded are checked for their meta only."""
    meta = read_meta(path)
    files = meta.get("files", {})
    names = sorted(n for n in files if only is None or n in only)
    for n in names:
        f = Path(path) / n
        if Path(n).name != n:
            raise CheckpointError(f"{Path(path) / META}: damaged: names a file outside its folder ({n!r})")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if f.stat().st_size != files[n]["size"]:
            raise CheckpointError(f"{f}: damaged: {f.stat().st_size} bytes, {files[n]['size']} were written")
    found = _hash_files(Path(path), names, collective)
    for n in names:
        if found[n]["sha256"] != files[n]["sha256"]:
            raise CheckpointError(f"{Path(path) / n}: damaged: its sha256 differs from the one recorded when it was written")
    return meta


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


# --- saving --------------------------------------------------------------------------------------------------


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def encoder_file(name: str) -> str:
    return f"{name}.safetensors"


def _needed_bytes(engine, folder: Path, encoder_states: dict | None) -> int:
    """About what one checkpoint takes: the newest complete one's recorded size, else the module, the
    optimizer state of every rank and the encoders."""
    for path in reversed(complete_checkpoints(folder)):
        try:
            files = read_meta(path).get("files")
        except CheckpointError:
            continue
        if files:
            return sum(f["size"] for f in files.values())
    _, world = _world()
    module = sum(_tensor_bytes(t) for t in engine.module.state_dict().values())
    optim = getattr(engine, "optimizer", None)
    state = _tensor_bytes(list(getattr(optim, "state", {}).values())) if optim is not None else 0
    return module + state * world + _tensor_bytes(encoder_states or {})


def _describe_failure(e: BaseException, folder: Path, tag: str, needed: int) -> str:
    no_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if no_space or "No space left" in str(e) or (free is not None and free < needed):
        where = f"{folder}" + (f" ({free / 2**20:.0f} MB free)" if free is not None else "")
        return f"no space left on {where} while saving checkpoint {tag} (needed ~{max(needed / 2**20, 1):.0f} MB); nothing was written"
    return f"{folder / tag}: saving the checkpoint failed ({type(e).__name__}: {_first_line(e)}); nothing was written"


@contextmanager
def _deferred_write_errors(engine):
    """DeepSpeed's save_checkpoint ends in a barrier: a rank whose write fails must still reach it, so its
    checkpoint engine's `save` records the first failure (and skips later writes) instead of raising."""
    failures = []
    ckpt_engine = engine.checkpoint_engine
    original = ckpt_engine.save

    def save(*args, **kwargs):
        if failures:
            return None
        try:
            return original(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (reported once every rank is past the barrier)
            failures.append(e)

    ckpt_engine.save = save
    try:
        yield failures
    finally:
        del ckpt_engine.save  # the instance attribute; the class's method shows again


def _swap_in(staged: Path, final: Path) -> None:
    """Rename the finished folder `staged` to `final`; an existing `final` is first moved into the staging
    folder (a crash between the two renames leaves both complete there: `recover` finishes the swap)."""
    if final.exists():
        os.rename(final, staged.parent / "replaced")
    os.rename(staged, final)


def recover(folder: Path) -> None:
    """Finish a swap that a crash interrupted: a staged checkpoint complete with its meta, whose step folder
    is missing, is renamed into place. Safe to run on every rank at once."""
    if not folder.is_dir():
        return
    for staging in folder.glob(f"{STAGING}step-*"):
        tag = staging.name[len(STAGING):]
        staged, final = staging / tag, folder / tag
        if (staged / META).is_file() and not final.exists():
            try:
                os.rename(staged, final)
            except OSError:
                pass  # another rank did it, or it cannot be done: the step folder decides


def save(engine, folder: Path, step: int, rank: int, rank_state: dict, meta: dict, encoder_states: dict[str, dict] | None,
         keep: int) -> Path:
    """Collective: every rank calls it. All ranks write into a staging folder; rank 0 writes the encoders
    (`encoder_states`: name -> state) and, after all ranks are done, the meta file with each file's size and sha256, renames the staged
    folder into place, then removes all but the newest `keep` complete checkpoints. A failure on any rank
    (a full disk: OSError ENOSPC) removes the staging folder and raises CheckpointError on every rank."""
    tag = f"step-{step:08d}"
    final, staging = folder / tag, folder / f"{STAGING}{tag}"
    path = staging / tag
    needed = _needed_bytes(engine, folder, encoder_states)
    error = None
    if rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(f"{STAGING}step-*"):  # left by a crash; `recover` took what was complete
                shutil.rmtree(stale, ignore_errors=True)
            free = shutil.disk_usage(folder).free
            if free < needed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        except OSError as e:
            error = _describe_failure(e, folder, tag, needed)
    error = next((e for e in _gather(error) if e), None)
    if error is None:
        try:
            with _deferred_write_errors(engine) as failures:
                engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
            if failures:
                raise failures[0]
            _atomic_write(rank_state_file(path, rank), json.dumps({**rank_state, "rng": rng_state()}))
            for name, state in (encoder_states or {}).items() if rank == 0 else ():
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / encoder_file(name)))
        except Exception as e:  # noqa: BLE001  (every rank must hear of it, or the others wait forever)
            error = _describe_failure(e, folder, tag, needed)
        error = next((e for e in _gather(error) if e), None)
    if error is None:
        files = _hash_files(path, sorted(p.name for p in path.iterdir() if p.is_file()))
        if rank == 0:
            try:
                _atomic_write(path / META, json.dumps({**meta, "step": step, "files": files}, indent=1))
                _swap_in(path, final)
                shutil.rmtree(staging, ignore_errors=True)
            except OSError as e:
                error = _describe_failure(e, folder, tag, needed)
        error = next((e for e in _gather(error) if e), None)
    if error is not None:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        raise CheckpointError(error)
    if rank == 0:
        for old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


# --- loading ---------------------------------------------------------------------------------------------


def to_universal(path: Path, rank: int) -> Path:
    """DeepSpeed's universal form of checkpoint `path`, which loads at any world size (ZeRO 1-3).
    Collective: rank 0 converts (weights only: `universal_main`), every rank waits; returns the folder
    holding the converted tag."""
    out = path.parent / f"universal-{path.name}"
    error = None
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pipeline.checkpoint import universal_main; "
                "sys.exit(universal_main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", code, "--input_folder", str(path), "--output_folder", str(out / path.name),
               "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            mine = [line[len("error: "):] for line in done.stderr.splitlines() if line.startswith("error: ")]
            error = mine[-1] if mine else f"{path}: conversion to DeepSpeed's universal checkpoint failed:\n{done.stderr[-2000:]}"
    error = next((e for e in _gather(error) if e), None)
    if error is not None:
        raise CheckpointError(error)
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
    with weights_only_loading():
        saved = torch.load(Path(path) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    untrained = {k: v for k, v in saved.items() if k not in trained}
    missing = [k for k in module.state_dict() if k not in trained and k not in untrained]
    if missing:
        raise CheckpointError(f"{path}: module file lacks {missing[:3]}")
    module.load_state_dict(untrained, strict=False)


def resolve(resume: str, folder: Path) -> Path | None:
    """`auto`: the newest intact complete checkpoint in `folder` (or none), saying which damaged ones it
    passed over; `never`; or a checkpoint path, which must be intact. Collective when a process group exists."""
    if resume == "never":
        return None
    if resume == "auto":
        recover(folder)
        found, damaged = complete_checkpoints(folder), []
        for path in reversed(found):
            try:
                verify(path, collective=True)
                break
            except CheckpointError as e:
                damaged.append(str(e))
                if _world()[0] == 0:
                    print(f"warning: {e}; falling back to an older checkpoint", file=sys.stderr, flush=True)
        else:
            if damaged:
                raise CheckpointError(f"{folder}: no intact checkpoint: " + "; ".join(damaged))
            return None
        return path
    path = Path(resume)
    verify(path, collective=True)  # raises if incomplete or damaged
    return path


def export_encoders(path: Path, out: Path) -> Path:
    """Write the checkpoint's encoders as timm folders (see models.export): `out` itself for a method with
    one encoder; `out/NAME` for each of several. With several, or when the method's evaluation features are
    more than its encoder's output (meta `own_features`), `out/features.json` names them and the recipe,
    from which `pipeline.frozen.load_backbone` rebuilds the method's evaluation features."""
    meta = read_meta(path)
    specs = meta.get("encoders")
    if not isinstance(specs, dict) or not specs:
        raise CheckpointError(f"{Path(path) / META}: damaged: it names no encoders")
    verify(path, only=tuple(encoder_file(name) for name in specs))
    try:
        cfg = Config.model_validate(meta["config"])
        states = {name: load_file(str(Path(path) / encoder_file(name))) for name in specs}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: an encoder cannot be read ({_first_line(e)})") from None
    out = Path(out)
    for name, spec in specs.items():
        write_timm_folder(encoder_folder(out, name, len(specs)), states[name], spec, cfg, meta, name)
    if len(specs) > 1 or meta.get("own_features"):
        _atomic_write(out / "features.json", json.dumps({"encoders": sorted(specs), "config": meta["config"]}, indent=1))
    return out


def encoder_folder(out: Path, name: str, count: int) -> Path:
    """Where an export keeps encoder `name`: the export folder itself when it is the only one."""
    return out if count == 1 else out / name
