"""MoCo v3 (ResNet) written as a plain PyTorch loop: the reference its method module is measured against.

Written out by hand from the definitions (facebookresearch/moco-v3's builder and main loop; solo-learn's
LARS): a timm ResNet (the CIFAR stem when the recipe asks), the projector Linear-BN-ReLU-Linear-BN(no
affine) and the predictor Linear-BN-ReLU-Linear without biases, a momentum copy of backbone and projector
moved by EMA after every step on MoCo v3's cosine schedule, the symmetric loss 2τ·CE(q₁·k₂ᵀ/τ) +
2τ·CE(q₂·k₁ᵀ/τ), and LARS with its trust ratio clipped at the global LR (LARC), norms and biases neither
decayed nor adapted. Only the data (`ShardLoader`) and the kNN measurement are the project's.

    python benchmarks/plain_mocov3.py [--epochs 25] [--batch-size 128] [--seed 0] [--set KEY=VALUE ...]

trains `mocov3_resnet18_cifar.yaml` on the embedded digits and prints the loss of every epoch and the kNN.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.plain_simclr import AUTOCAST, DEVICE, DEVICE_ID, knn_top1, scheduled_batches  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data.loader import ShardLoader  # noqa: E402


def mlp(dims: list[int], last_bn: bool) -> nn.Sequential:
    """moco-v3's `_build_mlp`: Linear (no bias), then BN + ReLU between layers, BN(affine=False) last if asked."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def mocov3_model(cfg: Config) -> nn.ModuleDict:
    """{"online": backbone + projector, "predictor", "momentum": a frozen copy of online}."""
    m = cfg.model
    backbone = timm.create_model(m.backbone, num_classes=0, **m.backbone_args)
    if m.cifar_stem:
        backbone.conv1 = nn.Conv2d(3, backbone.conv1.out_channels, 3, 1, 1, bias=False)
        backbone.maxpool = nn.Identity()
    p, q = m.projector, m.predictor
    projector = mlp([backbone.num_features] + [p.hidden_dim] * (p.layers - 1) + [p.out_dim], last_bn=True)
    predictor = mlp([p.out_dim] + [q.hidden_dim] * (q.layers - 1) + [q.out_dim], last_bn=False)
    online = nn.Sequential(backbone, projector)
    return nn.ModuleDict({"online": online, "predictor": predictor,
                          "momentum": copy.deepcopy(online).requires_grad_(False)})


def contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.T / temperature
    return 2 * temperature * F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step of each decayed tensor is scaled by eta·‖w‖ / (‖g‖ + wd·‖w‖), that
    ratio clipped at 1 / lr when `clip` (the adapted LR never exceeds the global one); weight decay added
    to the gradient before the scaling. Groups with weight_decay 0 (norms, biases) are plain SGD."""

    def __init__(self, params, lr, momentum, weight_decay, eta, clip):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["weight_decay"] != 0:
                    w_norm, g_norm = p.norm(), d.norm()
                    ratio = g["eta"] * w_norm / (g_norm + g["weight_decay"] * w_norm)
                    if w_norm == 0 or g_norm == 0:
                        ratio = torch.ones_like(ratio)
                    if g["clip"]:
                        ratio = torch.clamp(ratio / g["lr"], max=1.0)
                    d = (d + g["weight_decay"] * p) * ratio
                state = self.state[p]
                buf = state.setdefault("momentum", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.sub_(g["lr"] * buf)


def train_plain(cfg: Config, model: nn.ModuleDict, max_steps: int | None = None, evaluate: bool = True) -> dict:
    """Train `model` (from `mocov3_model`) on cfg.train.data; returns per-step losses and the final kNN."""
    o = cfg.optim
    if o.name != "lars" or cfg.method.name != "mocov3" or o.accumulation_steps != 1 or not o.no_decay_norm_bias:
        raise ValueError("the plain reference is MoCo v3 with LARS, timm's no-decay groups and no gradient accumulation")
    loader = ShardLoader(cfg.train.data, cfg.data, device_id=DEVICE_ID)
    model = model.to(DEVICE)
    online, predictor, momentum_encoder = model["online"], model["predictor"], model["momentum"]
    trained = [p for m in (online, predictor) for p in m.parameters()]
    optimizer = LARS([{"params": [p for p in trained if p.ndim > 1], "weight_decay": o.weight_decay},
                      {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}],
                     lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.lars_trust, clip=o.lars_clip)
    dtype, tau = AUTOCAST.get(cfg.engine.precision), cfg.method.temperature
    losses = []
    for step, total, batch in scheduled_batches(cfg, loader, model, optimizer, max_steps):
        x1, x2 = (v.to(DEVICE) for v in batch.views)
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
            q1, q2 = predictor(online(x1)), predictor(online(x2))
            with torch.no_grad():
                k1, k2 = momentum_encoder(x1), momentum_encoder(x2)
            loss = contrastive(q1, k2, tau) + contrastive(q2, k1, tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        m = 1 - (1 - cfg.method.momentum) * (math.cos(math.pi * step / total) + 1) / 2
        if cfg.method.momentum_schedule == "constant":
            m = cfg.method.momentum
        with torch.no_grad():
            for pk, po in zip(momentum_encoder.parameters(), online.parameters()):
                pk.mul_(m).add_(po, alpha=1 - m)
        losses.append(loss.item())  # a host sync per step: fine for a reference
    return {"losses": losses, "knn": knn_top1(online[0], cfg) if evaluate else None}


def main(argv=None) -> int:
    import pipeline.methods  # noqa: F401  (registers the methods load_config validates against)
    from pipeline.config import load_config

    p = argparse.ArgumentParser(prog="benchmarks/plain_mocov3.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "launch" / "configs" / "mocov3_resnet18_cifar.yaml"))
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    sample = ROOT / "data" / "sample"
    cfg = load_config(args.config, [f"train.data={sample / 'train'}", f"train.val_data={sample / 'val'}",
                                    f"train.epochs={args.epochs}", f"data.batch_size={args.batch_size}",
                                    f"train.seed={args.seed}", *args.set])
    torch.manual_seed(args.seed)
    result = train_plain(cfg, mocov3_model(cfg))
    per_epoch = len(result["losses"]) // args.epochs
    epochs = [sum(result["losses"][i:i + per_epoch]) / per_epoch for i in range(0, per_epoch * args.epochs, per_epoch)]
    print(json.dumps({"epoch_losses": [round(x, 4) for x in epochs], "knn": result["knn"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
