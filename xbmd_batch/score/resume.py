"""Resume rules: which rows in parts/ count as done, and what to do with a part that cannot be read.

A key (relative_path, sop_instance_uid, in output form) is done when its latest row (parts in number order)
is ``scored``, or ``failed`` for a reason that lies in the file itself (a content failure: the same bytes will
fail again). Failures caused by the run's circumstances are retried by the next session: a decode worker
killed (``worker_crashed``, e.g. by the OOM killer), ``out_of_memory``, an I/O error or a file missing at that
moment. A row whose recorded file size / mtime differs from the file on disk now (an image replaced in
place) is stale: the file is scored again and the new row supersedes it (finalize keeps the latest row).
A part that cannot be read back (truncated, corrupt footer or pages) is moved to ``parts_corrupt/`` and its
rows are scored again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from xbmd_batch.score.writer import list_parts

RESUME_KEY = ("relative_path", "sop_instance_uid")  # a row already in a part (output form) is not redone

TRANSIENT_REASONS = frozenset({"worker_crashed", "out_of_memory", "file_missing", "io_error"})
_TRANSIENT_DECODE_ERRORS = (
    "OSError",
    "IOError",
    "PermissionError",
    "TimeoutError",
    "BrokenProcessPool",
    "MemoryError",
)
CORRUPT_DIR = "parts_corrupt"


def is_transient(reason: str | None) -> bool:
    """True for failures a rerun may not repeat (circumstances), False for content failures (the file)."""
    if reason is None:
        return False
    if reason in TRANSIENT_REASONS:
        return True
    return reason.startswith("decode_error:") and reason.split(":", 1)[1] in _TRANSIENT_DECODE_ERRORS


@dataclass
class PartsCheck:
    moved: list[tuple[str, str]] = field(default_factory=list)  # (part name, why) moved to parts_corrupt/


def check_parts(out_dir: Path) -> PartsCheck:
    """Read every part whole (footer + pages); move unreadable ones aside so their rows are redone."""
    res = PartsCheck()
    for p in list_parts(out_dir):
        try:
            pq.read_table(p)
        except Exception as e:  # noqa: BLE001 - arrow raises several types for a damaged file
            dest_dir = Path(out_dir) / CORRUPT_DIR
            dest_dir.mkdir(exist_ok=True)
            dest = dest_dir / p.name
            n = 1
            while dest.exists():
                dest = dest_dir / f"{p.name}.{n}"
                n += 1
            os.replace(p, dest)
            res.moved.append(
                (p.name, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            )
    return res


def latest_rows(out_dir: Path) -> dict[tuple[str, str], tuple[str, str | None, int | None, int | None]]:
    """key -> (status, reason, file_size, file_mtime_ns) of the latest row for that key in parts/."""
    out: dict[tuple[str, str], tuple[str, str | None, int | None, int | None]] = {}
    for p in list_parts(out_dir):
        names = set(pq.read_schema(p).names)
        cols = ["relative_path", "sop_instance_uid", "status", "reason"]
        stat_cols = [c for c in ("file_size", "file_mtime_ns") if c in names]
        t = pq.read_table(p, columns=cols + stat_cols).to_pydict()
        n = len(t["relative_path"])
        size = t.get("file_size", [None] * n)
        mtime = t.get("file_mtime_ns", [None] * n)
        for i in range(n):
            out[(t["relative_path"][i], t["sop_instance_uid"][i])] = (
                t["status"][i], t["reason"][i], size[i], mtime[i]
            )  # fmt: skip
    return out


def is_done(
    row: tuple[str, str | None, int | None, int | None] | None, size: int | None, mtime_ns: int | None
) -> bool:
    """Whether a key needs no work this session (see the module docstring)."""
    if row is None:
        return False
    status, reason, r_size, r_mtime = row
    if r_size is not None and size is not None and (r_size, r_mtime) != (size, mtime_ns):
        return False  # the file changed in place since that row was written
    return status == "scored" or not is_transient(reason)


def todo_rows(
    plan: Any, ids: dict[str, np.ndarray], ing: Any, out_dir: Path
) -> tuple[np.ndarray, int, tuple[np.ndarray, np.ndarray]]:
    """Plan rows to (re)do under these rules, how many of them were redone, and the (size, mtime_ns) of each
    planned file as discovered (-1 unknown). ``ids``: the plan's ids in output form; ``ing``: its
    `Ingested`."""
    latest = latest_rows(out_dir)
    stats = [ing.disc.stat_of(r) for r in plan.items.get_column("relative_path").to_list()]
    size = np.array([-1 if st[0] is None else st[0] for st in stats], dtype=np.int64)
    mtime = np.array([-1 if st[1] is None else st[1] for st in stats], dtype=np.int64)
    todo: list[int] = []
    n_redone = 0
    for i, key in enumerate(zip(*(ids[c] for c in RESUME_KEY), strict=True)):
        row = latest.get(key)
        if not is_done(row, int(size[i]), int(mtime[i])):
            todo.append(i)
            n_redone += row is not None
    return np.array(todo, dtype=np.int64), n_redone, (size, mtime)
