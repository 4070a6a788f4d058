"""Issue 12, sections 3 and 4: one run writes one consistent shard set (staging, swap, lock, run id, full
disk), and labels, ids, keys and names are parsed strictly when shards are made and when they are read."""

import errno
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from conftest import encode, image_folder, make_shards, random_images
from test_create import shard_samples
from data_shards import create, verify
from data_shards.images import decode_rgb, prepare_image
from data_shards.shards import (
    FORMAT, Manifest, ShardError, ShardWriter, check_shard_set, read_manifest, shared_class_names, write_manifest,
)
from pipeline.config import DataConfig, ViewRecipe
from pipeline.data.loader import ShardLoader

CFG = DataConfig(views=[ViewRecipe(size=8)], batch_size=2, num_threads=1)
JPG = encode(np.full((8, 8, 3), 7, np.uint8), "JPEG")


def custom_set(folder: Path, samples: list[dict], class_names=None, per_shard: int = 100, firsts=None) -> Path:
    """A shard set whose samples are {ext: bytes} as given: .id, .json and (when labeled) .cls are
    filled in correctly unless a sample sets them (None drops the member)."""
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, 1 << 20)
    for i, given in enumerate(samples):
        if i and i % per_shard == 0:
            writer._finish()
        members = {"jpg": JPG, "id": str(i).encode(), "json": b"{}"}
        if class_names is not None:
            members["cls"] = str(i % len(class_names)).encode()
        members.update(given)
        writer.add(given.get("key", i), [(ext, data) for ext, data in members.items() if data is not None and ext != "key"])
    entries = writer.close()
    if firsts is not None:
        entries = [e.model_copy(update={"first": f}) for e, f in zip(entries, firsts)]
    manifest = Manifest(format=FORMAT, split="all", num_samples=len(samples), class_names=class_names,
                        shards=entries, skipped=0, args={})
    write_manifest(folder, manifest)
    return folder


def read_all(folder: Path, train: bool = False):
    loader = ShardLoader(folder, CFG, train=train)
    return [batch for batch in loader]


# --- 4. labels and ids, read strictly ------------------------------------------------------------------

CLASSES = [f"c{i}" for i in range(20)]  # labels have at most 2 digits: longer ones are refused by the index


@pytest.mark.parametrize(
    "cls, phase",
    [
        (b"-3", "batch"),  # was read as 3
        (b"1.5", "start"),  # was 15
        (b"abc", "start"),  # was -1 ("unlabeled")
        (b"a", "batch"),
        (b"25", "batch"),  # out of range
        (b"07", "batch"),  # not canonical
        (b"3\0", "batch"),  # NUL inside
        (b"1" * 21, "start"),  # crashed DALI without a name
        (b"", "start"),
        (None, "start"),  # missing in a labeled set
    ],
)
def test_bad_label_is_named_with_shard_and_key(tmp_path, cls, phase):
    samples = [{} for _ in range(6)]
    samples[3] = {"cls": cls}
    folder = custom_set(tmp_path / "s", samples, CLASSES)
    where = r"shard-000000\.tar: (sample|key) 000000003"
    if phase == "start":
        with pytest.raises(ShardError, match=where):
            check_shard_set(folder)
    else:
        check_shard_set(folder)
        loader = ShardLoader(folder, CFG, train=False)
        with pytest.raises(ShardError, match=where + ": label"):
            list(loader)
    assert any("000000003" in p for p in verify.verify(folder))


def test_good_labels_pass_and_unlabeled_sets_give_minus_one(tmp_path):
    labeled = custom_set(tmp_path / "l", [{} for _ in range(6)], CLASSES)
    labels = {i: c for b in read_all(labeled) for i, c in zip(b.indices[b.valid].tolist(), b.labels[b.valid].tolist())}
    assert labels == {i: i for i in range(6)}
    unlabeled = custom_set(tmp_path / "u", [{} for _ in range(4)])
    assert all((b.labels == -1).all() for b in read_all(unlabeled))


def test_label_in_an_unlabeled_set_is_refused(tmp_path):
    folder = custom_set(tmp_path / "s", [{}, {"cls": b"1"}, {}, {}])
    with pytest.raises(ShardError, match="sample 000000001 has a .cls, but .* no class names"):
        ShardLoader(folder, CFG)


@pytest.mark.parametrize(
    "sample_id, phase, message",
    [
        (None, "start", "has no .id"),
        (b"123456", "start", ".id of 6 bytes"),
        (b"x", "batch", "id b'x' is not a decimal integer"),
        (b"9", "batch", r"id 9 is not in \[0, 6\)"),
        (b"1", "batch", "id 1 repeats"),  # two samples claim index 1
    ],
)
def test_bad_id_is_named_with_shard_and_key(tmp_path, sample_id, phase, message):
    samples = [{} for _ in range(6)]
    samples[4] = {"id": sample_id}
    folder = custom_set(tmp_path / "s", samples)
    if phase == "start":
        with pytest.raises(ShardError, match=rf"shard-000000\.tar: sample 000000004.*{message}"):
            ShardLoader(folder, CFG)
    else:
        with pytest.raises(ShardError, match=rf"shard-000000\.tar: key 000000004: {message}"):
            read_all(folder, train=True)


