"""Broken shard sets are refused before training starts, with an error naming the file."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import encode
from data_shards import verify
from data_shards.shards import FORMAT, Manifest, ShardError, ShardWriter, read_manifest, write_manifest
from pipeline.config import DataConfig, ViewRecipe
from pipeline.data.loader import ShardLoader

CFG = DataConfig(views=[ViewRecipe(size=16)], batch_size=4, num_threads=1)


def open_loader(folder):
    return ShardLoader(folder, CFG)


def damaged_copy(small_shards: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(small_shards, dst)
    return dst


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ShardError, match=f"{tmp_path / 'nope'}: no such shard folder"):
        open_loader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no manifest.json"):
        open_loader(tmp_path / "empty")


def test_tars_without_manifest(small_shards, tmp_path):
    shards = damaged_copy(small_shards, tmp_path)
    (shards / "manifest.json").unlink()
    with pytest.raises(ShardError, match="creation did not finish"):
        open_loader(shards)


def test_manifest_naming_a_missing_shard(small_shards, tmp_path):
    shards = damaged_copy(small_shards, tmp_path)
    (shards / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match="shard-000001.tar: named in .* but missing"):
        open_loader(shards)


def test_truncated_tar(small_shards, tmp_path):
    shards = damaged_copy(small_shards, tmp_path)
    tar = shards / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(ShardError, match="shard-000000.tar: 5000 bytes.*truncated"):
        open_loader(shards)
    assert any("shard-000000.tar" in p for p in verify.verify(shards))


def test_shard_without_index(small_shards, tmp_path):
    shards = damaged_copy(small_shards, tmp_path)
    (shards / "shard-000002.idx").unlink()
    with pytest.raises(ShardError, match="shard-000002.idx: index of shard-000002.tar missing"):
        open_loader(shards)


def test_manifest_with_a_wrong_key(small_shards, tmp_path):
    shards = damaged_copy(small_shards, tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["sampels"] = manifest["shards"][0].pop("samples")
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="manifest.json: shards.0.samples: Field required.*shards.0.sampels"):
        open_loader(shards)


def write_custom_set(folder: Path, samples: list[list[tuple[str, bytes]]]) -> Path:
    folder.mkdir()
    writer = ShardWriter(folder, 1 << 20)
    for i, members in enumerate(samples):
        writer.add(i, members + [("id", str(i).encode()), ("json", b"{}")])
    entries = writer.close()
    manifest = Manifest(format=FORMAT, split="all", num_samples=len(samples), class_names=None, shards=entries, skipped=0, args={})
    write_manifest(folder, manifest)
    return folder


def test_sample_without_image(tmp_path):
    jpg = encode(np.zeros((8, 8, 3), np.uint8), "JPEG")
    folder = write_custom_set(tmp_path / "s", [[("jpg", jpg)], [("txt", b"caption only")], [("jpg", jpg)]])
    with pytest.raises(ShardError, match="shard-000000.tar: sample 000000001 has no image"):
        open_loader(folder)


def test_pickle_member_in_a_shard_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    jpg = encode(np.full((8, 8, 3), 7, np.uint8), "JPEG")
    folder = write_custom_set(tmp_path / "s", [[("jpg", jpg), ("pyd", pickle.dumps(Exploit()))] for _ in range(4)])
    batch = next(iter(open_loader(folder)))
    assert batch.views[0].shape == (4, 3, 16, 16) and (batch.labels == -1).all()
    problems = verify.verify(folder)
    assert problems and all("unexpected member(s) ['pyd']" in p for p in problems)
    assert not marker.exists()


def test_batch_larger_than_the_set(small_shards):
    with pytest.raises(ValueError, match=r"data.batch_size=40 is larger than .* \(60 samples, 30 for each of 2 rank"):
        ShardLoader(small_shards, CFG, batch_size=40, world_size=2)


def test_manifest_counts_must_add_up(small_shards, tmp_path):
    shards = damaged_copy(small_shards, tmp_path)
    manifest = read_manifest(shards)
    write_manifest(shards, manifest.model_copy(update={"num_samples": manifest.num_samples + 1}))
    with pytest.raises(ShardError, match="do not add up"):
        open_loader(shards)
