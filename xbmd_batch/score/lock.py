"""One run per output folder: an exclusive lock on OUT/run.lock, held for the whole `score` session.

``fcntl.flock`` (on Linux NFS it is carried by NFS byte-range locks, so it holds across hosts) is released
by the kernel when the holder exits in any way (normal exit, exception, kill -9), so a lock can never be
left "stuck"; it also conflicts between two opens in one process (tests use that). The file keeps who holds
(or last held) it: pid, host, start time. A second `score` on the same OUT is refused (exit 2) naming that
holder. A lock file whose holder did not release it cleanly (killed) is reported as stale and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from xbmd_batch.errors import InputError

LOCK_NAME = "run.lock"


class OutLockedError(InputError):
    """Another process holds OUT's lock."""


class OutLock:
    """``with OutLock(out_dir) as lk: ...``; ``lk.stale`` describes a previous holder that was killed."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> OutLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM):
                raise  # `score` turns these into an OutputError naming the folder and its free space
            raise InputError(f"{self.path.parent}: cannot create the run lock ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                who = (
                    f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                    f"(started {holder.get('started', '?')})"
                    if holder
                    else "another process"
                )
                raise OutLockedError(
                    f"--out {self.path.parent} is in use by another xbmd-batch score run: {who}. Wait for it "
                    "to finish (or stop it), or use another --out"
                ) from None
            raise InputError(f"{self.path}: cannot lock ({e.strerror or e})") from e
        prev = _read(fd)
        if prev and not prev.get("released", False):
            self.stale = prev
        from xbmd_batch.fsutil import now_iso

        _write(
            fd, {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(), "released": False}
        )
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            info = _read(self._fd)
            info["released"] = True
            _write(self._fd, info)
        except OSError:
            pass  # a full disk must not turn a clean exit into a crash; the kernel still drops the lock
        finally:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        d = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(fd: int, info: dict[str, Any]) -> None:
    data = json.dumps(info).encode()
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.ftruncate(fd, len(data))