def test_duplicate_keys_across_shards_are_refused(tmp_path):
    samples = [{"key": 0}, {"key": 1}, {"key": 1}, {"key": 3}]
    folder = custom_set(tmp_path / "s", samples, per_shard=2, firsts=[0, 2])
    with pytest.raises(ShardError, match=r"shard-000001\.tar: sample 000000001: key should be 000000002"):
        ShardLoader(folder, CFG)
    assert verify.verify(folder)


def test_metadata_that_is_not_json_is_left_to_verify(tmp_path):
    """Decision: `.json` is for people and verify; training never reads it, so the loader does not check it."""
    samples = [{} for _ in range(4)]
    samples[2] = {"json": b"{not json"}
    folder = custom_set(tmp_path / "s", samples)
    assert sum(int(b.valid.sum()) for b in read_all(folder)) == 4
    assert any("key 000000002: metadata is not JSON" in p for p in verify.verify(folder))


@pytest.mark.parametrize("field", ["tar", "index"])
@pytest.mark.parametrize("name", ["../other/shard-000000.tar", "/etc/passwd", "sub/shard-000000.tar", "..", ".hidden"])
def test_manifest_naming_files_outside_its_folder_is_refused(small_shards, tmp_path, field, name):
    folder = tmp_path / "s"
    folder.mkdir()
    for p in small_shards.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0][field] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=rf"manifest.json: shards.0.{field}: .*not a file name in the manifest's folder"):
        check_shard_set(folder)
    assert "not a file name" in verify.verify(folder)[0]


# --- 3. one run, one consistent set ----------------------------------------------------------------------


def test_train_and_val_of_one_run_share_a_run_id_and_other_pairs_are_refused(tmp_path):
    src = image_folder(tmp_path / "src", random_images(24, classes=3))
    a = make_shards(src, tmp_path / "a", "--val-fraction", "0.25")
    b = make_shards(src, tmp_path / "b", "--val-fraction", "0.25", "--seed", "1")
    ids = {read_manifest(a / s).run_id for s in ("train", "val")}
    assert len(ids) == 1 and None not in ids and read_manifest(b / "train").run_id not in ids
    assert shared_class_names(a / "train", a / "val") == ["c0", "c1", "c2"]
    with pytest.raises(ShardError, match="different data_shards.create runs"):
        shared_class_names(a / "train", b / "val")
    # The layout a kill between two manifests used to leave: a new train/ beside an old val/.
    (a / "val" / "manifest.json").write_bytes((b / "val" / "manifest.json").read_bytes())
    with pytest.raises(ShardError, match="different data_shards.create runs"):
        check_shard_set(a / "train")
    with pytest.raises(ShardError, match="different data_shards.create runs"):
        ShardLoader(a / "train", CFG)


def test_run_id_is_deterministic(tmp_path):
    src = image_folder(tmp_path / "src", random_images(10))
    a, b = make_shards(src, tmp_path / "a"), make_shards(src, tmp_path / "b")
    assert read_manifest(a).run_id == read_manifest(b).run_id
    assert read_manifest(a).run_id != read_manifest(make_shards(src, tmp_path / "c", "--limit", "5")).run_id


def set_snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_failed_overwrite_keeps_the_old_train_and_val(tmp_path, monkeypatch, capsys):
    """Anything that stops a run before the swap (here: the swap itself) leaves the old set as it was."""
    src = image_folder(tmp_path / "src", random_images(24, classes=3))
    out = make_shards(src, tmp_path / "out", "--val-fraction", "0.25")
    before = set_snapshot(out)

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(create, "_swap_in", killed)
    with pytest.raises(KeyboardInterrupt):
        create.main([str(src), str(out), "--val-fraction", "0.5", "--seed", "3", "--overwrite", "--workers", "1"])
    assert set_snapshot(out) == before
    assert verify.verify(out / "train") == [] and verify.verify(out / "val") == []
    monkeypatch.undo()
    assert create.main([str(src), str(out), "--val-fraction", "0.5", "--overwrite", "--workers", "1"]) == 0
    assert read_manifest(out / "val").num_samples == 12
    assert not list(tmp_path.glob(".out.incomplete*"))


