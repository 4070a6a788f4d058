"""The on-disk shard format: WebDataset tars, one DALI index per tar, and `manifest.json`.

A sample is `KEY.jpg` or `KEY.png`, `KEY.cls` (label, decimal text, when labeled), `KEY.id` (the sample's
index in the shard set, decimal text) and `KEY.json` (source name, size). KEY is the index, zero-padded.
The manifest is written last and atomically: a folder without one holds no complete shard set.

Decimal text (`.cls`, `.id`) is strict: ASCII digits only, no sign, no leading zero (except "0"), and below
its bound (the number of classes, the number of samples). The manifest's `run_id` is shared by the train and
val sets one `create` run writes; a pair whose ids differ is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

FORMAT = "contrastive-shards/1"
MANIFEST = "manifest.json"
IMAGE_EXTS = ("jpg", "png")
SAMPLE_EXTS = (*IMAGE_EXTS, "cls", "id", "json")
INDEX_VERSION = "v1.2"
MAX_DECIMAL_DIGITS = 18  # longest .cls/.id text read (int64 holds every 18-digit number)
_BLOCK = 512


class ShardError(ValueError):
    """A shard set is missing, incomplete or inconsistent (the message names the file)."""


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tar: str
    index: str
    samples: int
    bytes: int
    sha256: str
    first: int  # index of the shard's first sample in the set

    @field_validator("tar", "index")
    @classmethod
    def _inside_the_folder(cls, name: str) -> str:
        """Shards lie in the manifest's own folder: a plain file name, never a path."""
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a file name in the manifest's folder (no paths, no '..', no hidden files)")
        return name


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["contrastive-shards/1"]
    split: str
    num_samples: int
    class_names: list[str] | None
    shards: list[ShardEntry]
    skipped: int
    args: dict
    run_id: str | None = None  # the same in the train and val sets of one create run (None: older sets)


def sample_key(index: int) -> str:
    return f"{index:09d}"


def max_decimal_bytes(limit: int) -> int:
    """Length of the longest canonical decimal text below `limit` (at least 1)."""
    return min(len(str(max(limit - 1, 0))), MAX_DECIMAL_DIGITS)


def decimal_problem(text: bytes, limit: int, what: str = "value") -> str | None:
    """Why `text` is not a canonical decimal integer in [0, limit), or None when it is."""
    if not text or len(text) > MAX_DECIMAL_DIGITS or any(c < 48 or c > 57 for c in text) or (text[0] == 48 and len(text) > 1):
        return f"{what} {text[:40]!r} is not a decimal integer"
    if int(text) >= limit:
        return f"{what} {int(text)} is not in [0, {limit})"
    return None


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644  # fixed metadata: same inputs, same bytes
    return info.tobuf(tarfile.USTAR_FORMAT)


class ShardWriter:
    """Streams samples into `shard-NNNNNN.tar` + `.idx` in `folder`, starting a new shard before one
    would pass `max_bytes`. `close()` returns the finished shards' entries."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.entries: list[ShardEntry] = []
        self._tar = None
        self._count = 0

    def _open(self, first: int) -> None:
        name = f"shard-{len(self.entries):06d}"
        self._names = (f"{name}.tar", f"{name}.idx")
        self._tar = open(self.folder / self._names[0], "wb")
        self._hash, self._lines, self._first, self._pos = hashlib.sha256(), [], first, 0

    def _write(self, data: bytes) -> None:
        self._tar.write(data)
        self._hash.update(data)
        self._pos += len(data)

    def add(self, index: int, members: list[tuple[str, bytes]]) -> None:
        size = sum(_BLOCK + -(-len(d) // _BLOCK) * _BLOCK for _, d in members)
        if self._tar is not None and self._lines and self._pos + size + 2 * _BLOCK > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._open(index)
        key, parts = sample_key(index), []
        for ext, data in members:
            name = f"{key}.{ext}"
            self._write(_tar_header(name, len(data)))
            parts.append(f"{ext} {self._pos} {len(data)} {name}")
            self._write(data + b"\0" * (-len(data) % _BLOCK))
        self._lines.append(" ".join(parts))

    def _finish(self) -> None:
        self._write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
        self._tar.close()
        index_text = f"{INDEX_VERSION} {len(self._lines)}\n" + "\n".join(self._lines) + "\n"
        (self.folder / self._names[1]).write_text(index_text)
        self.entries.append(
            ShardEntry(
                tar=self._names[0], index=self._names[1], samples=len(self._lines),
                bytes=self._pos, sha256=self._hash.hexdigest(), first=self._first,
            )
        )
        self._tar = None

    def close(self) -> list[ShardEntry]:
        if self._tar is not None:
            self._finish()
        return self.entries


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Atomic: readers see the old manifest, or none, or the whole new one."""
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest.model_dump(), indent=1, sort_keys=True) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: str | os.PathLike) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: no such shard folder")
    path = folder / MANIFEST
    if not path.is_file():
        if any(folder.glob("*.tar")):
            raise ShardError(
                f"{path}: missing, though the folder holds tar files: creation did not finish; "
                "run data_shards.create again"
            )
        raise ShardError(f"{folder}: no {MANIFEST}: not a shard folder (make one with python -m data_shards.create)")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in e.errors())
        raise ShardError(f"{path}: {problems}") from None
    if not manifest.shards or manifest.num_samples == 0:
        raise ShardError(f"{path}: the shard set is empty")
    if sum(s.samples for s in manifest.shards) != manifest.num_samples:
        raise ShardError(f"{path}: shard sample counts do not add up to num_samples={manifest.num_samples}")
    return manifest


