"""The feature probe: a linear classifier trained on frozen, precomputed, unaugmented features. A fast check
of a backbone, not the standard linear evaluation that papers report (pipeline/linear.py trains on
augmented views with the protocol's schedule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.eval.metrics import top1_accuracy

DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.1}


@dataclass
class LinearProbe:
    accuracy: float  # top-1 on the validation features
    predictions: torch.Tensor  # [N_val] predicted classes
    head: nn.Module  # [optional BatchNorm1d without affine] + Linear, in eval mode


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 30,
    batch_size: int = 1024,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    lr: float | None = None,
    weight_decay: float = 0.0,
    batch_norm: bool = True,
    seed: int = 0,
) -> LinearProbe:
    """Cross-entropy training over shuffled mini-batches with a cosine learning-rate decay to zero.

    Runs on the features' device. The layer starts at zero and `seed` drives only the shuffling, so a
    run is reproducible without touching the global RNG. `batch_norm` puts a BatchNorm without affine
    parameters in front (as MoCo v3 and MAE do): it standardises features whose scale the backbone
    chose, so one learning rate suits every backbone. `lr` defaults to DEFAULT_LR[optimizer]. Features
    are fixed (no augmentation), so a few tens of epochs converge and longer runs start to overfit.
    """
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"optimizer must be one of {sorted(DEFAULT_LR)}, got {optimizer!r}")
    device = train_features.device
    train_labels = train_labels.to(device)
    if train_labels.min() < 0:
        raise ValueError("training labels must be class indices >= 0 (the set has unlabeled samples, label -1)")
    num_classes = num_classes or int(train_labels.max()) + 1
    n, dim = train_features.shape
    features = train_features.float()

    linear = nn.Linear(dim, num_classes)
    nn.init.zeros_(linear.weight)  # the loss is convex in the layer: no random start needed
    nn.init.zeros_(linear.bias)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), linear) if batch_norm else nn.Sequential(linear)
    head.to(device).train()

    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if optimizer == "adamw":
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    # Whole batches only (a size-1 remainder would break BatchNorm); each shuffle leaves out different rows.
    # Small sets get smaller batches: at least ~10 steps per epoch, or the probe would barely train.
    batch_size = min(batch_size, max(2, n // 10))
    steps = n // batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    generator = torch.Generator().manual_seed(seed)

    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)[: steps * batch_size].to(device)
        for rows in order.view(steps, batch_size):
            loss = F.cross_entropy(head(features[rows]), train_labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()

    head.eval()
    with torch.no_grad():
        predictions = torch.cat([head(x.float()).argmax(1) for x in val_features.to(device).split(batch_size)])
    return LinearProbe(top1_accuracy(predictions, val_labels.to(device)), predictions, head)
