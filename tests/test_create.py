"""Shard creation and verification: round trip on real CIFAR-10 JPEGs, sources, bad input, determinism,
interruption, and verify catching damage."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from nvidia.dali import fn, pipeline_def, types

from conftest import encode, image_folder, make_shards, random_images
from data_shards import create, verify
from data_shards.images import decode_rgb
from data_shards.shards import ShardError, check_shard_set, read_index, read_manifest


def shard_samples(folder: Path):
    """{key: {ext: bytes}} of a whole shard set, read with tarfile."""
    samples = {}
    for shard in read_manifest(folder).shards:
        with tarfile.open(folder / shard.tar) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


# --- round trip on CIFAR-10 --------------------------------------------------------------------------


def test_cifar_round_trip(cifar_archive, cifar_shards):
    manifest = read_manifest(cifar_shards)
    assert manifest.num_samples == 2000 and manifest.skipped == 0 and len(manifest.shards) > 1
    assert manifest.class_names == sorted(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    with tarfile.open(cifar_archive) as tar:
        source = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    samples = shard_samples(cifar_shards)
    assert len(samples) == 2000
    for i, (key, s) in enumerate(sorted(samples.items())):
        meta = json.loads(s["json"])
        assert key == f"{i:09d}" and int(s["id"]) == i
        assert manifest.class_names[int(s["cls"])] == meta["source"].split("/")[0]
        assert s["jpg"] == source["train/" + meta["source"]]  # stored unchanged
        assert (meta["width"], meta["height"]) == (32, 32)
    assert verify.verify(cifar_shards) == []


def test_dali_cpu_decodes_every_sample_like_pil(cifar_shards):
    manifest = check_shard_set(cifar_shards)

    @pipeline_def
    def decode():
        encoded, index = fn.readers.webdataset(
            paths=[str(cifar_shards / s.tar) for s in manifest.shards],
            index_paths=[str(cifar_shards / s.index) for s in manifest.shards],
            ext=["jpg;png", "id"],
        )
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB), encoded, index

    pipe = decode(batch_size=500, num_threads=2, device_id=None)
    pipe.build()
    seen = set()
    for _ in range(4):
        images, encoded, index = pipe.run()
        for i in range(len(images)):
            seen.add(int(index.at(i).tobytes()))
            assert np.array_equal(images.at(i), decode_rgb(encoded.at(i).tobytes()))
    assert seen == set(range(2000))


def test_webdataset_library_reads_the_shards(cifar_shards):
    manifest = read_manifest(cifar_shards)
    urls = [str(cifar_shards / s.tar) for s in manifest.shards]
    rows = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb").to_tuple("__key__", "jpg", "cls"))
    assert len(rows) == 2000
    key, image, label = rows[0]
    assert key == "000000000" and image.shape == (32, 32, 3) and 0 <= label < 10


# --- sources -----------------------------------------------------------------------------------------


def test_flat_folder_is_unlabeled(tmp_path):
    src = image_folder(tmp_path / "src", {f"{i}.png": encode(np.full((8, 8, 3), i, np.uint8)) for i in range(5)})
    out = make_shards(src, tmp_path / "out")
    manifest = read_manifest(out)
    assert manifest.class_names is None and manifest.num_samples == 5
    assert all("cls" not in s for s in shard_samples(out).values())
    assert verify.verify(out) == []


def test_list_with_class_names_and_relative_paths(tmp_path):
    image_folder(tmp_path / "imgs", {f"{i}.jpg": encode(np.full((8, 8, 3), i, np.uint8), "JPEG") for i in range(4)})
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nimgs/0.jpg,zebra\nimgs/1.jpg,ant\nimgs/2.jpg,zebra\nimgs/3.jpg,ant\n")
    out = make_shards(listing, tmp_path / "out")
    assert read_manifest(out).class_names == ["ant", "zebra"]
    labels = {json.loads(s["json"])["source"]: int(s["cls"]) for s in shard_samples(out).values()}
    assert labels == {"imgs/0.jpg": 1, "imgs/1.jpg": 0, "imgs/2.jpg": 1, "imgs/3.jpg": 0}


def test_list_with_integer_labels_and_a_missing_file(tmp_path):
    image_folder(tmp_path, {f"{c}.png": encode(np.full((8, 8, 3), i, np.uint8)) for i, c in enumerate("abc")})
    (tmp_path / "ok.txt").write_text("a.png,2\nb.png,0\nc.png,001\n")
    out = make_shards(tmp_path / "ok.txt", tmp_path / "out")
    assert read_manifest(out).class_names == ["0", "1", "2"]
    (tmp_path / "bad.txt").write_text("a.png,2\nb.png,0\nc.png,1\nmissing.png,1\n")
    assert create.main([str(tmp_path / "bad.txt"), str(tmp_path / "out2")]) == 2


def test_archive_with_a_pickle_member_never_unpickles_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    members = {**random_images(4, classes=2), "c0/evil.pkl": pickle.dumps(Exploit()), "c1/evil.jpg": pickle.dumps(Exploit())}
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"wrapper/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert create.main([str(archive), str(out), "--workers", "1"]) == 0
    manifest = read_manifest(out)
    assert manifest.num_samples == 4 and manifest.skipped == 2 and manifest.class_names == ["c0", "c1"]
    assert not marker.exists()


# --- bad files, strict mode, splits --------------------------------------------------------------------


def bad_folder(root: Path) -> Path:
    rgba = np.zeros((8, 8, 4), np.uint8)
    return image_folder(
        root,
        {
            **random_images(6, classes=2),
            "c0/zero.jpg": b"",
            "c0/notes.jpg": b"not an image\n",
            "c1/truncated.jpg": encode(np.zeros((32, 32, 3), np.uint8), "JPEG")[:100],
            "c1/rgba.png": encode(rgba, "PNG"),
            "c1/deep.png": encode(np.full((8, 8), 40000, np.uint16), "PNG"),
        },
    )


def test_bad_files_are_skipped_and_reported(tmp_path, capsys):
    out = tmp_path / "out"
    assert create.main([str(bad_folder(tmp_path / "src")), str(out), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "3 file(s) skipped" in err
    for name in ("c0/zero.jpg: zero-byte", "c0/notes.jpg: not an image", "c1/truncated.jpg: does not decode"):
        assert name in err
    manifest = read_manifest(out)
    assert manifest.num_samples == 8 and manifest.skipped == 3
    sources = {json.loads(s["json"])["source"]: s for s in shard_samples(out).values()}
    assert "png" in sources["c1/rgba.png"] and "png" in sources["c1/deep.png"]
    assert verify.verify(out) == []


def test_strict_mode_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert create.main([str(bad_folder(tmp_path / "src")), str(out), "--strict"]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


def test_oversized_image_is_skipped(tmp_path):
    src = image_folder(tmp_path / "src", {"a.png": encode(np.zeros((50, 50, 3), np.uint8)), "b.png": encode(np.zeros((5, 5, 3), np.uint8))})
    out = tmp_path / "out"
    assert create.main([str(src), str(out), "--max-pixels", "1000"]) == 0
    assert read_manifest(out).num_samples == 1


def test_val_fraction_holds_out_per_class(tmp_path):
    src = image_folder(tmp_path / "src", random_images(40, classes=4))
    out = make_shards(src, tmp_path / "out", "--val-fraction", "0.3")
    train, val = read_manifest(out / "train"), read_manifest(out / "val")
    assert (train.num_samples, val.num_samples) == (28, 12)
    names = lambda f: {json.loads(s["json"])["source"] for s in shard_samples(f).values()}  # noqa: E731
    assert not names(out / "train") & names(out / "val")
    assert sorted(int(s["cls"]) for s in shard_samples(out / "val").values()) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


def test_existing_set_is_kept_unless_overwrite(tmp_path, capsys):
    src = image_folder(tmp_path / "src", random_images(6))
    out = make_shards(src, tmp_path / "out")
    assert create.main([str(src), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert create.main([str(src), str(out), "--overwrite", "--limit", "3"]) == 0
    assert read_manifest(out).num_samples == 3 and verify.verify(out) == []


# --- determinism and interruption -------------------------------------------------------------------------


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_inputs_and_seed_give_identical_bytes(tmp_path):
    src = image_folder(tmp_path / "src", {**random_images(30), **random_images(10, fmt="PNG", seed=3)})
    a = make_shards(src, tmp_path / "a", "--seed", "5", "--shard-size-mb", "0.03")
    assert create.main([str(src), str(tmp_path / "b"), "--seed", "5", "--shard-size-mb", "0.03", "--workers", "2"]) == 0
    assert folder_bytes(a) == folder_bytes(tmp_path / "b")
    c = make_shards(src, tmp_path / "c", "--seed", "6", "--shard-size-mb", "0.03")
    assert folder_bytes(a) != folder_bytes(c)


def test_interrupted_creation_leaves_no_manifest(tmp_path, cifar_archive):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_shards.create", str(cifar_archive), str(out), "--workers", "1", "--shard-size-mb", "0.2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / ".out.incomplete" / "new").glob("shard-000003.tar")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardError, match="no such shard folder"):  # the staging folder is beside OUT
        check_shard_set(out)
    # A new run clears the leftovers and completes.
    assert create.main([str(cifar_archive), str(out), "--limit", "50", "--workers", "1"]) == 0
    assert not (tmp_path / ".out.incomplete").exists() and verify.verify(out) == []


# --- verify ---------------------------------------------------------------------------------------------


def copy_set(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_verify_catches_a_flipped_byte(small_shards, tmp_path):
    shards = copy_set(small_shards, tmp_path / "s")
    shard = read_manifest(shards).shards[1]
    entry = read_index(shards / shard.index)[2]
    offset, size = entry.members["jpg"]
    data = bytearray((shards / shard.tar).read_bytes())
    data[offset + size // 2] ^= 0xFF
    (shards / shard.tar).write_bytes(bytes(data))
    problems = verify.verify(shards)
    assert any(shard.tar in p and "sha256" in p for p in problems)
    assert verify.main([str(shards)]) == 1


def test_verify_catches_index_and_count_damage(small_shards, tmp_path):
    shards = copy_set(small_shards, tmp_path / "s")
    shard = read_manifest(shards).shards[0]
    lines = (shards / shard.index).read_text().splitlines()
    (shards / shard.index).write_text("\n".join([lines[0]] + lines[1:][::-1]) + "\n")
    assert any("does not match" in p for p in verify.verify(shards))
    (shards / read_manifest(shards).shards[-1].tar).unlink()
    assert any("missing" in p for p in verify.verify(shards))
