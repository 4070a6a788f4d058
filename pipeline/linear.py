"""The standard linear evaluation behind `python launch/linear.py --backbone local-dir:DIR|CHECKPOINT --train SHARDS --val SHARDS`

A linear classifier on a frozen backbone, trained on augmented views: the number that stands beside a
published linear top-1 (launch/evaluate.py's feature probe trains on fixed, unaugmented features and does not).

- Backbone. Loaded as evaluation loads it (`pipeline.frozen.load_backbone`), frozen and in eval mode for
  the whole run: no gradient, and BatchNorm keeps its running statistics (in train mode it would revise
  them, and those are part of the pretrained model; MoCo v3's main_lincls does the same). It runs outside
  the DeepSpeed engine, under no_grad (bf16 autocast on a GPU); only the classifier is the engine's.
- Classifier. One Linear layer, weights drawn from N(0, 0.01²) with `seed`, bias 0 (main_lincls).
- Data. The project's DALI `ShardLoader`: random resized crop (area 0.08-1, aspect 3/4-4/3) + horizontal
  flip, no colour change, at the backbone's input size and normalisation; validation resizes the shorter
  side and takes the centre crop (see the presets). `batch_size` is the global batch, split over the ranks.
- Optimisation. SGD with momentum 0.9 (not Nesterov), lr = base lr x batch / 256, cosine decay per epoch
  (epoch e of E runs at lr·(1 + cos(πe/E))/2, as main_lincls's `adjust_learning_rate`), no weight decay.
- Presets (`--preset`; `auto` picks cifar for inputs of 64 px or less, else imagenet):
  imagenet: MoCo v3 main_lincls / CONFIG.md (facebookresearch/moco-v3): 90 epochs, batch 1024, base lr 0.1
    (3.0 for ViTs, CONFIG.md), validation resize to size / crop_pct (256 for 224) and centre crop.
  cifar: solo-learn's linear evaluation (vturrisi/solo-learn, scripts/linear, solo/data/classification_dataloader.py):
    100 epochs, batch 256, base lr 0.1, the crop at the image size (32); validation sees the image as it
    is (resize to the crop size, so a 32 px image is untouched). Deviation: solo-learn decays the lr in
    steps (x0.1 at epochs 60 and 80); we keep the cosine, as the protocol above. Its scripts set the lr per
    method (0.1-1.0): give `--lr` to match one.
- Result. Top-1 and top-5 on the validation shards (and balanced accuracy), once at the end; with
  `eval_every`, also every that many epochs for the log.
- Runs on one process or many (`deepspeed launch/linear.py ...`, or torchrun): NCCL on GPUs, gloo on
  the CPU; ZeRO 0 (a linear layer needs no sharding): gradients are averaged over the ranks, so W ranks of
  batch B/W step as one process of batch B would.
- Checkpoints (pipeline.checkpoint: staged, hashed, weights-only loading) at the end of every epoch and
  every `checkpoint_every` steps hold the classifier, its optimizer, each rank's data position and random
  state; `resume="auto"` continues from the newest intact one exactly as the run would have gone on (same
  world size; the data position is per rank). A checkpoint of another backbone, class list or protocol
  setting is refused. TensorBoard scalars and a tqdm bar (pipeline.train's Logger) under `output`.
- Output: `output/classifier.safetensors` (weight, bias) and `output/result.json`, the returned result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from timm.scheduler import CosineLRScheduler
from torch import nn

from data_shards.shards import shared_class_names
from pipeline import checkpoint
from pipeline.checkpoint import CheckpointError
from pipeline.config import DataConfig, ViewRecipe
from pipeline.data.loader import ShardLoader
from pipeline.eval import balanced_accuracy, extract_features, top1_accuracy
from pipeline.frozen import eval_data_config, load_backbone
from pipeline.train import Logger, Meter, check_finite, init_distributed

CIFAR_MAX_SIZE = 64  # `auto`: inputs up to this size get the cifar preset


@dataclass(frozen=True)
class Protocol:
    """Every setting of one linear evaluation (the module docstring gives the sources)."""

    preset: Literal["imagenet", "cifar"]
    epochs: int
    batch_size: int  # global, over all ranks
    base_lr: float  # per 256 images
    momentum: float = 0.9
    weight_decay: float = 0.0
    scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and aspect ratio
    flip: float = 0.5
    seed: int = 0  # classifier initialisation and augmentation

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256


PRESETS = {
    "imagenet": Protocol(preset="imagenet", epochs=90, batch_size=1024, base_lr=0.1),
    "cifar": Protocol(preset="cifar", epochs=100, batch_size=256, base_lr=0.1),
}
VIT_BASE_LR = 3.0  # MoCo v3 CONFIG.md: ViT-S and ViT-B linear classification use --lr=3


def protocol_for(preset: str, backbone: nn.Module, **overrides) -> Protocol:
    """The preset's protocol for `backbone` (`auto`: by its input size; ViTs get MoCo v3's ViT lr on
    imagenet), with `overrides` (None values ignored)."""
    size = eval_data_config(backbone, 1).eval_size
    name = ("cifar" if size <= CIFAR_MAX_SIZE else "imagenet") if preset == "auto" else preset
    if name not in PRESETS:
        raise ValueError(f"preset must be auto or one of {sorted(PRESETS)}, got {preset!r}")
    protocol = PRESETS[name]
    if name == "imagenet" and isinstance(backbone, VisionTransformer):
        protocol = dataclasses.replace(protocol, base_lr=VIT_BASE_LR)
    return dataclasses.replace(protocol, **{k: v for k, v in overrides.items() if v is not None})


def data_config(backbone: nn.Module, protocol: Protocol, per_rank_batch: int) -> DataConfig:
    """The training view (crop + flip at the backbone's size and normalisation) and the validation crop."""
    found = eval_data_config(backbone, per_rank_batch)
    first = found.view_recipes()[0]
    view = ViewRecipe(size=first.size, scale=protocol.scale, ratio=protocol.ratio, flip=protocol.flip,
                      color_jitter=None, grayscale=0.0, mean=first.mean, std=first.std)
    resize = found.eval_size if protocol.preset == "cifar" else found.eval_resize
    return DataConfig(views=[view], batch_size=per_rank_batch, eval_size=found.eval_size, eval_resize=resize,
                      seed=protocol.seed)


def init_classifier(dim: int, num_classes: int, seed: int) -> nn.Linear:
    classifier = nn.Linear(dim, num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        classifier.bias.zero_()
    return classifier


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names, shapes, dtypes, values): which backbone a checkpoint was for."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_resumable(path: Path, meta: dict, expected: dict, world_size: int) -> None:
    found = meta["fingerprint"]
    for key in expected:
        if found.get(key) != expected[key]:
            raise CheckpointError(f"{path}: written by a linear evaluation with another {key} "
                                  f"({found.get(key)!r}, this run has {expected[key]!r}): use another output folder or resume=never")
    if meta.get("world_size") != world_size:
        raise CheckpointError(f"{path}: written by {meta.get('world_size')} rank(s); resume it with as many "
                              f"(the data position is per rank), this run has {world_size}")


@torch.no_grad()
def evaluate(backbone: nn.Module, classifier: nn.Module, loader: ShardLoader, device, dtype, num_classes: int) -> dict:
    """Top-1, top-5 and balanced accuracy of every validation image (each counted once, over all ranks).
    `extract_features` L2-normalises each row of logits: a positive scale leaves their ranking as it is."""
    logits, labels, _ = extract_features(nn.Sequential(backbone, classifier), loader, device, dtype=dtype)
    top = logits.topk(min(5, num_classes), dim=1).indices
    predictions = top[:, 0]
    return {
        "balanced": balanced_accuracy(predictions, labels, num_classes),
        "top1": top1_accuracy(predictions, labels),
        "top5": (top == labels[:, None]).any(1).double().mean().item(),
    }


def linear_eval(
    backbone_spec: str,
    train: str | Path,
    val: str | Path,
    *,
    preset: str = "auto",
    overrides: dict | None = None,
    output: str | Path = "runs/linear",
    resume: str = "auto",
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    eval_every: int = 0,
    log_every: int = 20,
) -> dict:
    """Run the preset's protocol for this backbone, with `overrides` of its settings (Protocol's fields), and
    return the result; collective over the launcher's ranks. Bad input raises CheckpointError, ShardError,
    OSError or ValueError naming the file; a backbone or shard set that cannot be used does so before any
    process group forms."""
    started = time.perf_counter()
    backbone = load_backbone(backbone_spec)
    class_names = shared_class_names(train, val)
    num_classes = len(class_names)
    protocol = protocol_for(preset, backbone, **(overrides or {}))
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    if protocol.batch_size % ranks:
        raise ValueError(f"the batch of {protocol.batch_size} images does not split evenly over {ranks} ranks")

    rank, world_size, local_rank, device = init_distributed()
    device_id = local_rank if device.type == "cuda" else None
    dtype = torch.bfloat16 if device.type == "cuda" else None
    output = Path(output)
    cfg = data_config(backbone, protocol, protocol.batch_size // world_size)
    backbone.requires_grad_(False).eval().to(device)
    with torch.no_grad():
        dim = backbone(torch.zeros(2, 3, cfg.eval_size, cfg.eval_size, device=device)).shape[1]
    classifier = init_classifier(dim, num_classes, protocol.seed)

    fingerprint = {"protocol": "linear", "backbone": state_digest(backbone), "classes": class_names,
                   "settings": json.loads(json.dumps(dataclasses.asdict(protocol)))}
    ckpt_dir = output / "checkpoints"
    resume_from = checkpoint.resolve(resume, ckpt_dir)
    saved = None
    if resume_from is not None:
        meta = checkpoint.read_meta(resume_from)
        check_resumable(resume_from, meta, fingerprint, world_size)
        saved = json.loads(checkpoint.rank_state_file(resume_from, rank).read_text())

    loader = ShardLoader(train, cfg, train=True, rank=rank, world_size=world_size, device_id=device_id,
                         state=saved["data"] if saved else None)
    val_loader = ShardLoader(val, cfg, train=False, rank=rank, world_size=world_size, device_id=device_id)
    steps_per_epoch = len(loader)
    total_steps = protocol.epochs * steps_per_epoch

    optimizer = torch.optim.SGD(classifier.parameters(), lr=protocol.lr, momentum=protocol.momentum,
                                weight_decay=protocol.weight_decay)
    schedule = CosineLRScheduler(optimizer, t_initial=protocol.epochs, lr_min=0.0, t_in_epochs=True)
    ds_config = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=classifier, optimizer=optimizer, config=ds_config)
    step = 0
    if resume_from is not None:
        checkpoint.load_engine_state(engine, resume_from, resume_from.parent, module_only=False, universal=False)
        checkpoint.set_rng_state(saved["rng"])
        step = meta["step"]

    log = Logger(None, output, rank, total_steps, step)
    log.say(f"linear evaluation ({protocol.preset} preset): {world_size} rank(s) on {device.type}, {steps_per_epoch} "
            f"steps of {protocol.batch_size} per epoch, {protocol.epochs} epochs, lr {protocol.lr:g}"
            + (f"; resumed from {resume_from} at step {step}" if resume_from else ""))

    def save() -> None:
        meta_out = {"world_size": world_size, "fingerprint": fingerprint, "epochs_done": step / steps_per_epoch}
        checkpoint.save(engine, ckpt_dir, step, rank, {"data": loader.state_dict()}, meta_out, None, keep_checkpoints)

    def validate() -> dict:
        scores = evaluate(backbone, engine.module, val_loader, device, dtype, num_classes)
        log.scalars(step, {f"val/{k}": v for k, v in scores.items()})
        return scores

    meter = Meter()
    while step < total_steps:
        epoch = step // steps_per_epoch
        schedule.step(epoch)
        for batch in meter.timed(loader):  # the rest of one epoch
            images = batch.views[0].to(device, non_blocking=True)
            labels = batch.labels.to(device, non_blocking=True)
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                features = backbone(images)
            logits = engine(features.float())
            loss = F.cross_entropy(logits, labels)
            engine.backward(loss)
            engine.step()
            step += 1
            meter.steps += 1
            meter.add({"loss/train": loss.detach(), "train/top1": (logits.detach().argmax(1) == labels).float().mean()})
            log.advance()
            if step % log_every == 0 or step % steps_per_epoch == 0:
                values = {**meter.summary(protocol.batch_size, 1), "lr": optimizer.param_groups[0]["lr"]}
                log.scalars(step, values)
                check_finite(step, values)
            if checkpoint_every and step % checkpoint_every == 0 and step % steps_per_epoch:
                save()
        save()
        if eval_every and (epoch + 1) % eval_every == 0 and step < total_steps:
            validate()

    scores = validate()
    result = {
        "backbone": backbone_spec, "protocol": dataclasses.asdict(protocol), "lr": protocol.lr,
        "world_size": world_size, "train_images": loader.manifest.num_samples,
        "val_images": val_loader.manifest.num_samples, "steps": step,
        "seconds": round(time.perf_counter() - started, 2), **scores,
    }
    result["top1"], result["top5"] = result.pop("top1"), result.pop("top5")  # last, for a reader of the tail
    if rank == 0:
        state = {k: v.detach().float().cpu().contiguous() for k, v in engine.module.state_dict().items()}
        save_file(state, str(output / "classifier.safetensors"))
        (output / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    log.say(f"top-1 {scores['top1']:.2%}, top-5 {scores['top5']:.2%}; classifier: {output / 'classifier.safetensors'}")
    log.close()
    if dist.is_initialized():
        dist.barrier()
    return result
