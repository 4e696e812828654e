"""Stage 1: walk the cohort folder; every entry under DIR ends in exactly one bucket, with a reason.

Buckets (``Discovery``): ``dicom`` (to score), ``non_dicom``, ``hidden`` (any path part starting with '.';
never opened: macOS ``._*`` forks and ``.DS_Store`` look like junk), ``unreadable`` (open/list failed, e.g.
permission denied: a failure row, never "non-DICOM"), ``skipped_links`` (symlinks not followed: broken,
loops, directory links, links that leave DIR), ``special`` (FIFOs, sockets, devices: never opened, a FIFO
would block) and ``bad_names`` (DICOMs whose file name is not valid UTF-8: a failure row; the name is shown
with ``\\xNN`` escapes). Directories are containers, not entries, so the bucket counts add up to what
``find DIR ! -type d`` lists.

Symlink policy: a link to a regular file inside DIR is followed (a duplicate of a file scored elsewhere is
caught by its SOPInstanceUID); a link that leaves DIR is listed as skipped and never opened unless
``follow_symlinks`` (``--follow-symlinks``), which also follows directory links that leave DIR (each real
directory at most once). Directory links inside DIR are never followed (their files are scanned where they
live). Paths are kept relative to DIR, sorted, as a compact arrow array (workers share it cheaply).
"""

from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from xbmd_batch.arrowutil import to_arrow
from xbmd_batch.errors import InputError


