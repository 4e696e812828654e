"""The output folder's life cycle: check it, lock it, pin the run only once it really starts.

Order in `score` (validate everything, then touch OUT): options, model card, key, META, discovery, headers,
join and the missingness check all run before OUT is created. Then OUT is locked (``lock.OutLock``), an
existing run's pins are checked (``check_pins``: model, META, key, key/path columns, DICOM folder), and only
after the runner has opened the model does ``pin`` write ``run_state.json``. So a run refused for a bad META,
a ``--key-column`` typo or a model the runner rejects leaves nothing pinned: fix it and rerun.

Disk problems writing OUT (full, read-only, permission, quota) become ``OutputError`` (exit 2) naming the
folder and its free space; every part already written stays, so the same command resumes.
"""

from __future__ import annotations

import errno
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from xbmd_batch.errors import InputError, ModelFileError, OutputError
from xbmd_batch.fsutil import atomic_write_json, now_iso
from xbmd_batch.score.lock import LOCK_NAME
from xbmd_batch.score.writer import STATE_FORMAT, STATE_VERSION

STATE_NAME = "run_state.json"
_OURS = (STATE_NAME, LOCK_NAME)


def check_out_dir(out_dir: Path, dicom_dir: Path, meta_path: Path) -> None:
    """Refuse an --out that would be scanned as input or overwrite someone else's files (creates nothing).

    A folder is ours when it holds run_state.json or run.lock (the lock is the first thing `score` writes).
    """
    out_r, dicom_r = Path(out_dir).resolve(), Path(dicom_dir).resolve()
    if out_r == dicom_r or dicom_r in out_r.parents:
        raise InputError(
            f"--out {out_dir} is inside the DICOM folder {dicom_dir}; choose a folder outside it"
        )
    if out_r == Path(meta_path).resolve():
        raise InputError(f"--out {out_dir} is the META file")
    if out_r.exists() and not out_r.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a folder")
    if out_r.is_dir() and any(out_r.iterdir()) and not any((out_r / n).is_file() for n in _OURS):
        raise InputError(
            f"--out {out_dir} is not empty and holds no run_state.json (not an xbmd-batch score output); "
            "choose a new or empty folder"
        )


def make_out_dir(out_dir: Path) -> None:
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise as_output_error(e, out_dir) or InputError(
            f"--out {out_dir}: cannot create ({e.strerror})"
        ) from e


def read_state(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable run state ({e}); move the folder aside or delete it") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"{path}: not an xbmd-batch run state")
    return state


def check_pins(out_dir: Path, state: dict[str, Any], expect: dict[str, Any]) -> None:
    """Refuse to resume a run with another model / META / key / key options / DICOM folder."""
    if state.get("model_sha256") != expect["model_sha256"]:
        raise ModelFileError(
            f"{out_dir} holds a run of model sha256 {str(state.get('model_sha256', '?'))[:16]}..., but "
            f"--model has sha256 {expect['model_sha256'][:16]}...; resume with the same model file or use a "
            "new --out"
        )
    labels = {
        "meta_sha256": "the META file changed since this run started",
        "pseudonym_key_fingerprint": "--pseudonymize key differs from this run's (or was added/removed)",
        "key_spec": "--key-column / --path-column differ from this run's",
        "shard": "--shard differs from this run's (each shard needs its own --out)",
    }
    for k, why in labels.items():
        if state.get(k) != expect.get(k):
            raise InputError(f"{out_dir}: cannot resume: {why}; use the original options or a new --out")
    if state.get("dicom_dir") not in (None, expect.get("dicom_dir")):
        raise InputError(
            f"{out_dir}: cannot resume: this run scored the DICOM folder {state['dicom_dir']}, not "
            f"{expect.get('dicom_dir')}; use the original DICOM folder or a new --out"
        )


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def pin(out_dir: Path, state: dict[str, Any] | None, expect: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Write run_state.json: a new run's pins, or one more session of an existing run."""
    if state is None:
        state = {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "run_id": run_id,
            "created": now_iso(),
            **expect,
            "sessions": [],
        }
    state.setdefault("dicom_dir", expect.get("dicom_dir"))
    state.setdefault("sessions", []).append({"started": now_iso()})
    atomic_write_json(Path(out_dir) / STATE_NAME, state)
    return state


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def as_output_error(e: BaseException, out_dir: Path) -> OutputError | None:
    """A write failure under OUT as a clear OutputError (or None when ``e`` is something else)."""
    if not isinstance(e, OSError):
        return None
    text = str(e).lower()
    code = e.errno
    if code is None:  # pyarrow raises OSError without errno; its text names the cause
        for c, words in ((errno.ENOSPC, "no space left"), (errno.EROFS, "read-only file system"),
                         (errno.EDQUOT, "quota exceeded"), (errno.EACCES, "permission denied")):  # fmt: skip
            if words in text:
                code = c
    if code not in _DISK_ERRNOS:
        return None
    if code in (errno.EACCES, errno.EPERM) and e.filename is not None:
        try:
            Path(str(e.filename)).resolve().relative_to(Path(out_dir).resolve())
        except ValueError:
            return None  # a permission problem elsewhere (DIR, META) is not about OUT
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EFBIG: "file too large for the file system"}.get(
        code, "permission denied")  # fmt: skip
    free = _free(out_dir)
    return OutputError(
        f"cannot write to --out {out_dir}: {what}{free}. Every part already written is kept: "
        f"{'free some space' if code in (errno.ENOSPC, errno.EDQUOT) else 'make the folder writable'} "
        "(or choose another --out) and rerun the same command to resume"
    )


def _free(out_dir: Path) -> str:
    p = Path(out_dir)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        u = shutil.disk_usage(p)
    except OSError:
        return ""
    return f" (free there: {u.free / 2**20:,.1f} MiB of {u.total / 2**30:,.1f} GiB)"
