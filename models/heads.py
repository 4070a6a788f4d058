"""Projector and predictor heads."""

from __future__ import annotations

import torch.nn as nn

from pipeline.config import HeadConfig


def mlp_head(in_dim: int, cfg: HeadConfig) -> nn.Sequential:
    """Linear layers with (BatchNorm +) ReLU between them and the output BatchNorm `cfg.last_bn`."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [cfg.hidden_dim] * (cfg.layers - 1) + [cfg.out_dim]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == cfg.layers - 1
        norm = (cfg.last_bn != "none") if last else cfg.hidden_bn
        layers.append(nn.Linear(d_in, d_out, bias=cfg.bias and not norm))
        if norm:
            layers.append(nn.BatchNorm1d(d_out, affine=not (last and cfg.last_bn == "no_affine")))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
