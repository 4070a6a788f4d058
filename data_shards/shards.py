"""The on-disk shard format: WebDataset tars, one DALI index per tar, and `manifest.json`.

A sample is `KEY.jpg` or `KEY.png`, `KEY.cls` (label, decimal text, when labeled), `KEY.id` (the sample's
index in the shard set, decimal text) and `KEY.json` (source name, size). KEY is the index, zero-padded.
The manifest is written last and atomically: a folder without one holds no complete shard set.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

FORMAT = "contrastive-shards/1"
MANIFEST = "manifest.json"
IMAGE_EXTS = ("jpg", "png")
SAMPLE_EXTS = (*IMAGE_EXTS, "cls", "id", "json")
INDEX_VERSION = "v1.2"
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


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["contrastive-shards/1"]
    split: str
    num_samples: int
    class_names: list[str] | None
    shards: list[ShardEntry]
    skipped: int
    args: dict


def sample_key(index: int) -> str:
    return f"{index:09d}"


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
    """Fast start-up check: the manifest, and every tar and index it names, are present, whole and agree.
    Reads only the manifest, the index files and file sizes."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for shard in manifest.shards:
        tar, idx = folder / shard.tar, folder / shard.index
        if not tar.is_file():
            raise ShardError(f"{tar}: named in {folder / MANIFEST} but missing")
        if tar.stat().st_size != shard.bytes:
            raise ShardError(f"{tar}: {tar.stat().st_size} bytes, the manifest says {shard.bytes}: truncated or replaced")
        if not idx.is_file():
            raise ShardError(f"{idx}: index of {shard.tar} missing")
        entries = read_index(idx)
        if len(entries) != shard.samples:
            raise ShardError(f"{idx}: {len(entries)} samples, the manifest says {shard.samples}")
        for entry in entries:
            if not any(ext in entry.members for ext in IMAGE_EXTS):
                raise ShardError(f"{tar}: sample {entry.key} has no image (.jpg or .png)")
            for ext, (offset, size) in entry.members.items():
                if offset + size > shard.bytes:
                    raise ShardError(f"{idx}: {entry.key}.{ext} lies past the end of {shard.tar}")
    return manifest


def shared_class_names(train: str | os.PathLike, val: str | os.PathLike) -> list[str]:
    """The class names of two labeled shard sets whose labels mean the same classes (train/val pairs)."""
    names = [read_manifest(folder).class_names for folder in (train, val)]
    for folder, found in zip((train, val), names):
        if found is None:
            raise ShardError(f"{folder}: unlabeled shards, where labeled ones are needed")
    if names[0] != names[1]:
        raise ShardError(f"{train} and {val} have different classes; their labels cannot be compared")
    return names[0]