def test_killed_overwrite_keeps_the_old_set(tmp_path):
    src = image_folder(tmp_path / "src", random_images(200, classes=2, size=48))
    out = make_shards(src, tmp_path / "out", "--val-fraction", "0.1", "--limit", "20")
    before = set_snapshot(out)
    cmd = [sys.executable, "-m", "data_shards.create", str(src), str(out), "--val-fraction", "0.1", "--overwrite",
           "--workers", "1", "--shard-size-mb", "0.02"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / ".out.incomplete" / "new" / "train"
    deadline = time.time() + 60
    while not (staging / "shard-000003.tar").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert set_snapshot(out) == before  # old code had already deleted the old train set here
    assert shared_class_names(out / "train", out / "val") == ["c0", "c1"]
    assert create.main([str(src), str(out), "--val-fraction", "0.1", "--overwrite", "--workers", "1"]) == 0
    assert read_manifest(out / "train").num_samples == 180 and not (tmp_path / ".out.incomplete").exists()


def test_swap_without_rename_exchange(tmp_path, monkeypatch):
    """Where the file system cannot exchange two folders, two renames do it (and a kill in between is undone)."""
    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "not supported")

    monkeypatch.setattr(create, "_exchange", no_exchange)
    src = image_folder(tmp_path / "src", random_images(8))
    out = make_shards(src, tmp_path / "out")
    assert create.main([str(src), str(out), "--overwrite", "--limit", "3", "--workers", "1"]) == 0
    assert read_manifest(out).num_samples == 3 and verify.verify(out) == []
    # A kill between the two renames: OUT is gone, the old set waits in the staging folder.
    staging = tmp_path / ".out.incomplete"
    staging.mkdir()
    out.rename(staging / "old")
    assert create.main([str(src), str(tmp_path / "other"), "--workers", "1"]) == 0  # another OUT: untouched
    assert create.main([str(src), str(out), "--limit", "2", "--workers", "1"]) == 2  # the old set is back: refused
    assert read_manifest(out).num_samples == 3 and not staging.exists()


def test_second_create_into_the_same_out_is_refused(tmp_path, capsys):
    src = image_folder(tmp_path / "src", random_images(4))
    out = tmp_path / "out"
    with open(create.lock_path(out), "a+") as held:  # what a running create holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert create.main([str(src), str(out), "--workers", "1"]) == 2
        assert "another data_shards.create is writing" in capsys.readouterr().err
        assert not out.exists()
    assert create.main([str(src), str(out), "--workers", "1"]) == 0


