"""What `create` reads: a folder of class folders, a flat folder, a `path[,label]` list, or a tar archive
of such a folder. Every source becomes a sorted list of items whose bytes any worker process can read.

Nothing is dropped without a word: hidden files and folders, broken symbolic links, links and unsafe paths
inside archives, file names that are not UTF-8 and files listed twice go into `Source.skipped` with their
path and the reason. A class folder whose name is not UTF-8, an integer label that would make more classes
than there are files, and a list that is not UTF-8 text refuse the whole source (SourceError)."""

from __future__ import annotations

import csv
import gzip
import io
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of files not used


def shown(name: str) -> str:
    """A path for messages and metadata: bytes that are not UTF-8 appear as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return False


def _drop_hidden(entries: dict[str, tuple], skipped: list[tuple[str, str]]) -> dict[str, tuple]:
    """Leave out hidden files, and everything in hidden folders (reported once per folder)."""
    kept, folders = {}, {}
    for rel, loc in entries.items():
        parts = rel.split("/")
        hidden = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if hidden is None:
            kept[rel] = loc
        elif hidden == len(parts) - 1:
            skipped.append((shown(rel), "hidden file (its name starts with '.'), not used"))
        else:
            folder = "/".join(parts[: hidden + 1])
            folders[folder] = folders.get(folder, 0) + 1
    skipped += [(shown(f), f"hidden folder ({n} file(s) inside), not used") for f, n in folders.items()]
    return kept


def _from_entries(entries: dict[str, tuple[str, int, int]], where: str, skipped: list[tuple[str, str]]) -> Source:
    """entries: relative posix path -> (file, offset, size). Decides between class folders and flat."""
    entries = _drop_hidden(entries, skipped)
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
    if nested:
        bad = sorted({rel.split("/", 1)[0] for rel in entries if not _utf8(rel.split("/", 1)[0])})
        if bad:
            raise SourceError(
                f"{where}: class folder {shown(bad[0])!r} ({len(bad)} in all) has a name that is not valid UTF-8; "
                "class names are stored as text: rename it"
            )
    for rel in [rel for rel in entries if not _utf8(rel)]:
        skipped.append((shown(rel), "file name is not valid UTF-8; rename it to use it"))
        del entries[rel]
    if not nested:
        items = [Item(rel, None, *loc) for rel, loc in sorted(entries.items())]
        return Source(items, None, skipped)
    class_names = sorted({rel.split("/", 1)[0] for rel in entries})
    label = {name: i for i, name in enumerate(class_names)}
    items = [Item(rel, label[rel.split("/", 1)[0]], *loc) for rel, loc in sorted(entries.items())]
    return Source(items, class_names, skipped)


def _from_folder(root: Path) -> Source:
    entries, skipped, seen = {}, [], {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for d in list(dirnames):
            rel = (Path(dirpath) / d).relative_to(root).as_posix()
            if (Path(dirpath) / d).is_symlink():
                skipped.append((shown(rel), "symbolic link to a folder, not followed"))
                dirnames.remove(d)
            elif d.startswith("."):
                skipped.append((shown(rel), "hidden folder (its name starts with '.'), not used"))
                dirnames.remove(d)
        for fn in sorted(filenames):
            full = Path(dirpath) / fn
            rel = full.relative_to(root).as_posix()
            try:
                st = full.stat()
            except OSError as e:
                why = "broken symbolic link" if full.is_symlink() else f"cannot be read: {e.strerror}"
                skipped.append((shown(rel), why))
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped.append((shown(rel), "not a regular file"))
            elif fn.startswith("."):
                entries[rel] = (str(full), 0, -1)  # reported as hidden by _from_entries
            elif (st.st_dev, st.st_ino) in seen:
                skipped.append((shown(rel), f"the same file as {shown(seen[st.st_dev, st.st_ino])} (a link), stored once"))
            else:
                seen.setdefault((st.st_dev, st.st_ino), rel)
                entries[rel] = (str(full), 0, -1)
    return _from_entries(entries, str(root), skipped)


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
    entries, skipped = {}, []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isdir():
                    continue
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if not m.isfile():
                    why = "a link member, not used" if m.issym() or m.islnk() else "not a regular file member"
                    skipped.append((shown(m.name), why))
                elif m.name.startswith("/") or ".." in parts or not parts:
                    skipped.append((shown(m.name), "member path is absolute or leaves the archive ('..'), not used"))
                elif "/".join(parts) in entries:
                    skipped.append((shown(m.name), "appears twice in the archive; the first is used"))
                else:
                    entries["/".join(parts)] = (str(path), m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"{archive}: broken tar archive: {e}") from None
    return _from_entries(entries, str(archive), skipped)


def _ranges(numbers: list[int], most: int = 5) -> str:
    """[1, 2, 3, 7] -> '1..3, 7'."""
    runs, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            runs.append(str(start) if start == n else f"{start}..{n}")
            start = None
    return ", ".join(runs[:most]) + (", ..." if len(runs) > most else "")


def _read_text(listing: Path) -> str:
    data = listing.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SourceError(f"{listing}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the list as UTF-8") from None


def _from_list(listing: Path) -> Source:
    rows = []
    try:
        text = _read_text(listing)
    except OSError as e:
        raise SourceError(f"{listing}: cannot read: {e.strerror}") from None
    for lineno, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
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
    skipped, first_line, unique = [], {}, []
    for row in items_raw:
        lineno, full, p, _ = row
        if not os.path.isfile(full):
            raise SourceError(f"{listing}:{lineno}: no such file {p!r}")
        real = os.path.realpath(full)
        if real in first_line:
            skipped.append((p, f"the same file as line {first_line[real]} ({listing.name}:{lineno}), stored once"))
        else:
            first_line[real] = lineno
            unique.append(row)
    items_raw = unique
    if labeled == {False}:
        return Source(sorted((Item(p, None, full) for _, full, p, _ in items_raw), key=lambda i: i.name), None, skipped)
    labels = [lab for *_, lab in items_raw]
    if all(lab.isascii() and lab.isdigit() for lab in labels):
        n = max(int(lab) for lab in labels) + 1
        if n > len(labels):  # C classes need at least C files: a label this large names classes with none
            line = next(lineno for lineno, *_, lab in items_raw if int(lab) == n - 1)
            empty = sorted(set(range(n)) - {int(lab) for lab in labels})
            raise SourceError(
                f"{listing}:{line}: label {n - 1} would make {n} classes from {len(labels)} file(s) "
                f"(classes {_ranges(empty)} have no file): integer labels number the classes 0..C-1 "
                "(or use class names)"
            )
        class_names, index = [str(i) for i in range(n)], {str(i): i for i in range(n)}
        index.update({lab: int(lab) for lab in labels})  # "007" -> 7
    else:
        class_names = sorted(set(labels))
        index = {name: i for i, name in enumerate(class_names)}
    items = sorted((Item(p, index[lab], full) for _, full, p, lab in items_raw), key=lambda i: i.name)
    return Source(items, class_names, skipped)


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
