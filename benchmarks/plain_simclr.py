"""SimCLR written as a plain PyTorch loop: the reference the project's main job is measured against.

Everything the method, the engine and the schedules do is written out here by hand from the recipe's
values: a timm backbone, SimCLR's projector (BatchNorm after every layer, the output included), NT-Xent
over both views with each row's own similarity masked, torch's AdamW without weight decay on norms and
biases, linear warm-up then cosine, bf16 autocast. Only the data (`ShardLoader`) and the kNN measurement
are the project's, so a difference in learning points at the method and the loop, not the data.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config  # noqa: E402
from pipeline.data.loader import ShardLoader  # noqa: E402
from pipeline.eval import extract_features, knn_accuracy  # noqa: E402

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEVICE_ID = 0 if DEVICE.type == "cuda" else None


def simclr_model(cfg: Config) -> nn.Sequential:
    """timm backbone, then Linear-BN-ReLU (hidden layers) and Linear-BN (output)."""
    head = cfg.model.projector
    backbone = timm.create_model(cfg.model.backbone, num_classes=0)
    dims = [backbone.num_features] + [head.hidden_dim] * (head.layers - 1) + [head.out_dim]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out)]
        if i < head.layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(backbone, nn.Sequential(*layers))


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """z: [2B, D], the first view's rows then the second's. The textbook form: dense logits, cross-entropy."""
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0] // 2
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n) + n, torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def learning_rate(cfg: Config, step: int, total: int, warmup: int) -> float:
    """LR of optimizer step `step` (1-based): linear warm-up from lr/1000, then cosine to min_lr at the end."""
    o = cfg.optim
    peak = o.lr * cfg.data.batch_size / 256 if o.scale_lr else o.lr
    if step < warmup:
        return peak * 1e-3 + step * (peak - peak * 1e-3) / warmup
    return o.min_lr + 0.5 * (peak - o.min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def scheduled_batches(cfg: Config, loader, model: nn.Module, optimizer, max_steps: int | None = None):
    """The loader's batches epoch after epoch, `model` in train mode, every group's LR set for the step:
    yields (step, total steps, batch), step 1-based, until `max_steps` or the end of training."""
    steps_per_epoch = len(loader)
    total = cfg.train.epochs * steps_per_epoch
    warmup = min(int(cfg.optim.warmup_epochs * steps_per_epoch), total - 1)
    last, step = min(total, max_steps or total), 0
    while True:
        model.train()
        for batch in loader:
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, total, warmup)
            yield step, total, batch
            if step == last:
                return


def knn_top1(backbone: nn.Module, cfg: Config) -> float:
    feats = [extract_features(backbone, ShardLoader(folder, cfg.data, train=False, device_id=DEVICE_ID), DEVICE)
             for folder in (cfg.train.data, cfg.train.val_data)]
    (train_x, train_y, _), (val_x, val_y, _) = feats
    return knn_accuracy(train_x, train_y, val_x, val_y, ks=(cfg.train.knn_k,))[cfg.train.knn_k]


def train_plain(cfg: Config, model: nn.Sequential, max_steps: int | None = None, evaluate: bool = True) -> dict:
    """Train `model` (from `simclr_model`) on cfg.train.data; returns per-step losses and the final kNN."""
    if cfg.optim.name != "adamw" or cfg.method.name != "simclr" or cfg.optim.accumulation_steps != 1:
        raise ValueError("the plain reference is SimCLR with AdamW and no gradient accumulation")
    loader = ShardLoader(cfg.train.data, cfg.data, device_id=DEVICE_ID)
    model = model.to(DEVICE)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=0.0, betas=cfg.optim.betas)
    dtype = AUTOCAST.get(cfg.engine.precision)
    losses = []
    for _, _, batch in scheduled_batches(cfg, loader, model, optimizer, max_steps):
        views = torch.cat(batch.views).to(DEVICE)
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
            loss = nt_xent(model(views), cfg.method.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # a host sync per step: fine for a reference
    return {"losses": losses, "knn": knn_top1(model[0], cfg) if evaluate else None}
