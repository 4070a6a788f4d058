"""Projector and predictor heads."""

from __future__ import annotations

import torch.nn as nn

from pipeline.config import HeadConfig


class ScaleBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm that scales but does not shift (SimCLR's output layer: center=False)."""

    def __init__(self, features: int):
        super().__init__(features)
        self.register_parameter("bias", None)

    def reset_parameters(self):
        self.reset_running_stats()
        nn.init.ones_(self.weight)


def output_norm(features: int, kind: str) -> nn.Module:
    if kind == "scale":
        return ScaleBatchNorm1d(features)
    return nn.BatchNorm1d(features, affine=kind == "affine")


def mlp_head(in_dim: int, cfg: HeadConfig) -> nn.Sequential:
    """Linear layers with (BatchNorm +) ReLU between them and the output BatchNorm `cfg.last_bn`; Linear
    weights N(0, init_std²) and zero biases when `cfg.init_std` is set, else PyTorch's init."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [cfg.hidden_dim] * (cfg.layers - 1) + [cfg.out_dim]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == cfg.layers - 1
        norm = (cfg.last_bn != "none") if last else cfg.hidden_bn
        layers.append(nn.Linear(d_in, d_out, bias=cfg.bias and not norm))
        if cfg.init_std is not None:
            nn.init.normal_(layers[-1].weight, std=cfg.init_std)
            if layers[-1].bias is not None:
                nn.init.zeros_(layers[-1].bias)
        if norm:
            layers.append(output_norm(d_out, cfg.last_bn) if last else nn.BatchNorm1d(d_out))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
