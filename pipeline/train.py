"""The training loop: DeepSpeed engine, schedules, checkpoints, logging, online kNN. It knows no method by
name: it uses only what a method declares (pipeline/methods/base.py): its checks, parameter groups,
encoders, evaluation features, hooks, and a forward that gives (loss, parts)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data_shards.shards import read_manifest
from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data.loader import ShardLoader, batches_per_epoch
from pipeline.data.preview import view_grid
from pipeline.eval import extract_features, knn_accuracy
from pipeline.losses.checks import NonFiniteInput
from pipeline.methods import build_method
from models.export import encoder_spec

PRECISION = {"bf16": "bfloat16", "fp16": "float16"}


def init_distributed() -> tuple[int, int, int, torch.device]:
    """Join the launcher's process group, or make a one-process group when run as plain `python`."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def deepspeed_config(cfg: Config) -> dict:
    ds = cfg.engine.deepspeed_json()
    zero = {**ds.get("zero_optimization", {}), "stage": cfg.engine.zero_stage}
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds["zero_force_ds_cpu_optimizer"] = False  # the optimizer is timm's, stepped on the CPU copy
    ds.update(
        train_micro_batch_size_per_gpu=cfg.data.batch_size,
        gradient_accumulation_steps=cfg.optim.accumulation_steps,
        gradient_clipping=cfg.optim.grad_clip or 0.0,
        zero_optimization=zero,
        zero_allow_untested_optimizer=True,  # timm's optimizers (LARS, AdamW with weight-decay groups)
        steps_per_print=10**9,
    )
    # Mixed precision through autocast: parameters stay fp32, so BatchNorm works and the momentum
    # encoder, a part of the same module, is updated in fp32 (DeepSpeed's bf16/fp16 modes cast both).
    if cfg.engine.precision != "fp32":
        ds["torch_autocast"] = {"enabled": True, "dtype": PRECISION[cfg.engine.precision]}
    return ds


