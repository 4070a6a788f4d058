"""Endless batches of a shard set's labeled subset, for semi-supervised training at few labels.

The official FeatMatch loader (GT-RIPL/FeatMatch dataloader/base_loader.py, `SSLDataLoader`) draws every
batch as `bsl` labeled plus `bsu` unlabeled images from two endless samplers (`InfBatchSampler`: a fresh
permutation each pass, N // bsl full batches of it). `LabeledLoader` is the labeled one: the chosen samples'
encoded images are read from the tars once (by the webdataset index), fed to DALI through an external
source in that order, and augmented by the same `view` chains as `ShardLoader`'s training views, on the
GPU when `device_id` is given. The unlabeled side is an ordinary `ShardLoader` of batch `bsu`.
`evaluation()` is one unaugmented pass over the same samples (the released code's labeled features for its
prototypes come from such a pass, `get_labeled_featrues`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from data_shards.shards import ShardError, check_shard_set, read_index
from pipeline.config import DataConfig, ViewRecipe
from pipeline.data.augment import _decode, eval_view, view
from pipeline.data.loader import _DALI_DTYPE, Batch


def read_samples(folder: str | Path, indices: list[int]) -> list[tuple[np.ndarray, int, int]]:
    """(encoded image bytes, label, global index) of the samples `indices` of a labeled shard set, in that
    order. Reads each shard's index and `.id` members, and only the chosen images."""
    folder = Path(folder)
    manifest = check_shard_set(folder)
    if manifest.class_names is None:
        raise ShardError(f"{folder}: the shard set is unlabeled")
    wanted = set(indices)
    found: dict[int, tuple[np.ndarray, int, int]] = {}
    for shard in manifest.shards:
        with open(folder / shard.tar, "rb") as f:
            for entry in read_index(folder / shard.index):
                fields = {}
                for ext in ("id", "cls"):
                    offset, size = entry.members[ext]
                    f.seek(offset)
                    fields[ext] = int(f.read(size))
                if fields["id"] not in wanted:
                    continue
                offset, size = entry.members["jpg"] if "jpg" in entry.members else entry.members["png"]
                f.seek(offset)
                found[fields["id"]] = (np.frombuffer(f.read(size), dtype=np.uint8), fields["cls"], fields["id"])
    missing = wanted - found.keys()
    if missing:
        raise ShardError(f"{folder}: no sample with id(s) {sorted(missing)[:5]}")
    return [found[i] for i in indices]


def batch_orders(n: int, batch_size: int, rng: np.random.Generator):
    """Endless batches of positions in [0, n), as the released InfBatchSampler draws them: each pass a fresh
    permutation cut into n // batch_size full batches (the rest of the pass unused)."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@pipeline_def(enable_conditionals=True)
def labeled_views_pipeline(source, recipes: list[ViewRecipe], gpu: bool, out_dtype, hw_decoder_load: float):
    """Outputs: one tensor per view (CHW), then label and index ([1] int64 each)."""
    encoded, label, index = fn.external_source(source=source, num_outputs=3, batch=True,
                                               dtype=[types.UINT8, types.INT64, types.INT64])
    shape = fn.peek_image_shape(encoded)
    image = _decode(encoded, gpu, hw_decoder_load)
    views = [view(image, shape, recipe, out_dtype, debug=False)[0] for recipe in recipes]
    return (*views, label, index)


@pipeline_def
def labeled_eval_pipeline(source, size: int, resize: int, gpu: bool, out_dtype, hw_decoder_load: float, mean, std):
    """Outputs: the evaluation view (CHW), then label and index ([1] int64 each)."""
    encoded, label, index = fn.external_source(source=source, num_outputs=3, batch=True,
                                               dtype=[types.UINT8, types.INT64, types.INT64])
    return eval_view(_decode(encoded, gpu, hw_decoder_load), size, resize, mean, std, out_dtype), label, index


def in_order(n: int, batch_size: int):
    """Endless passes over [0, n) in order, in batches of `batch_size`, the last of each pass padded with its
    final position: (positions, valid) per batch."""
    while True:
        for start in range(0, n, batch_size):
            positions = np.minimum(np.arange(start, start + batch_size), n - 1)
            yield positions, np.arange(start, start + batch_size) < n


class LabeledLoader:
    """Endless `Batch`es of `batch_size` (at most the subset's size) samples of `indices`, each with the
    training views `cfg` describes; `seed` drives the order (DALI's own seed, from `cfg.seed`, the views)."""

    def __init__(self, folder: str | Path, indices: list[int], cfg: DataConfig, batch_size: int, *,
                 device_id: int | None = None, seed: int = 0):
        self.samples = read_samples(folder, indices)
        self.batch_size = min(batch_size, len(self.samples))
        self._orders = batch_orders(len(self.samples), self.batch_size, np.random.default_rng(seed))
        self.dtype = cfg.dtype
        recipes = cfg.view_recipes()
        pipe = labeled_views_pipeline(
            source=self._next_batch, recipes=recipes, gpu=device_id is not None, out_dtype=_DALI_DTYPE[cfg.dtype],
            hw_decoder_load=cfg.hw_decoder_load, batch_size=self.batch_size, num_threads=cfg.threads(),
            device_id=device_id, seed=cfg.seed + 104729,
        )
        self.names = [f"view{i}" for i in range(len(recipes))] + ["label", "index"]
        self._iterator = DALIGenericIterator([pipe], self.names, size=-1)
        self._cfg, self._device_id, self._eval = cfg, device_id, None

    def _rows(self, positions):
        rows = [self.samples[i] for i in positions]
        return ([r[0] for r in rows], [np.array([r[1]], dtype=np.int64) for r in rows],
                [np.array([r[2]], dtype=np.int64) for r in rows])

    def _next_batch(self):
        return self._rows(next(self._orders))

    def _next_eval_batch(self):
        positions, valid = next(self._eval_order)
        self._eval_valid.append(torch.from_numpy(valid))
        return self._rows(positions)

    def evaluation(self):
        """One pass over every sample in order, as `Batch`es with the evaluation view of `cfg` (padding rows
        of the last batch have `valid` False), for `pipeline.eval.extract_features`."""
        if self._eval is None:
            cfg, first = self._cfg, self._cfg.view_recipes()[0]
            self._eval_order, self._eval_valid = in_order(len(self.samples), self.batch_size), []
            pipe = labeled_eval_pipeline(
                source=self._next_eval_batch, size=cfg.eval_size, resize=cfg.eval_resize, gpu=self._device_id is not None,
                out_dtype=_DALI_DTYPE[cfg.dtype], hw_decoder_load=cfg.hw_decoder_load, mean=first.mean, std=first.std,
                batch_size=self.batch_size, num_threads=cfg.threads(), device_id=self._device_id, seed=cfg.seed,
            )
            self._eval = DALIGenericIterator([pipe], ["view0", "label", "index"], size=-1)
        for _ in range(-(-len(self.samples) // self.batch_size)):
            out = next(self._eval)[0]
            yield Batch([out["view0"]], out["label"].flatten().long().cpu(), out["index"].flatten().long().cpu(),
                        self._eval_valid.pop(0))

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        out = next(self._iterator)[0]
        views = [out[name] for name in self.names[:-2]]
        if self.dtype == "bfloat16":
            views = [v.to(torch.bfloat16) for v in views]
        labels, indices = out["label"].flatten().long().cpu(), out["index"].flatten().long().cpu()
        return Batch(views, labels, indices, torch.ones(self.batch_size, dtype=torch.bool))
