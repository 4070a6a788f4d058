"""Iterate a shard set as torch batches, one epoch per `iter()`, resumable at any step.

Epochs. DALI gives rank r the contiguous DALI shard (r + epoch) % W of the N samples, shuffles it through a
buffer, and pads every shard to P = ceil(ceil(N / W) / B) batches. Training yields the first
S = floor(floor(N / W) / B) of them (full batches of distinct samples on every rank, so each sample is
seen at most once per epoch, exactly once when W*B divides N) and skips the rest. Evaluation yields all P
batches with a `valid` mask that is False on padding, so each sample counts exactly once.

Labels and ids. `check_shard_set` refuses at start-up what the index shows (a missing `.cls` or `.id`,
one too long to be in range, repeated or foreign keys); each batch's `.cls` and `.id` text is then checked
on the CPU as it arrives (canonical decimal, label in [0, classes), id in [0, samples), no id twice in an
epoch on this rank), and a bad one stops the run with a ShardError naming its shard and key. `.json` is
metadata for people and `data_shards.verify`; nothing here reads it.

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

from data_shards.shards import Manifest, ShardError, check_shard_set, text_field_problems
from pipeline.config import ConfigError, DataConfig
from pipeline.data.augment import ReaderSpec, eval_pipeline, views_pipeline

_DALI_DTYPE = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}


@dataclass
class Batch:
    views: list[torch.Tensor]  # each [B, 3, size, size]
    labels: torch.Tensor  # [B] int64, -1 where the set is unlabeled
    indices: torch.Tensor  # [B] int64, the samples' indices in the shard set
    valid: torch.Tensor  # [B] bool, False on padding (evaluation only)
    debug: dict[str, torch.Tensor] = field(default_factory=dict)  # crop boxes, with debug=True


def parse_decimal(rows: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [text length, zero-padded ASCII text] ([B, 1 + W] uint8, as `augment._fixed_width` makes
    them) -> (int64 values, ok). `ok` is False where the text is not a canonical decimal integer in
    [0, limit) (an empty text included); those values are -1. Vectorised, on the CPU: no host sync."""
    length = rows[:, 0].long()
    codes = rows[:, 1:].long()
    width = codes.shape[1]
    position = torch.arange(width)
    inside = position < length[:, None]
    digit = (codes >= 48) & (codes <= 57)
    power = (length[:, None] - 1 - position).clamp(min=0, max=width - 1)
    value = torch.where(inside & digit, (codes - 48) * 10**power, 0).sum(1)
    ok = (length >= 1) & (length <= width) & (digit | ~inside).all(1) & ((codes[:, 0] != 48) | (length == 1))
    ok &= value < limit
    return torch.where(ok, value, -1), ok


def batches_per_epoch(folder, num_samples: int, batch_size: int, world_size: int, accumulation_steps: int = 1) -> int:
    """S, the full batches each rank trains on per epoch (see above). Fewer than one optimizer step's
    `accumulation_steps` is a ConfigError naming the setting, the folder and its sample count."""
    per_rank = num_samples // world_size
    batches = per_rank // batch_size
    source = f"{folder} ({num_samples} samples, {per_rank} for each of {world_size} rank(s))"
    if batches == 0:
        raise ConfigError(f"data.batch_size={batch_size} is larger than the samples a rank gets per epoch from {source}")
    if batches < accumulation_steps:
        raise ConfigError(f"optim.accumulation_steps={accumulation_steps} exceeds the {batches} batches of "
                          f"data.batch_size={batch_size} a rank gets per epoch from {source}")
    return batches


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
        self.steps_per_epoch = batches_per_epoch(self.folder, n, b, w) if train else self.padded_steps
        self.num_classes = len(self.manifest.class_names) if self.manifest.class_names is not None else None
        self._seen = torch.zeros(n, dtype=torch.bool)  # ids this rank has yielded in this epoch
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
        labels, indices, valid = self._labels_and_indices(out["label"], out["index"])
        return Batch(views, labels, indices, valid, extras)

    def _labels_and_indices(self, label_text: torch.Tensor, index_text: torch.Tensor):
        """Parse and check the batch's `.cls` and `.id` (CPU tensors straight from the reader)."""
        indices, ok = parse_decimal(index_text, self.manifest.num_samples)
        if self.num_classes is not None:
            labels, labels_ok = parse_decimal(label_text, self.num_classes)
            ok = ok & labels_ok
        else:
            labels = torch.full_like(indices, -1)
        valid = self._valid()
        if not bool(ok.all()):
            raise self._text_error(f"{int((~ok).sum())} sample(s) of a batch have a bad .cls or .id")
        fresh = indices[valid]
        if bool(self._seen[fresh].any()) or torch.unique(fresh).numel() != fresh.numel():
            raise self._text_error("an .id repeats within one epoch")
        self._seen[fresh] = True
        return labels, indices, valid

    def _text_error(self, what: str) -> ShardError:
        """Only on the error path: scan the set's `.cls`/`.id` members to name the shard and key."""
        problems = text_field_problems(self.folder, self.manifest)
        named = "; ".join(problems) if problems else "(the scan found no bad member; the shards changed while reading?)"
        return ShardError(f"{self.folder}: {what}: {named}")

    def __iter__(self):
        """Yields the rest of the current epoch; the next `iter()` starts the next epoch."""
        if self.step >= self.steps_per_epoch:
            for _ in range(self.padded_steps - self.step):
                next(self._iterator)
            self.epoch, self.step = self.epoch + 1, 0
            self._seen.zero_()
        while self.step < self.steps_per_epoch:
            out = next(self._iterator)[0]
            batch = self._to_batch(out)
            self.step += 1
            yield batch