def build_optimizer(method, cfg: Config, world_size: int, total_steps: int, steps_per_epoch: int):
    """timm optimizer over the method's parameter groups, LR scaled by global batch / 256, warm-up + cosine."""
    o = cfg.optim
    global_batch = cfg.data.batch_size * world_size * o.accumulation_steps
    lr = o.lr * global_batch / 256 if o.scale_lr else o.lr
    extra = {"betas": o.betas} if o.name == "adamw" else {"momentum": o.momentum}
    if o.name == "lars":
        extra.update(trust_coeff=o.lars_trust, trust_clip=o.lars_clip)
    optimizer = create_optimizer_v2(method.param_groups(o.weight_decay), opt=o.name, lr=lr, weight_decay=o.weight_decay, **extra)
    warmup = min(int(o.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    # warmup_prefix: the cosine starts after the warm-up, so it lasts the remaining steps and ends at min_lr.
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps - warmup, lr_min=o.min_lr, warmup_t=warmup, warmup_lr_init=lr * 1e-3,
        warmup_prefix=True, t_in_epochs=False,
    )
    return optimizer, scheduler


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops without saving, so the last complete checkpoint stays
    the one `--resume auto` takes."""


def check_finite(step: int, values: dict[str, float]) -> None:
    bad = {k: v for k, v in values.items() if k.startswith("loss/") and not math.isfinite(v)}
    if bad:
        parts = ", ".join(f"{k}={v}" for k, v in values.items() if k.startswith("loss/"))
        raise NonFiniteLoss(f"step {step}: the loss is not finite ({parts}); nothing was saved after the last "
                            "checkpoint, which --resume auto takes (lower optim.lr, or set optim.grad_clip)")


class Meter:
    """Per logging interval: summed loss parts (device tensors, read once), steps, time waiting for data."""

    def __init__(self):
        self.first = True
        self.reset()

    def reset(self) -> None:
        self.start, self.data_wait, self.steps, self.sums = time.perf_counter(), 0.0, 0, {}

    def timed(self, loader):
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            self.data_wait += time.perf_counter() - t0
            if batch is None:
                return
            yield batch
            self.first = False

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0) + value.float()

    def summary(self, global_batch: int, accumulation: int) -> dict[str, float]:
        elapsed, micro = time.perf_counter() - self.start, self.steps * accumulation
        values = {key: value.item() / micro for key, value in self.sums.items()}  # the interval's one host sync
        values.update({
            "throughput/images_per_s": micro * global_batch / elapsed,
            "time/step_s": elapsed / self.steps,
            "time/data_wait_fraction": self.data_wait / elapsed,
        })
        self.reset()
        return values


class Logger:
    """TensorBoard scalars and a progress bar (or plain periodic lines off a terminal), on rank 0 only."""

    def __init__(self, cfg: Config, output: Path, rank: int, total_steps: int, start: int):
        self.active = rank == 0
        self.writer = SummaryWriter(str(output / "tensorboard")) if self.active else None
        self.bar = None
        if self.active and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        text = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in values.items() if not k.startswith("time/"))
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        else:
            print(f"step {step}: {text}", flush=True)

    def run_text(self, cfg: Config) -> None:
        """The command line, the git revision and the full configuration, as TensorBoard text."""
        if not self.active:
            return
        root = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True)
        self.writer.add_text("run/command", " ".join(sys.argv), 0)
        self.writer.add_text("run/git_revision", rev.stdout.strip() or "not a git checkout", 0)
        self.writer.add_text("run/config", "    " + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).replace("\n", "\n    "), 0)

    def views(self, method, views: list[torch.Tensor]) -> None:
        """The first batch's views as the method shows them (`preview`), 8 images."""
        if self.active:
            with torch.no_grad():
                grid = view_grid(method.preview(method.cfg, [v[:8] for v in views]), 8)
            self.writer.add_image("views", np.asarray(grid), 0, dataformats="HWC")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def say(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.active:
            if self.bar is not None:
                self.bar.close()
            self.writer.close()


def knn_monitor(features, cfg: Config, rank: int, world_size: int, device, device_id) -> float | None:
    """Weighted kNN top-1 (k = train.knn_k) of the validation set against the training set."""
    if not cfg.train.val_data:
        return None
    dtype = torch.bfloat16 if cfg.engine.precision == "bf16" and device.type == "cuda" else None
    feats = []
    for folder in (cfg.train.data, cfg.train.val_data):
        loader = ShardLoader(folder, cfg.data, train=False, rank=rank, world_size=world_size, device_id=device_id)
        feats.append(extract_features(features, loader, device, dtype=dtype))
    (train_x, train_y, _), (val_x, val_y, _) = feats
    k = min(cfg.train.knn_k, train_x.shape[0])
    return knn_accuracy(train_x, train_y, val_x, val_y, ks=(k,))[k]


def full_grad_norm(model: torch.nn.Module) -> torch.Tensor | None:
    """L2 norm of all gradients (before clipping), for the log."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def out_of_time(started: float, limit_minutes: float | None, device: torch.device) -> bool:
    """Rank 0's clock decides for every rank, so all stop at the same step."""
    if limit_minutes is None:
        return False
    flag = torch.tensor([time.perf_counter() - started > 60 * limit_minutes], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def encoder_states(engine, method) -> dict[str, dict]:
    """Each exported encoder's full state (gathered from ZeRO-3 partitions), by name, for rank 0 to save."""
    states = {}
    for name, encoder in method.encoders().items():
        params = list(encoder.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
            states[name] = {k: v.detach().float().cpu().clone() for k, v in encoder.state_dict().items()}
    return states


@dataclass
class ResumePlan:
    """Where a run starts: nothing, or a checkpoint with its meta and (same world size only) this rank's
    saved data position and random state."""

    path: Path | None = None
    meta: dict | None = None
    rank_state: dict | None = None

    @property
    def step(self) -> int:
        return self.meta["step"] if self.meta else 0

    @property
    def data_state(self) -> dict | None:
        return self.rank_state["data"] if self.rank_state else None


def plan_resume(cfg: Config, method, rank: int, world_size: int) -> ResumePlan:
    path = checkpoint.resolve(cfg.train.resume, Path(cfg.train.output) / "checkpoints")
    if path is None:
        return ResumePlan()
    meta = checkpoint.check_fingerprint(path, checkpoint.fingerprint(method, cfg))
    same_world = meta["world_size"] == world_size
    rank_state = json.loads(checkpoint.rank_state_file(path, rank).read_text()) if same_world else None
    return ResumePlan(path, meta, rank_state)


def build_engine(method, cfg: Config, plan: ResumePlan, rank: int, world_size: int, total_steps: int, steps_per_epoch: int):
    """The DeepSpeed engine over the method, its optimizer and schedule, with the checkpoint's state loaded
    (weights only; at another world size through DeepSpeed's universal form, or the module alone)."""
    optimizer, scheduler = build_optimizer(method, cfg, world_size, total_steps, steps_per_epoch)
    ds_config, load_from, module_only = deepspeed_config(cfg), None, False
    if plan.path is not None:
        load_from = plan.path.parent
        if plan.meta["world_size"] != world_size:
            load_from, module_only = checkpoint.plan_reshard(plan.path, cfg, rank)
            if not module_only:
                ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=method, optimizer=optimizer, config=ds_config)
    if plan.path is not None:
        checkpoint.load_engine_state(engine, plan.path, load_from, module_only,
                                     universal=bool(ds_config.get("checkpoint", {}).get("load_universal")))
        if plan.rank_state is not None:
            checkpoint.set_rng_state(plan.rank_state["rng"])
        if load_from != plan.path.parent:  # the converted copy is only needed for loading
            dist.barrier()
            if rank == 0:
                shutil.rmtree(load_from, ignore_errors=True)
    if cfg.model.compile:
        engine.compile()
    return engine, optimizer, scheduler


class Run:
    """The epoch loop of one training run: steps, logging, the kNN monitor and checkpoints."""

    def __init__(self, cfg: Config, method, engine, optimizer, scheduler, loader: ShardLoader, plan: ResumePlan,
                 rank: int, world_size: int, device: torch.device):
        self.cfg, self.method, self.engine, self.optimizer, self.scheduler = cfg, method, engine, optimizer, scheduler
        self.loader, self.plan, self.rank, self.world_size, self.device = loader, plan, rank, world_size, device
        self.steps_per_epoch = len(loader) // cfg.optim.accumulation_steps
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.step = plan.step
        self.last_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self.metrics = dict(plan.meta.get("metrics", {})) if plan.meta else {}
        self.log = Logger(cfg, Path(cfg.train.output), rank, self.last_step, self.step)
        self.meter, self.path, self.micro, self.grad_norm = Meter(), plan.path, 0, None
        self.started = time.perf_counter()

    def announce(self) -> None:
        cfg, plan, log = self.cfg, self.plan, self.log
        log.run_text(cfg)
        log.say(f"{self.world_size} rank(s) on {self.device.type}; {len(self.loader)} batches of {cfg.data.batch_size} "
                f"per rank per epoch; {self.total_steps} steps in all"
                + (f"; resumed from {plan.path} at step {self.step}" if plan.path else ""))
        if plan.path is not None and plan.rank_state is None:
            reshard = plan.meta["world_size"] != self.world_size and self.cfg.optim.name != "adamw"
            log.say(f"the checkpoint was written by {plan.meta['world_size']} rank(s): the data position restarts at an "
                    "epoch start" + ("; optimizer state restarts (only AdamW's carries over to another world size)" if reshard else ""))

    def monitor(self, when: str) -> None:
        device_id = self.device.index if self.device.type == "cuda" else None
        knn = knn_monitor(self.method.features(), self.cfg, self.rank, self.world_size, self.device, device_id)
        if knn is not None:
            self.metrics[f"knn_top1_k{self.cfg.train.knn_k}"] = knn
            self.log.scalars(self.step, {"eval/knn_top1": knn})
            self.log.say(f"kNN top-1 {when}: {knn:.2%}")

    def save(self) -> None:
        encoders = self.method.encoders()
        meta = {"world_size": self.world_size, "fingerprint": checkpoint.fingerprint(self.method, self.cfg),
                "config": self.cfg.model_dump(mode="json"), "epochs_done": self.step / self.steps_per_epoch,
                "encoders": {name: encoder_spec(encoder) for name, encoder in encoders.items()},
                # evaluation features other than one encoder's output (two encoders' features concatenated, a patch grid):
                # the export then carries features.json to rebuild them
                "own_features": not any(self.method.features() is e for e in encoders.values()),
                "metrics": self.metrics}
        self.path = checkpoint.save(self.engine, Path(self.cfg.train.output) / "checkpoints", self.step, self.rank,
                                    {"data": self.loader.state_dict()}, meta, encoder_states(self.engine, self.method),
                                    self.cfg.train.keep_checkpoints)

    def micro_step(self, views: list[torch.Tensor], indices: torch.Tensor | None = None) -> bool:
        """One forward and backward; the optimizer steps at an accumulation boundary (returns True then).
        `indices`: the samples' dataset indices, for a method whose `views.indices` asks for them."""
        if self.micro == 0:
            self.step_values = self.method.before_step(self.step)
        try:
            loss, parts = self.engine(views, **({} if indices is None else {"indices": indices}))
        except NonFiniteInput as e:  # the loss's own checks (CPU inputs) see it before the log does
            raise NonFiniteLoss(f"step {self.step + 1}: the loss is not finite ({e}); nothing was saved after the last "
                                "checkpoint, which --resume auto takes (lower optim.lr, or set optim.grad_clip)") from None
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.micro = 0 if boundary else self.micro + 1
        if boundary and (self.step + 1) % self.cfg.train.log_every == 0 and self.engine.zero_optimization_stage() == 0:
            self.grad_norm = full_grad_norm(self.method)  # ZeRO 1-3 compute the norm themselves
        if boundary:
            self.scheduler.step_update(self.step + 1)
        self.engine.step()
        self.meter.add({"loss/total": loss.detach(), **parts})
        return boundary

    def log_step(self, extra: dict[str, float]) -> None:
        values = self.meter.summary(self.cfg.data.batch_size * self.world_size, self.cfg.optim.accumulation_steps)
        values.update(lr=self.optimizer.param_groups[0]["lr"], **extra)
        if self.engine.zero_optimization_stage() > 0:
            self.grad_norm = self.engine.get_global_grad_norm()
        if self.grad_norm is not None:
            values["grad_norm"] = float(self.grad_norm)
        if self.device.type == "cuda":
            values["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log.scalars(self.step, values)
        check_finite(self.step, values)

    def epoch(self) -> None:
        """The rest of one epoch (all of it unless resumed in the middle), or up to the last step."""
        cfg, loader = self.cfg, self.loader
        if loader.step in (0, loader.steps_per_epoch):  # a fresh epoch, not one resumed in the middle
            epoch_values = self.method.start_epoch(loader.epoch + (loader.step > 0))
            if epoch_values:
                self.log.scalars(self.step, epoch_values)
        for batch in self.meter.timed(loader):
            views = [v.to(self.device, non_blocking=True) for v in batch.views]
            indices = batch.indices.to(self.device, non_blocking=True) if self.method.views.indices else None
            if self.meter.first:
                self.log.views(self.method, views)
            if not self.micro_step(views, indices):
                continue
            self.step += 1
            extra = {**self.step_values, **self.method.after_step(self.step / self.total_steps)}
            self.meter.steps += 1
            self.log.advance()
            at_log = self.step % cfg.train.log_every == 0
            if at_log and out_of_time(self.started, cfg.train.time_limit_minutes, self.device):
                self.last_step = self.step
            if at_log or self.step == self.last_step:
                self.log_step(extra)
            if self.step % cfg.train.checkpoint_every == 0 and self.step < self.last_step:
                self.save()
            if self.step == self.last_step:
                return
        if cfg.train.knn_every and (loader.epoch + 1) % cfg.train.knn_every == 0 and self.step < self.last_step:
            self.monitor(f"after epoch {loader.epoch + 1}")

    def run(self) -> Path:
        self.announce()
        output, start_step = Path(self.cfg.train.output), self.step
        if self.step == 0:
            self.monitor("before training")
        while self.step < self.last_step:
            self.epoch()
        if self.step > start_step:  # a run resumed at its end has nothing new to save
            self.monitor("after training")
            self.save()
        if self.rank == 0:
            checkpoint.export_encoders(self.path, output / "backbone")
        self.log.say(f"checkpoint: {self.path}\nbackbone for timm: {output / 'backbone'}\ntensorboard: {output / 'tensorboard'}")
        self.log.close()
        return self.path


def train(cfg: Config) -> Path:
    cfg.check(int(os.environ.get("WORLD_SIZE", 1)))  # before any process group forms
    rank, world_size, local_rank, device = init_distributed()
    torch.manual_seed(cfg.train.seed + rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    method = build_method(cfg)
    method.set_data_size(read_manifest(cfg.train.data).num_samples)  # before the fingerprint and the engine
    if cfg.method.batch_norm == "sync" and world_size > 1:  # every method's setting (MethodConfig)
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    plan = plan_resume(cfg, method, rank, world_size)
    device_id = local_rank if device.type == "cuda" else None
    loader = ShardLoader(cfg.train.data, cfg.data, rank=rank, world_size=world_size, device_id=device_id, state=plan.data_state)
    batches = batches_per_epoch(cfg.train.data, loader.manifest.num_samples, cfg.data.batch_size, world_size, cfg.optim.accumulation_steps)
    steps_per_epoch = batches // cfg.optim.accumulation_steps
    engine, optimizer, scheduler = build_engine(method, cfg, plan, rank, world_size, cfg.train.epochs * steps_per_epoch, steps_per_epoch)
    return Run(cfg, method, engine, optimizer, scheduler, loader, plan, rank, world_size, device).run()
