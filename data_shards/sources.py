"""What `create` reads: a folder of class folders, a flat folder, a `path[,label]` list, or a tar archive
of such a folder. Every source becomes a sorted list of items whose bytes any worker process can read."""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

LIST_SUFFIXES = (".txt", ".csv", ".lst")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class SourceError(ValueError):
    """The source cannot be read as a whole (the message names it)."""


@dataclass(frozen=True)
class Item:
    name: str  # reported in errors and stored in the sample's JSON
    label: int | None
    path: str  # file to read from
    offset: int = 0  # byte range inside `path` for archive members; size -1 means the whole file
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class Source:
    items: list[Item]
    class_names: list[str] | None  # None: unlabeled


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _from_entries(entries: dict[str, tuple[str, int, int]], where: str) -> Source:
    """entries: relative posix path -> (file, offset, size). Decides between class folders and flat."""
    entries = {rel: loc for rel, loc in entries.items() if not _hidden(rel)}
    if not entries:
        raise SourceError(f"{where}: no files found")
    tops = {rel.split("/", 1)[0] for rel in entries}
    while len(tops) == 1 and all("/" in rel for rel in entries):  # one wrapping folder, e.g. "train/"
        entries = {rel.split("/", 1)[1]: loc for rel, loc in entries.items()}
        tops = {rel.split("/", 1)[0] for rel in entries}
    nested = [rel for rel in entries if "/" in rel]
    if nested and len(nested) != len(entries):
        loose = sorted(rel for rel in entries if "/" not in rel)[:3]
        raise SourceError(f"{where}: mixes class folders with loose files such as {loose}")
    if not nested:
        items = [Item(rel, None, *loc) for rel, loc in sorted(entries.items())]
        return Source(items, None)
    class_names = sorted({rel.split("/", 1)[0] for rel in entries})
    label = {name: i for i, name in enumerate(class_names)}
    items = [Item(rel, label[rel.split("/", 1)[0]], *loc) for rel, loc in sorted(entries.items())]
    return Source(items, class_names)


def _from_folder(root: Path) -> Source:
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            full = Path(dirpath) / fn
            if full.is_file():
                entries[full.relative_to(root).as_posix()] = (str(full), 0, -1)
    return _from_entries(entries, str(root))


def _from_archive(archive: Path, scratch: Path) -> Source:
    """Members are read by byte range, so a compressed archive is first unpacked to one plain tar."""
    path = archive
    if archive.name.endswith((".gz", ".tgz")):
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / "source.tar"
        try:
            with gzip.open(archive, "rb") as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, EOFError) as e:
            raise SourceError(f"{archive}: cannot decompress: {e}") from None
    try:
        with tarfile.open(path, "r:") as tar:
            entries = {
                m.name.removeprefix("./"): (str(path), m.offset_data, m.size) for m in tar if m.isfile()
            }
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"{archive}: broken tar archive: {e}") from None
    return _from_entries(entries, str(archive))


def _from_list(listing: Path) -> Source:
    rows = []
    with open(listing, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if lineno == 1 and row[0].lower() == "path":
                continue  # header
            if len(row) > 2:
                raise SourceError(f"{listing}:{lineno}: expected 'path[,label]', got {len(row)} fields")
            rows.append((lineno, row[0], row[1] if len(row) == 2 and row[1] else None))
    if not rows:
        raise SourceError(f"{listing}: lists no files")
    labeled = {label is not None for _, _, label in rows}
    if len(labeled) > 1:
        first = next(n for n, _, label in rows if label is None)
        raise SourceError(f"{listing}:{first}: some lines have a label and this one has none")
    base = listing.parent
    items_raw = [(lineno, str((base / p) if not os.path.isabs(p) else Path(p)), p, lab) for lineno, p, lab in rows]
    for lineno, full, p, _ in items_raw:
        if not os.path.isfile(full):
            raise SourceError(f"{listing}:{lineno}: no such file {p!r}")
    if labeled == {False}:
        return Source(sorted((Item(p, None, full) for _, full, p, _ in items_raw), key=lambda i: i.name), None)
    labels = [lab for *_, lab in items_raw]
    if all(lab.isdigit() for lab in labels):
        n = max(int(lab) for lab in labels) + 1
        class_names, index = [str(i) for i in range(n)], {str(i): i for i in range(n)}
        index.update({lab: int(lab) for lab in labels})  # "007" -> 7
    else:
        class_names = sorted(set(labels))
        index = {name: i for i, name in enumerate(class_names)}
    items = sorted((Item(p, index[lab], full) for _, full, p, lab in items_raw), key=lambda i: i.name)
    return Source(items, class_names)


def open_source(src: str | os.PathLike, scratch: Path) -> Source:
    """Read the listing of `src`. `scratch` is a private folder for unpacking compressed archives."""
    path = Path(src)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_dir():
        return _from_folder(path)
    if path.name.endswith(ARCHIVE_SUFFIXES):
        return _from_archive(path, scratch)
    if path.name.endswith(LIST_SUFFIXES):
        return _from_list(path)
    raise SourceError(
        f"{path}: not a folder, a list ({', '.join(LIST_SUFFIXES)}) or an archive ({', '.join(ARCHIVE_SUFFIXES)})"
    )
