"""Small file-system helpers every writer shares: atomic writes, file hashes, UTC timestamps.

Atomic means: the bytes go to a temp file in the destination's folder (same file system, so the rename is
atomic), are fsynced, then ``os.replace``d over the destination and the folder is fsynced. A crash at any
instant leaves either the old file or the new one, never half of one (plus at most a stray ``.*.tmp`` that
readers ignore). Temp files get normal permissions (0666 minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


def now_iso() -> str:
    """UTC now as ``2026-01-31T12:00:00+00:00`` (what every manifest records as created/finished)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (model cards and run manifests identify files by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder so a rename inside it survives a power cut (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_beside(path: str | os.PathLike[str], suffix: str = ".tmp") -> Path:
    """A new empty temp file ``.<name>.<random><suffix>`` in ``path``'s folder, with normal permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def write_synced(path: str | os.PathLike[str], data: bytes) -> None:
    """Write and fsync (a temp file checked before ``commit``; otherwise use atomic_write_bytes)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename a finished, fsynced temp file over ``path`` and fsync the folder."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Atomic write: ``with atomic_open(p) as f: f.write(b)``; on an exception ``p`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Pretty JSON (indent 2, insertion order, ``str()`` for anything JSON cannot hold) plus a newline."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_write_parquet(path: str | os.PathLike[str], table: pa.Table) -> None:
    import pyarrow.parquet as pq

    with atomic_open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")


__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_parquet",
    "commit",
    "fsync_dir",
    "now_iso",
    "sha256_file",
    "temp_beside",
    "write_synced",
]
