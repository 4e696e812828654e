"""Stage 1: walk the cohort folder and sort every file into DICOM / non-DICOM / hidden, by content.

Extensions lie (`.dcm` missing, `.DCM`, `IM0001`), so a file is a DICOM when `dicom_io.is_dicom` says so
(Part 10 preamble, or a readable dataset without one). Hidden files (any path component starting with '.')
are never opened: macOS `._*` resource forks and `.DS_Store` look like binary junk and are not images.
Paths are kept relative to the cohort root, sorted, as a compact arrow array (workers share it cheaply).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from xbmd_batch.errors import InputError


@dataclass(frozen=True)
class Discovery:
    """What is on disk under the cohort root. All paths are POSIX, relative to ``root``, sorted."""

    root: Path
    dicom: pa.Array  # large_string
    non_dicom: tuple[str, ...]
    hidden: tuple[str, ...]
    unreadable: tuple[tuple[str, str], ...]  # (path, message): permission errors and the like

    @property
    def n_files(self) -> int:
        return len(self.dicom) + len(self.non_dicom) + len(self.hidden) + len(self.unreadable)


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def walk_files(root: Path) -> list[str]:
    """All regular files under root (symlinks to files followed, symlinked dirs not), relative POSIX paths."""
    out: list[str] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as e:
            raise InputError(f"{d}: cannot list directory: {e.strerror or e}") from e
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif e.is_file(follow_symlinks=True):
                out.append(Path(e.path).relative_to(root).as_posix())
    out.sort()
    return out


def _classify(root: Path, rel: str) -> tuple[str, str]:
    from xbmd_batch import dicom_io

    try:
        return ("dicom" if dicom_io.is_dicom(root / rel) else "non_dicom"), ""
    except OSError as e:
        return "unreadable", f"{type(e).__name__}: {e.strerror or e}"


def discover(root: Path, threads: int = 8) -> Discovery:
    """Walk ``root`` and classify each file by content (I/O-bound, so a thread pool)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: DICOM folder does not exist or is not a directory")
    files = walk_files(root)
    hidden = [f for f in files if _is_hidden(f)]
    visible = [f for f in files if not _is_hidden(f)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        kinds = list(ex.map(lambda r: _classify(root, r), visible, chunksize=64))
    dicom = [f for f, (k, _) in zip(visible, kinds, strict=True) if k == "dicom"]
    return Discovery(
        root=root,
        dicom=pa.array(np.array(dicom, dtype=object), type=pa.large_string())
        if dicom
        else pa.array([], pa.large_string()),
        non_dicom=tuple(f for f, (k, _) in zip(visible, kinds, strict=True) if k == "non_dicom"),
        hidden=tuple(hidden),
        unreadable=tuple((f, m) for f, (k, m) in zip(visible, kinds, strict=True) if k == "unreadable"),
    )