@dataclass(frozen=True)
class IndexEntry:
    key: str
    members: dict[str, tuple[int, int]]  # ext -> (data offset, size)


def read_index(path: Path) -> list[IndexEntry]:
    """Parse a DALI webdataset index (`v1.2 N`, then `ext offset size name ...` per sample)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ShardError(f"{path}: cannot read index: {e}") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardError(f"{path}: not a DALI {INDEX_VERSION} index (first line {lines[:1]})")
    entries = []
    for lineno, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ShardError(f"{path}:{lineno}: expected groups of 'ext offset size name'")
        members, key = {}, None
        for ext, offset, size, name in zip(*[iter(fields)] * 4):
            key = name[: name.index(".")] if "." in name else name
            members[ext] = (int(offset), int(size))
        entries.append(IndexEntry(key, members))
    if len(entries) != int(head[1]):
        raise ShardError(f"{path}: header says {head[1]} samples, lists {len(entries)}")
    return entries


def check_shard_set(folder: str | os.PathLike) -> Manifest:
    """Fast start-up check: the manifest, and every tar and index it names, are present, whole and agree;
    every sample has one image, a `.cls` exactly when the set is labeled and an `.id`, of lengths their
    bounds allow, and its key is its index (so keys are unique across shards); a train/val sibling written
    beside it belongs to the same run. Reads only manifests, the index files and file sizes; the contents of
    `.cls` and `.id` are checked by the loader as batches arrive."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    labeled = manifest.class_names is not None
    cls_bytes = max_decimal_bytes(len(manifest.class_names)) if labeled else 0
    id_bytes = max_decimal_bytes(manifest.num_samples)
    expected_first = 0
    for shard in manifest.shards:
        tar, idx = folder / shard.tar, folder / shard.index
        if not tar.is_file():
            raise ShardError(f"{tar}: named in {folder / MANIFEST} but missing")
        if tar.stat().st_size != shard.bytes:
            raise ShardError(f"{tar}: {tar.stat().st_size} bytes, the manifest says {shard.bytes}: truncated or replaced")
        if not idx.is_file():
            raise ShardError(f"{idx}: index of {shard.tar} missing")
        if shard.first != expected_first:
            raise ShardError(f"{folder / MANIFEST}: {shard.tar} starts at sample {shard.first}, expected {expected_first}")
        expected_first += shard.samples
        entries = read_index(idx)
        if len(entries) != shard.samples:
            raise ShardError(f"{idx}: {len(entries)} samples, the manifest says {shard.samples}")
        for i, entry in enumerate(entries):
            where = f"{tar}: sample {entry.key}"
            images = [ext for ext in IMAGE_EXTS if ext in entry.members]
            if not images:
                raise ShardError(f"{where} has no image (.jpg or .png)")
            if len(images) > 1:
                raise ShardError(f"{where} has {len(images)} images ({', '.join(images)}); one is expected")
            if entry.key != sample_key(shard.first + i):
                raise ShardError(
                    f"{where}: key should be {sample_key(shard.first + i)} (its index in the set): "
                    "keys are out of order, repeated or foreign"
                )
            for ext, (offset, size) in entry.members.items():
                if offset + size > shard.bytes:
                    raise ShardError(f"{idx}: {entry.key}.{ext} lies past the end of {shard.tar}")
            if "id" not in entry.members:
                raise ShardError(f"{where} has no .id")
            if not 1 <= entry.members["id"][1] <= id_bytes:
                raise ShardError(f"{where}: .id of {entry.members['id'][1]} bytes is not an index in [0, {manifest.num_samples})")
            if labeled and "cls" not in entry.members:
                raise ShardError(f"{where} has no .cls, but the set is labeled")
            if not labeled and "cls" in entry.members:
                raise ShardError(f"{where} has a .cls, but {folder / MANIFEST} has no class names")
            if labeled and not 1 <= entry.members["cls"][1] <= cls_bytes:
                raise ShardError(
                    f"{where}: .cls of {entry.members['cls'][1]} bytes is not a label in [0, {len(manifest.class_names)})"
                )
    _check_sibling(folder, manifest)
    return manifest


