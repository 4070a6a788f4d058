"""Iterate a shard set as torch batches, one epoch per `iter()`, resumable at any step.

Epochs. DALI gives rank r the contiguous DALI shard (r + epoch) % W of the N samples, shuffles it through a
buffer, and pads every shard to P = ceil(ceil(N / W) / B) batches. Training yields the first
S = floor(floor(N / W) / B) of them (full batches of distinct samples on every rank, so each sample is
seen at most once per epoch, exactly once when W*B divides N) and skips the rest. Evaluation yields all P
batches with a `valid` mask that is False on padding, so each sample counts exactly once.

Position. `state_dict()` (JSON-serialisable) holds the epoch, the step and DALI's own checkpoint (reader position and random
state), so a loader restored from it continues with the same samples and the same augmentations.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from data_shards.shards import Manifest, check_shard_set
from pipeline.config import DataConfig
from pipeline.data.augment import ReaderSpec, eval_pipeline, views_pipeline

_DALI_DTYPE = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}


@dataclass
class Batch:
    views: list[torch.Tensor]  # each [B, 3, size, size]
    labels: torch.Tensor  # [B] int64, -1 where the set is unlabeled
    indices: torch.Tensor  # [B] int64, the samples' indices in the shard set
    valid: torch.Tensor  # [B] bool, False on padding (evaluation only)
    debug: dict[str, torch.Tensor] = field(default_factory=dict)  # crop boxes, with debug=True


def parse_decimal(text: torch.Tensor) -> torch.Tensor:
    """Rows of zero-padded ASCII digits ([B, W] uint8) -> int64; an empty row gives -1."""
    codes = text.long()
    digit = (codes >= 48) & (codes <= 57)
    count = digit.sum(1, keepdim=True)
    power = (count - 1 - torch.arange(text.shape[1])).clamp(min=0)
    value = torch.where(digit, (codes - 48) * 10**power, 0).sum(1)
    return torch.where(count.squeeze(1) > 0, value, -1)


class ShardLoader:
    """Views of a shard set for training (`train=True`) or one centre crop for evaluation."""

    def __init__(
        self,
        folder: str | Path,
        cfg: DataConfig,
        *,
        train: bool = True,
        batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        device_id: int | None = None,
        state: dict | None = None,
        debug: bool = False,
    ):
        self.folder = Path(folder)
        self.manifest: Manifest = check_shard_set(self.folder)
        self.cfg, self.train, self.rank, self.world_size = cfg, train, rank, world_size
        self.batch_size = batch_size or cfg.batch_size
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        n, w, b = self.manifest.num_samples, world_size, self.batch_size
        self.shard_sizes = [(s + 1) * n // w - s * n // w for s in range(w)]
        self.padded_steps = math.ceil(math.ceil(n / w) / b)
        self.steps_per_epoch = (n // w) // b if train else self.padded_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.folder}: {n} samples cannot fill one batch of {b} on each of {w} rank(s)"
            )
        self.epoch, self.step, checkpoint = 0, 0, None
        if state is not None:
            self._check_state(state)
            self.epoch, self.step, checkpoint = state["epoch"], state["step"], base64.b64decode(state["dali"])

        shards = self.manifest.shards
        spec = ReaderSpec(
            paths=[str(self.folder / s.tar) for s in shards],
            index_paths=[str(self.folder / s.index) for s in shards],
            rank=rank,
            world_size=world_size,
            shuffle=train,
            shuffle_buffer=cfg.shuffle_buffer,
        )
        common = dict(
            batch_size=b,
            num_threads=cfg.threads(),
            device_id=device_id,
            seed=cfg.seed + 7919 * rank,
            gpu=device_id is not None,
            out_dtype=_DALI_DTYPE[cfg.dtype],
            hw_decoder_load=cfg.hw_decoder_load,
            checkpoint=checkpoint,
        )
        if train:
            self.recipes = cfg.view_recipes()
            pipe = views_pipeline(spec, self.recipes, debug=debug, **common)
            names = [f"view{i}" for i in range(len(self.recipes))] + ["label", "index"]
            if debug:
                names += [f"{k}{i}" for i in range(len(self.recipes)) for k in ("anchor", "extent")] + ["shape"]
        else:
            first = cfg.view_recipes()[0]  # evaluate with the training normalisation
            pipe = eval_pipeline(spec, cfg.eval_size, cfg.eval_resize, mean=first.mean, std=first.std, **common)
            names = ["view0", "label", "index"]
        self.output_names = names
        self._iterator = DALIGenericIterator([pipe], names, size=-1)

    def _check_state(self, state: dict) -> None:
        expected = {"num_samples": self.manifest.num_samples, "world_size": self.world_size, "batch_size": self.batch_size}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data position was saved with {key}={state.get(key)}, this run has {value}: "
                    "the position cannot carry over"
                )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "num_samples": self.manifest.num_samples,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "dali": base64.b64encode(self._iterator.checkpoints()[0]).decode(),  # JSON-safe
        }

    def _valid(self) -> torch.Tensor:
        shard_size = self.shard_sizes[(self.rank + self.epoch) % self.world_size]
        position = self.step * self.batch_size + torch.arange(self.batch_size)
        return position < shard_size

    def _to_batch(self, out: dict) -> Batch:
        views = [out[name] for name in self.output_names if name.startswith("view")]
        if self.cfg.dtype == "bfloat16":
            views = [v.to(torch.bfloat16) for v in views]
        extras = {k: v for k, v in out.items() if not k.startswith(("view", "label", "index"))}
        return Batch(views, parse_decimal(out["label"]), parse_decimal(out["index"]), self._valid(), extras)

    def __iter__(self):
        """Yields the rest of the current epoch; the next `iter()` starts the next epoch."""
        if self.step >= self.steps_per_epoch:
            for _ in range(self.padded_steps - self.step):
                next(self._iterator)
            self.epoch, self.step = self.epoch + 1, 0
        while self.step < self.steps_per_epoch:
            out = next(self._iterator)[0]
            batch = self._to_batch(out)
            self.step += 1
            yield batch
