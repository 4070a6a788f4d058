"""Projector and predictor heads."""

from __future__ import annotations

import torch.nn as nn

from pipeline.config import HeadConfig


def mlp_head(in_dim: int, cfg: HeadConfig) -> nn.Sequential:
    """Linear layers with BatchNorm + ReLU between them; an affine-free BatchNorm on the output if `last_bn`."""
    layers: list[nn.Module] = []
    dims = [in_dim] + [cfg.hidden_dim] * (cfg.layers - 1) + [cfg.out_dim]
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == cfg.layers - 1
        layers.append(nn.Linear(d_in, d_out, bias=last and not cfg.last_bn))
        if not last:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif cfg.last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)