_SIBLING = {"train": "val", "val": "train"}


def _check_sibling(folder: Path, manifest: Manifest) -> None:
    """OUT/train and OUT/val, when both are there, must come from one run."""
    if manifest.split not in _SIBLING or folder.name != manifest.split:
        return
    other = folder.parent / _SIBLING[manifest.split] / MANIFEST
    try:
        other_id = json.loads(other.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return  # no sibling (or a broken one, refused when it is opened)
    _check_same_run(folder, manifest.run_id, other.parent, other_id)


def _check_same_run(a: Path, a_id: str | None, b: Path, b_id: str | None) -> None:
    if a_id != b_id:
        raise ShardError(
            f"{a} (run {a_id}) and {b} (run {b_id}) were written by different data_shards.create runs: "
            "the held-out images of one may be training images of the other; create both again in one run"
        )


def shared_class_names(train: str | os.PathLike, val: str | os.PathLike) -> list[str]:
    """The class names of two labeled shard sets whose labels mean the same classes (train/val pairs)."""
    manifests = [read_manifest(folder) for folder in (train, val)]
    names = [m.class_names for m in manifests]
    _check_same_run(Path(train), manifests[0].run_id, Path(val), manifests[1].run_id)
    for folder, found in zip((train, val), names):
        if found is None:
            raise ShardError(f"{folder}: unlabeled shards, where labeled ones are needed")
    if names[0] != names[1]:
        raise ShardError(f"{train} and {val} have different classes; their labels cannot be compared")
    return names[0]


def text_field_problems(folder: str | os.PathLike, manifest: Manifest, limit: int = 10) -> list[str]:
    """Every bad `.cls` or `.id` (not canonical decimal, out of range, an id that repeats), as
    'TAR: key KEY: ...', at most `limit`. Reads those members of every shard: for error messages only."""
    folder = Path(folder)
    num_classes = len(manifest.class_names) if manifest.class_names is not None else None
    problems, seen = [], {}
    for shard in manifest.shards:
        entries = read_index(folder / shard.index)
        with open(folder / shard.tar, "rb") as f:
            for entry in entries:
                fields = {}
                for ext in ("cls", "id"):
                    if ext in entry.members:
                        offset, size = entry.members[ext]
                        f.seek(offset)
                        fields[ext] = f.read(min(size, 64))
                found = []
                if num_classes is not None:
                    found.append(decimal_problem(fields.get("cls", b""), num_classes, "label"))
                id_problem = decimal_problem(fields.get("id", b""), manifest.num_samples, "id")
                found.append(id_problem)
                if id_problem is None:
                    sid = int(fields["id"])
                    if sid in seen:
                        found.append(f"id {sid} repeats that of key {seen[sid]}")
                    seen.setdefault(sid, f"{shard.tar}:{entry.key}")
                problems += [f"{folder / shard.tar}: key {entry.key}: {p}" for p in found if p]
                if len(problems) >= limit:
                    return problems[:limit]
    return problems
