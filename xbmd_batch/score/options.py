"""What `score` can be told besides the four paths (`ScoreOptions`), checked at the library's edge before
anything is read (`check_options`; the CLI's Enums refuse bad vocabulary first), and the crash-test hook that
the environment sets."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xbmd_batch.clinical import REFERENCES
from xbmd_batch.defaults import BACKENDS, DEFAULT_BATCH_SIZE, ENGINES, PRECISIONS, PREPROCESS_DEVICES
from xbmd_batch.errors import InputError

# Test hook: "N" SIGKILLs this process right after the N-th part of a session is written; "N:INT" sends
# SIGINT instead (Ctrl-C). Crash-safety tests only; read once, handed to the PartWriter.
KILL_AFTER_PARTS_ENV = "XBMD_BATCH_TEST_KILL_AFTER_PARTS"


@dataclass(frozen=True)
class ScoreOptions:
    """Everything `score` can be told besides the four paths."""

    backend: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None  # decode processes; None = one per core; 0 = decode in the main process
    chunk_size: int = 1024  # rows per part file (the most an interruption can lose)
    reference: str = "nhanes3-hologic"
    key_column: str | None = None
    path_column: str | None = None
    pseudonymize: Path | None = None  # key file
    strict: bool = False
    quiet: bool = False
    task_size: int = 4  # files per decode task
    max_inflight: int | None = None  # decode tasks queued or running (default 4 per worker)
    header_threads: int = 8
    max_missing: float = 0.2  # a field missing/invalid for more of the subjects to score is an error...
    allow_missing: tuple[str, ...] = ()  # ...unless named here (--allow-missing FIELD)
    follow_symlinks: bool = False  # follow links that leave DIR (links inside DIR are always followed)
    engine_cache: Path | None = None  # TensorRT engines (default $XBMD_ENGINE_CACHE or ~/.cache/...)
    interval: float = 0.9  # central level of bmd_lo/bmd_hi (0.8, 0.9 or 0.95)
    shard: str | None = None  # "K/N": score only shard K of N (xbmd_batch.score.shard)
    preprocess_device: str = "auto"  # where preprocessing finishes: auto (the runner's device) | cpu | cuda
    engine: str = "local"  # "ray": decode tasks + model actors on a Ray cluster (score/ray_engine.py)
    ray_address: str | None = None  # --engine ray: "auto" = the running cluster; None = a local Ray runtime
    ray_actors: int | None = None  # --engine ray: model actors (default: one per GPU, or per 4 CPUs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pseudonymize"] = bool(self.pseudonymize)  # never the key's location
        d["engine_cache"] = os.fspath(self.engine_cache) if self.engine_cache else None
        return d


def default_workers() -> int:
    """One decode process per core this process may use (respects taskset / cgroup CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_options(o: ScoreOptions, dicom_dir: Path, meta_path: Path) -> None:
    if not dicom_dir.is_dir():
        raise InputError(f"{dicom_dir}: DICOM folder does not exist or is not a directory")
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: metadata table not found")
    if o.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1 (got {o.batch_size})")
    if o.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1 (got {o.chunk_size})")
    if o.workers is not None and o.workers < 0:
        raise InputError(f"--workers must be >= 0 (got {o.workers})")
    vocab = (
        ("--backend", o.backend, BACKENDS),
        ("--precision", o.precision, PRECISIONS),
        ("--preprocess-device", o.preprocess_device, PREPROCESS_DEVICES),
    )
    for name, value, allowed in vocab:  # the CLI's Enums refuse these first; library callers get this
        if value not in allowed:
            raise InputError(f"{name} {value!r} is unknown; choose one of {list(allowed)}")
    if o.reference not in REFERENCES:
        raise InputError(f"--reference {o.reference!r} is unknown; choose one of {sorted(REFERENCES)}")
    if o.engine not in ENGINES:
        raise InputError(f"--engine {o.engine!r} is unknown; choose one of {list(ENGINES)}")
    if o.engine == "ray":
        from xbmd_batch.score.ray_engine import require_ray

        require_ray()
    elif o.ray_address or o.ray_actors:
        raise InputError("--ray-address and --ray-actors need --engine ray")
    if o.ray_actors is not None and o.ray_actors < 1:
        raise InputError(f"--ray-actors must be >= 1 (got {o.ray_actors})")
    if o.shard is not None:
        from xbmd_batch.score.shard import parse_shard

        parse_shard(o.shard)
    if not 0.0 <= o.max_missing <= 1.0:
        raise InputError(f"--max-missing must be a share between 0 and 1 (got {o.max_missing})")
    if o.key_column and o.path_column and o.key_column == o.path_column:
        raise InputError("--key-column and --path-column must name different META columns")
    from xbmd_batch.uncertainty import check_level

    try:
        check_level(o.interval)
    except ValueError as e:
        raise InputError(str(e)) from None


def kill_hook_from_env() -> Callable[[int], None] | None:
    """The crash-test hook (KILL_AFTER_PARTS_ENV) as a PartWriter ``after_write`` callback, or None."""
    spec = (os.environ.get(KILL_AFTER_PARTS_ENV, "") or "0").split(":")
    after = int(spec[0] or 0)
    if not after:
        return None
    sig = getattr(signal, f"SIG{spec[1]}") if len(spec) > 1 else signal.SIGKILL

    def hook(n_written: int) -> None:
        if n_written >= after:
            os.kill(os.getpid(), sig)

    return hook
