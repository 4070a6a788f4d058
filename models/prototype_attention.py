"""Attention over prototypes (FeatMatch's feature augmentation, AugF): refines features [..., D] by
multi-head attention over prototypes [P, D]; output shape = input shape, in residual form
gₓ = relu(fₓ + φᵣ(fₐ)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrototypeAttention(nn.Module):
    """FeatMatch's AugF: refine features fₓ [..., dim] by attention over prototypes fₚ [P, dim].

    Per head h (the embedding φₑ is shared by features and prototypes):
        eₓ = φₑ(fₓ)ₕ, eₚ = φₑ(fₚ)ₕ                         (head_dim each)
        w = softmax(scale · eₓ·eₚᵀ) over the P prototypes   (scale = 1/√head_dim by default)
        fₐₕ = relu(φₐₕ([eₓ, Σₚ w·eₚ]))                       (2·head_dim -> head_dim, own weights per head)
    and for all heads together
        gₓ = relu(fₓ + φᵣ([fₐ₁, ..., fₐ_H]))                 (heads·head_dim -> dim)
    The output has the input's shape. `final_relu=False` drops the outer relu (gₓ = fₓ + φᵣ(fₐ)), for
    features that may be negative (projector outputs in contrastive pretraining). `zero_init=True` starts
    φᵣ at zero, so that the module starts as relu(fₓ) (or the identity without the final relu): a
    pretrained backbone's features reach the classifier unchanged until AugF has learned something.
    `forward(..., return_weights=True)` also returns the attention weights [..., heads, P].
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int | None = None,
        *,
        scale: float | None = None,
        dropout: float = 0.0,
        final_relu: bool = True,
        zero_init: bool = False,
    ):
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        head_dim = head_dim or max(1, dim // heads)
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.final_relu = final_relu
        self.embed = nn.Linear(dim, heads * head_dim)  # φₑ
        # φₐ: one Linear(2·head_dim -> head_dim) per head, held as one batched weight.
        self.aggregate_weight = nn.Parameter(torch.empty(heads, 2 * head_dim, head_dim))
        self.aggregate_bias = nn.Parameter(torch.empty(heads, head_dim))
        self.residual = nn.Linear(heads * head_dim, dim)  # φᵣ
        self.dropout = nn.Dropout(dropout)
        self.reset_aggregate()
        if zero_init:
            nn.init.zeros_(self.residual.weight)
            nn.init.zeros_(self.residual.bias)

    def reset_aggregate(self) -> None:
        """nn.Linear's default initialisation, per head."""
        bound = 1.0 / math.sqrt(2 * self.head_dim)
        nn.init.uniform_(self.aggregate_weight, -bound, bound)
        nn.init.uniform_(self.aggregate_bias, -bound, bound)

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor, return_weights: bool = False):
        if features.shape[-1] != self.dim or prototypes.ndim != 2 or prototypes.shape[1] != self.dim:
            raise ValueError(
                f"expected features [..., {self.dim}] and prototypes [P, {self.dim}], "
                f"got {tuple(features.shape)} and {tuple(prototypes.shape)}"
            )
        if prototypes.shape[0] == 0:
            raise ValueError("no prototypes to attend to")
        lead = features.shape[:-1]
        fx = features.reshape(-1, self.dim)
        h, d = self.heads, self.head_dim
        ex = self.embed(fx).view(-1, h, d)  # [B, H, d]
        ep = self.embed(prototypes.to(fx.dtype)).view(-1, h, d)  # [P, H, d]
        logits = torch.einsum("bhd,phd->bhp", ex, ep) * self.scale
        weights = self.dropout(logits.softmax(dim=-1))  # [B, H, P]
        attended = torch.einsum("bhp,phd->bhd", weights, ep)
        joined = torch.cat([ex, attended], dim=-1)  # [B, H, 2d]
        fa = F.relu(torch.einsum("bhi,hio->bho", joined, self.aggregate_weight.to(joined.dtype)) + self.aggregate_bias.to(joined.dtype))
        out = fx + self.residual(fa.reshape(-1, h * d))
        if self.final_relu:
            out = F.relu(out)
        out = out.reshape(*lead, self.dim)
        if return_weights:
            return out, weights.reshape(*lead, h, -1)
        return out
