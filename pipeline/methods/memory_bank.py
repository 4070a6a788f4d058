"""CMC's memory bank (HobbitLong/CMC, NCE/NCEAverage.py, softmax path): one row per training sample and
view, indexed by the sample's dataset index.

- Rows start uniform in [-s, s], s = 1/sqrt(D/3) (each coordinate's variance 1/D, so a row's norm is about
  1), not normalised, the same on every rank (seeded).
- Scores of a query q_i of view a against view b's rows: the positive is b's row of the query's own sample
  y_i (as read before this step's update, not the current key), then K rows drawn uniformly from all N
  with replacement (the sample itself not excluded, as the code's AliasMethod over uniform weights); one
  draw of indices per step, shared by every pair of views. Loss: cross-entropy with the positive first
  at temperature T (NCESoftmaxLoss), the mean over this rank's rows.
- After the loss: row y of every view <- normalize(m·row + (1 − m)·f) with f the view's current feature,
  for the samples of the global batch (indices and features gathered), so every rank's bank stays the
  same.

Draws are seeded by (train.seed, optimizer step, forward pass within the step), as CPC's augmentation:
the same on every rank, so each rank draws the global batch's rows and takes its own (W·B·K indices per
step, about 8M at 512 × 16384, little next to the B·(K+1)·D rows it gathers), a world size of W draws
what one process draws on the whole batch, and a resumed run draws what it would have, with no generator
state to checkpoint. The rows are a buffer: checkpointed with the module, loaded at any world size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from pipeline.config import Strict
from pipeline.distributed import gather, rank, world_size


class MemoryBankConfig(Strict):
    negatives: int = Field(16384, ge=1)  # K rows sampled per query (CMC's nce_k)
    momentum: float = Field(0.5, ge=0.0, lt=1.0)  # of a row's update (CMC's nce_m)


class MemoryBank(nn.Module):
    """Rows [views, N, D] once `allocate(N)` has run (the training set's size is known only to the loop)."""

    def __init__(self, cfg: MemoryBankConfig, views: int, dim: int, seed: int):
        super().__init__()
        self.cfg, self.views, self.dim, self.seed = cfg, views, dim, seed
        self.register_buffer("rows", None)
        self.begin_step(0)

    def allocate(self, size: int) -> None:
        scale = 1.0 / math.sqrt(self.dim / 3)
        g = torch.Generator().manual_seed(self.seed)
        self.rows = torch.rand(self.views, size, self.dim, generator=g).mul_(2 * scale).sub_(scale)

    def begin_step(self, step: int) -> None:
        """Before optimizer step `step`'s forward passes (the method's `before_step`)."""
        self._step, self._draws = step, 0

    @torch.no_grad()
    def sample(self, rows: int, device: torch.device) -> torch.Tensor:
        """[rows, K] indices for this rank's `rows` queries: its share of the global batch's draw."""
        if self.rows is None:
            raise RuntimeError("MemoryBank.allocate(N) has not run: the loop gives the training set's size first")
        self._draws += 1
        seed = ((self.seed * 1_000_003 + self._step) * 2**8 + self._draws) % 2**63
        g = torch.Generator(device).manual_seed(seed)
        drawn = torch.randint(self.rows.shape[1], (world_size() * rows, self.cfg.negatives), generator=g, device=device)
        return drawn[rank() * rows:(rank() + 1) * rows]

    def scores(self, q: torch.Tensor, view: int, indices: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """[B, 1 + K] dot products of queries q [B, D] with `view`'s rows: first row indices[i] (the
        positive), then rows negatives[i] [B, K]; fp32 under autocast too (fp64 for fp64 inputs). Queries
        [B, Q, D] (several per sample against the same rows, gathered once) give [B, Q, 1 + K]."""
        work = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            rows = self.rows[view][torch.cat([indices[:, None], negatives], 1)].to(work)  # [B, 1 + K, D]
            return torch.einsum("b...d,bkd->b...k", q.to(work), rows)

    def loss(self, q: torch.Tensor, view: int, indices: torch.Tensor, negatives: torch.Tensor,
             temperature: float) -> torch.Tensor:
        """Softmax InfoNCE of unit queries q against `view`'s rows (NCESoftmaxLoss: the positive first)."""
        logits = self.scores(q, view, indices, negatives) / temperature
        return F.cross_entropy(logits, torch.zeros_like(indices))

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: list[torch.Tensor]) -> None:
        """Rows `indices` [B] of each view towards that view's features [B, D], for the global batch."""
        indices = gather(indices)
        m = self.cfg.momentum
        for view, f in enumerate(features):
            mixed = self.rows[view, indices] * m + gather(f.detach().to(self.rows.dtype)) * (1 - m)
            self.rows[view].index_copy_(0, indices, F.normalize(mixed, dim=1))