def test_full_disk_gives_a_clear_message_and_removes_the_staging_folder(tmp_path, monkeypatch, capsys):
    src = image_folder(tmp_path / "src", random_images(12))
    old = make_shards(src, tmp_path / "out", "--limit", "4")
    before = set_snapshot(old)
    writes = []

    def full(self, data):
        writes.append(len(data))
        if len(writes) > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._tar.write(data)

    monkeypatch.setattr(ShardWriter, "_write", full)
    assert create.main([str(src), str(old), "--overwrite", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: no space left on" in err and "needed ~" in err and "MB" in err and "Traceback" not in err
    assert not (tmp_path / ".out.incomplete").exists()
    assert set_snapshot(old) == before


def test_out_holding_other_files_is_never_replaced(tmp_path, capsys):
    src = image_folder(tmp_path / "src", random_images(4))
    out = make_shards(src, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    assert create.main([str(src), str(out), "--overwrite", "--workers", "1"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"


def test_out_that_is_a_file(tmp_path, capsys):
    src = image_folder(tmp_path / "src", random_images(4))
    (tmp_path / "out").write_text("x")
    assert create.main([str(src), str(tmp_path / "out"), "--workers", "1"]) == 2
    assert f"{tmp_path / 'out'}: exists and is not a folder" in capsys.readouterr().err


# --- 4. creation: names, labels and members that used to vanish or crash -----------------------------


def png(i: int = 0) -> bytes:
    return encode(np.full((8, 8, 3), i, np.uint8))


def test_class_folder_whose_name_is_not_utf8_is_refused(tmp_path, capsys):
    src = image_folder(tmp_path / "src", {"good/a.png": png()})
    bad = os.fsencode(src) + b"/caf\xe9"
    os.mkdir(bad)
    with open(bad + b"/b.png", "wb") as f:
        f.write(png(1))
    for extra in ([], ["--strict"]):
        assert create.main([str(src), str(tmp_path / "out"), "--workers", "1", *extra]) == 2
        assert "not valid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_file_whose_name_is_not_utf8_is_skipped_and_reported(tmp_path, capsys):
    src = image_folder(tmp_path / "src", {"a.png": png()})
    with open(os.fsencode(src) + b"/b\xff.png", "wb") as f:
        f.write(png(1))
    out = tmp_path / "out"
    assert create.main([str(src), str(out), "--workers", "1"]) == 0
    assert "b\\xff.png: file name is not valid UTF-8" in capsys.readouterr().err
    assert read_manifest(out).num_samples == 1 and read_manifest(out).skipped == 1
    assert create.main([str(src), str(tmp_path / "strict"), "--workers", "1", "--strict"]) == 1


@pytest.mark.parametrize(
    "rows, message",
    [
        ("a.png,0\nb.png,1000000\n", r"list.csv:2: label 1000000 would make 1000001 classes from 2 file\(s\) \(classes 1\.\.999999 have no file\)"),
        ("a.png,0\nb.png,2\n", r"list.csv:2: label 2 would make 3 classes from 2 file\(s\) \(classes 1 have no file\)"),
    ],
)
def test_integer_labels_beyond_the_number_of_files_are_refused(tmp_path, capsys, rows, message):
    image_folder(tmp_path, {"a.png": png(), "b.png": png(1)})
    (tmp_path / "list.csv").write_text(rows)
    assert create.main([str(tmp_path / "list.csv"), str(tmp_path / "out"), "--workers", "1"]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_same_file_listed_twice_is_stored_once_and_reported(tmp_path, capsys):
    image_folder(tmp_path, {"a.png": png(), "b.png": png(1)})
    (tmp_path / "list.txt").write_text("a.png,x\nb.png,y\n./a.png,x\n")
    out = tmp_path / "out"
    assert create.main([str(tmp_path / "list.txt"), str(out), "--workers", "1"]) == 0
    assert "./a.png: the same file as line 1" in capsys.readouterr().err
    assert read_manifest(out).num_samples == 2
    assert create.main([str(tmp_path / "list.txt"), str(tmp_path / "strict"), "--workers", "1", "--strict"]) == 1


def test_hidden_files_and_dangling_symlinks_are_reported(tmp_path, capsys):
    src = image_folder(tmp_path / "src", {"c0/a.png": png(), "c1/b.png": png(1), "c1/..name.png": png(2),
                                          "c0/.git/objects/x": b"x", "c0/.git/objects/y": b"y"})
    (src / "c0" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "out"
    assert create.main([str(src), str(out), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "c1/..name.png: hidden file" in err
    assert "c0/.git: hidden folder" in err
    assert "c0/gone.png: broken symbolic link" in err
    assert read_manifest(out).num_samples == 2 and read_manifest(out).skipped == 3


def test_tar_members_with_unsafe_paths_are_reported(tmp_path, capsys):
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in {"c0/a.png": png(), "c1/b.png": png(1), "/abs/c.png": png(2), "../up/d.png": png(3),
                           "c0/../../e.png": png(4)}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("c0/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        tar.addfile(link)
    out = tmp_path / "out"
    assert create.main([str(archive), str(out), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    for name in ("/abs/c.png", "../up/d.png", "c0/../../e.png"):
        assert f"{name}: member path is absolute or leaves the archive" in err
    assert "c0/link.png: a link member" in err
    manifest = read_manifest(out)
    assert manifest.class_names == ["c0", "c1"] and manifest.num_samples == 2


def test_list_file_that_is_not_utf8(tmp_path, capsys):
    image_folder(tmp_path, {"a.png": png()})
    (tmp_path / "list.txt").write_bytes(b"a.png,cat\nb\xff.png,dog\n")
    assert create.main([str(tmp_path / "list.txt"), str(tmp_path / "out"), "--workers", "1"]) == 2
    assert "list.txt:2: not UTF-8 text" in capsys.readouterr().err


def exif_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    """A 16 wide x 8 high JPEG with an EXIF orientation tag; the pixels as displayed."""
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif.tobytes(), quality=100)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        from PIL import ImageOps

        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return buf.getvalue(), shown


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_at_creation(tmp_path, orientation):
    data, shown = exif_jpeg(orientation)
    prepared = prepare_image(data)
    assert prepared.converted == (orientation != 1)
    stored = decode_rgb(prepared.data)
    assert (prepared.height, prepared.width) == stored.shape[:2] == shown.shape[:2]
    assert np.abs(stored.astype(int) - shown).mean() < 8
    with Image.open(io.BytesIO(prepared.data)) as im:
        assert im.getexif().get(0x0112, 1) == 1  # nothing left for a reader to rotate again
    # DALI (which honours the tag) and PIL (which does not) now decode the same pixels, and the JSON says so.
    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def dali_decode():
        encoded = fn.external_source(source=lambda: [np.frombuffer(prepared.data, np.uint8)], batch=True)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipe = dali_decode()
    pipe.build()
    assert np.abs(np.asarray(pipe.run()[0].at(0)).astype(int) - stored).max() <= 2
    src = image_folder(tmp_path / "src", {"x.jpg": data})
    out = make_shards(src, tmp_path / "out")
    meta = json.loads(next(iter(shard_samples(out).values()))["json"])
    assert (meta["height"], meta["width"]) == shown.shape[:2]
    assert verify.verify(out) == []
