"""One run per --out (issue 13, attack 3.3): an exclusive lock naming its holder; a killed holder is stale."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from xbmd_batch.errors import InputError
from xbmd_batch.score.lock import LOCK_NAME, OutLock, OutLockedError


def test_second_holder_refused_naming_pid_and_host(tmp_path: Path) -> None:
    with OutLock(tmp_path) as first:
        assert first.stale is None
        with pytest.raises(OutLockedError, match=rf"PID {os.getpid()} on host {socket.gethostname()}"):
            OutLock(tmp_path).acquire()
    info = json.loads((tmp_path / LOCK_NAME).read_text())
    assert info["released"] is True
    with OutLock(tmp_path) as again:  # released: free again, not stale
        assert again.stale is None
    assert isinstance(OutLockedError("x"), InputError)  # exit 2 in the CLI


def test_killed_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path: Path) -> None:
    code = (
        "import os, signal, sys; from pathlib import Path; from xbmd_batch.score.lock import OutLock; "
        f"OutLock(Path({str(tmp_path)!r})).acquire(); print(os.getpid(), flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    dead_pid = int(r.stdout.strip())
    with OutLock(tmp_path) as lk:  # the kernel dropped the dead process's lock
        assert lk.stale is not None and lk.stale["pid"] == dead_pid


def test_lock_held_by_another_process_is_refused(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from xbmd_batch.score.lock import OutLock; "
        f"OutLock(Path({str(tmp_path)!r})).acquire(); print('held', flush=True); sys.stdin.read()"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        with pytest.raises(OutLockedError, match=rf"PID {p.pid} "):
            OutLock(tmp_path).acquire()
    finally:
        p.communicate("", timeout=60)