@dataclass(frozen=True)
class Discovery:
    """What is on disk under the cohort root. All paths are POSIX, relative to ``root``, sorted."""

    root: Path
    dicom: pa.Array  # large_string
    non_dicom: tuple[str, ...]
    hidden: tuple[str, ...]
    unreadable: tuple[tuple[str, str], ...]  # (path, message): permission errors and the like
    skipped_links: tuple[tuple[str, str], ...] = ()  # (path, why not followed)
    special: tuple[tuple[str, str], ...] = ()  # (path, kind): FIFO, socket, device
    bad_names: tuple[tuple[str, str], ...] = ()  # (escaped path, message): DICOMs with non-UTF-8 names
    stats: dict[str, tuple[int, int]] | None = None  # DICOM path -> (size, mtime_ns) seen by the walk

    def stat_of(self, rel: str) -> tuple[int | None, int | None]:
        """(size, mtime_ns) recorded at discovery (resume detects a file changed in place by them)."""
        st = (self.stats or {}).get(rel)
        return (None, None) if st is None else st

    @property
    def n_files(self) -> int:
        return sum(self.bucket_counts().values())

    def bucket_counts(self) -> dict[str, int]:
        return {
            "dicom": len(self.dicom),
            "non_dicom": len(self.non_dicom),
            "hidden": len(self.hidden),
            "unreadable": len(self.unreadable),
            "skipped_links": len(self.skipped_links),
            "special": len(self.special),
            "bad_names": len(self.bad_names),
        }


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def safe_name(rel: str) -> str:
    """A path as valid UTF-8 text: undecodable bytes (surrogate escapes) shown as ``\\xNN``."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


@dataclass
class _Walk:
    files: list[str]
    stats: dict[str, tuple[int, int]]
    hidden: list[str]
    unreadable: list[tuple[str, str]]
    skipped_links: list[tuple[str, str]]
    special: list[tuple[str, str]]


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def walk_entries(root: Path, follow_symlinks: bool = False) -> _Walk:
    """Every non-directory entry under root, sorted into files to open and entries never opened."""
    w = _Walk([], {}, [], [], [], [])
    root_real = os.path.realpath(root)
    try:
        st = os.stat(root)
    except OSError as e:
        raise InputError(f"{root}: cannot open DICOM folder: {e.strerror or e}") from e
    visited = {(st.st_dev, st.st_ino)}
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        d, rel_d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as e:
            if not rel_d:
                raise InputError(f"{root}: cannot list DICOM folder: {e.strerror or e}") from e
            w.unreadable.append((rel_d, f"cannot list directory: {e.strerror or e}"))
            continue
        for e in entries:
            rel = f"{rel_d}/{e.name}" if rel_d else e.name
            try:
                is_link = e.is_symlink()
                mode = e.stat(follow_symlinks=False).st_mode
            except OSError as err:
                w.unreadable.append((rel, f"cannot stat: {err.strerror or err}"))
                continue
            if stat.S_ISDIR(mode):
                visited.add((e.stat(follow_symlinks=False).st_dev, e.inode()))
                stack.append((e.path, rel))
                continue
            if _is_hidden(rel):
                w.hidden.append(rel)
                continue
            if not is_link:
                if stat.S_ISREG(mode):
                    w.files.append(rel)
                    est = e.stat(follow_symlinks=False)
                    w.stats[rel] = (est.st_size, est.st_mtime_ns)
                else:
                    w.special.append((rel, _special_kind(mode)))
                continue
            try:
                tst = os.stat(e.path)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    why = "symlink loop (too many levels of links)"
                elif err.errno in (errno.ENOENT, errno.ENOTDIR):
                    why = "broken symlink (target does not exist)"
                else:
                    why = f"symlink target cannot be reached: {err.strerror or err}"
                w.skipped_links.append((rel, why))
                continue
            inside = _inside(os.path.realpath(e.path), root_real)
            if stat.S_ISDIR(tst.st_mode):
                key = (tst.st_dev, tst.st_ino)
                if inside:
                    w.skipped_links.append(
                        (rel, "directory symlink inside DIR (its files are scanned there)")
                    )
                elif not follow_symlinks:
                    w.skipped_links.append((rel, "directory symlink leaving DIR (use --follow-symlinks)"))
                elif key in visited:
                    w.skipped_links.append((rel, "directory symlink to a folder already scanned"))
                else:
                    visited.add(key)
                    stack.append((e.path, rel))
                continue
            if not inside and not follow_symlinks:
                w.skipped_links.append((rel, "symlink leaving DIR, not opened (use --follow-symlinks)"))
            elif stat.S_ISREG(tst.st_mode):
                w.files.append(rel)
                w.stats[rel] = (tst.st_size, tst.st_mtime_ns)
            else:
                w.special.append((rel, f"symlink to a {_special_kind(tst.st_mode)}"))
    return w


def walk_files(root: Path, follow_symlinks: bool = False) -> list[str]:
    """Regular files (and followed links to them) under root, relative POSIX paths, sorted."""
    return sorted(walk_entries(root, follow_symlinks).files)


def _classify(root: Path, rel: str) -> tuple[str, str]:
    from xbmd_batch import dicom_io

    p = root / rel
    try:
        with open(p, "rb") as fh:  # is_dicom reads "cannot open" as "not DICOM": check access first
            fh.read(1)
        return ("dicom" if dicom_io.is_dicom(p) else "non_dicom"), ""
    except OSError as e:
        return "unreadable", f"cannot read file: {e.strerror or type(e).__name__}"


def discover(root: Path, threads: int = 8, follow_symlinks: bool = False) -> Discovery:
    """Walk ``root`` and classify each file by content (I/O-bound, so a thread pool)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: DICOM folder does not exist or is not a directory")
    w = walk_entries(root, follow_symlinks)
    files = sorted(w.files)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        kinds = list(ex.map(lambda r: _classify(root, r), files, chunksize=64))
    dicom: list[str] = []
    non_dicom: list[str] = []
    unreadable = [(safe_name(r), m) for r, m in w.unreadable]
    bad_names: list[tuple[str, str]] = []
    for f, (k, m) in zip(files, kinds, strict=True):
        shown = safe_name(f)
        if k == "unreadable":
            unreadable.append((shown, m))
        elif k == "non_dicom":
            non_dicom.append(shown)
        elif shown != f:
            bad_names.append((shown, "file name is not valid UTF-8: rename the file to score it"))
        else:
            dicom.append(f)
    return Discovery(
        root=root,
        dicom=to_arrow(dicom, pa.large_string()),
        non_dicom=tuple(non_dicom),
        hidden=tuple(sorted(safe_name(h) for h in w.hidden)),
        unreadable=tuple(sorted(unreadable)),
        skipped_links=tuple(sorted((safe_name(r), m) for r, m in w.skipped_links)),
        special=tuple(sorted((safe_name(r), m) for r, m in w.special)),
        bad_names=tuple(bad_names),
        stats={r: w.stats[r] for r in dicom if r in w.stats},
    )
