"""`score --engine ray`: stages 5-7 on a Ray cluster (Ray Data), with the local engine's own functions.

The driver (``pipeline.py``, glued here by ``run_ray.py``) builds the plan, the resume to-do list and the part
buffer exactly as for a local run; this module only moves the work. A Ray Dataset of the plan indices to do ->
``map_batches(decode_rows)``: CPU tasks running ``decode.decode_task`` (decode + preprocess, what the local
process pool runs) -> ``map_batches(ScoreActor)``: an actor pool; each actor opens the model once with
``infer.select.open_runner`` and books every batch with a local ``ScoringLoop`` (``add_decode_failures``,
``score_batch``: the same per-image retry, non-finite checks and part rows) and returns the rows as a
part-schema table -> the driver, which alone writes parts (``PartWriter``). A task or actor that Ray retries
returns its rows once, and nothing but the driver writes, so no row is duplicated; the pipeline then runs the
same ``finalize``. This module is the driver's side; the tasks and actors live in ``ray_tasks.py``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xbmd_batch.errors import InputError, XbmdError
from xbmd_batch.score.loop import LoopStats
from xbmd_batch.score.ray_tasks import Attempts, ScoreActor, decode_rows, replay
from xbmd_batch.score.writer import ChunkBuffer, PartWriter

# Test hook: a marker file path. The first actor batch that finds the file absent creates it and kills its
# own actor process (as a segfault or OOM kill would); Ray restarts the actor and retries the batch.
KILL_ACTOR_ONCE_ENV = "XBMD_BATCH_TEST_RAY_KILL_ONCE"
KILL_DECODE_ONCE_ENV = "XBMD_BATCH_TEST_RAY_KILL_DECODE_ONCE"  # the same for the first decode batch
_RAY_RETRY_NOTE = "\nFailed to apply UDF transform"
CPUS_PER_CPU_ACTOR = 4  # sizing rule without GPUs: one model actor per 4 CPUs (decode is the bottleneck)


def require_ray() -> None:
    """InputError (exit 2, before --out is touched) when Ray Data is not installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise InputError("--engine ray needs Ray Data: pip install 'xbmd-batch[ray]'")


@dataclass
class RayRunner:
    """What the driver knows of the actors' runner (run.json and the summary read these fields)."""

    backend: str = ""
    precision: str = ""
    reason: str = ""
    info: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, text: str) -> RayRunner:
        d = json.loads(text)
        return cls(d.get("backend", ""), d.get("precision", ""), d.get("backend_reason", ""), d)


def connect(address: str | None) -> Any:
    """``ray`` connected to ``address`` ("auto": the running cluster; None: a local runtime), quietly."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the pipeline's own progress bar counts rows
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # a UDF's own exception, not a UserCodeException wrapper
    return ray


def n_actors(resources: dict[str, float], requested: int | None) -> tuple[int, int]:
    """(model actors, GPUs per actor): one actor per GPU, or without GPUs one per 4 CPUs (at least one).

    Every actor holds one CPU for its lifetime and decode tasks need the rest: without GPUs, actors that
    would take every CPU (decode could never be scheduled: a hang) are refused."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus:
        return requested or gpus, 1
    actors = requested or max(1, cpus // CPUS_PER_CPU_ACTOR)
    if cpus < 2:
        raise InputError(f"--engine ray: this Ray cluster has {cpus} CPU(s) and no GPU; it needs at least 2")
    if actors >= cpus:
        raise InputError(
            f"--engine ray: {actors} model actor(s) would hold all {cpus} CPU(s) of this Ray cluster (one "
            f"each), leaving none for the decode tasks; use --ray-actors {max(1, cpus - 1)} or fewer, or a "
            f"cluster with more CPUs (or GPUs)"
        )
    return actors, 0


def _decode_task_args() -> dict[str, Any]:
    return {"num_cpus": 1}


def _dataset(ray: Any, todo: np.ndarray, cpus: int, task_size: int) -> Any:
    """Plan indices in blocks of whole decode tasks: ~4 blocks per CPU (at most 4096 indices per block)."""
    n_tasks = -(-len(todo) // task_size)
    n_blocks = max(4 * cpus, -(-len(todo) // 4096))
    per_block = task_size * max(1, -(-n_tasks // n_blocks))
    blocks = [pa.table({"idx": pa.array(todo[i : i + per_block])}) for i in range(0, len(todo), per_block)]
    return ray.data.from_arrow(blocks)


def _xbmd_cause(e: BaseException) -> XbmdError | None:
    """The project error a Ray task/actor raised (Ray wraps it: the innermost one), so that the caller sees
    the local engine's exception and exit code."""
    seen: set[int] = set()
    found: XbmdError | None = None
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, XbmdError):
            found = cur
        seen.add(id(cur))
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    if found is not None and len(found.args) == 1 and isinstance(found.args[0], str):
        found.args = (found.args[0].split(_RAY_RETRY_NOTE)[0],)  # Ray Data appends its retry advice
    return found


def score_on_ray(
    *,
    opts: Any,
    dicom_dir: Path,
    paths: pa.Array,
    card: Any,
    model_path: Path,
    model_sha256: str,
    todo: np.ndarray,
    buf: ChunkBuffer,
    values: np.ndarray,
    mask: np.ndarray,
    writer: PartWriter,
    on_start: Callable[[RayRunner], None],
    progress: Any = None,
    task: Any = None,
) -> tuple[RayRunner, LoopStats, dict[str, Any]]:
    """Score ``todo`` (plan indices) on Ray; parts written here; ``on_start`` runs once the first actor has
    opened the model (the run really starts). Returns the actors' runner, the session stats and run.json's
    "ray" entry (cluster resources, actors, timings)."""
    stats, t0 = LoopStats(), time.perf_counter()
    todo = np.asarray(todo, dtype=np.int64)
    if not len(todo):  # nothing left (a resumed, finished run): Ray is not even started
        runner = RayRunner(reason="nothing left to score: Ray was not started")
        on_start(runner)
        return runner, stats, {"started": False}
    ray = connect(opts.ray_address)
    resources = ray.cluster_resources()
    actors, gpus_per_actor = n_actors(resources, opts.ray_actors)
    info: dict[str, Any] = {
        "started": True,
        "address": opts.ray_address,
        "ray_version": ray.__version__,
        "cluster_cpus": resources.get("CPU", 0),
        "cluster_gpus": resources.get("GPU", 0),
        "actors": actors,
        "gpus_per_actor": gpus_per_actor,
        "decode_tasks_max": opts.workers,
        "startup_s": round(time.perf_counter() - t0, 3),
    }
    ds = _dataset(ray, todo, int(resources.get("CPU", 1)), opts.task_size)
    with warnings.catch_warnings():  # deprecated in Ray 2.60 (removed in 2.64; the extra pins 2.60.0)
        warnings.simplefilter("ignore")
        # a ray_remote_args_fn keeps decode a pool of CPU tasks: without one, Ray Data fuses decode into the
        # model actors (equal remote args on CPU), so decode would run only as many at a time as there are
        # actors (measured: 0.083x the local engine's throughput)
        ds = ds.map_batches(
            decode_rows,
            batch_size=opts.task_size,
            batch_format="numpy",
            fn_kwargs={
                "root": str(dicom_dir),
                "paths": paths,
                "cfg": card.preprocess.to_dict(),
                "attempts": ray.remote(num_cpus=0)(Attempts).remote(),
                "crash_marker": os.environ.get(KILL_DECODE_ONCE_ENV) or None,
            },  # fmt: skip
            compute=ray.data.TaskPoolStrategy(size=opts.workers or None),
            ray_remote_args_fn=_decode_task_args,
        )
    ds = ds.map_batches(
        ScoreActor,
        batch_size=opts.batch_size,
        batch_format="numpy",
        zero_copy_batch=True,
        fn_constructor_kwargs={
            "model_path": str(Path(model_path).resolve()),
            "model_sha256": model_sha256,
            "runner_kwargs": {
                "backend": opts.backend,
                "device": opts.device,
                "precision": opts.precision,
                "batch_size": opts.batch_size,
                "engine_cache_dir": opts.engine_cache,
            },
            "meta_row": ray.put(np.asarray(buf.meta_row, dtype=np.int64)),
            "values": ray.put(values),
            "mask": ray.put(mask),
            "batch_size": opts.batch_size,
            "kill_marker": os.environ.get(KILL_ACTOR_ONCE_ENV) or None,
        },  # fmt: skip
        compute=ray.data.ActorPoolStrategy(size=actors),  # a dead actor is restarted, its batch retried
        num_cpus=1,
        num_gpus=gpus_per_actor,
    )
    try:
        runner, timing = _drive(ds, buf, writer, opts.chunk_size, on_start, stats, progress, task, t0)
    except Exception as e:
        cause = _xbmd_cause(e)
        if cause is not None and cause is not e:
            raise cause from None
        raise
    info.update(timing)
    return runner, stats, info


def _drive(
    ds: Any,
    buf: ChunkBuffer,
    writer: PartWriter,
    chunk_size: int,
    on_start: Callable[[RayRunner], None],
    stats: LoopStats,
    progress: Any,
    task: Any,
    t0: float,
) -> tuple[RayRunner, dict[str, Any]]:
    """Book the actors' rows into ``buf`` (as the local loop books its own) and write a part every
    ``chunk_size`` rows; on any exception (Ctrl-C included) the rows already booked are written first."""
    runner: RayRunner | None = None
    infer_s, first_s, first_rows, redone = 0.0, 0.0, 0, 0

    def write() -> None:
        table = buf.take()
        if table is not None:
            writer.write(table)
            stats.parts += 1

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if runner is None:  # the first rows: Ray start-up + the first actor's model load are behind us
                runner = RayRunner.from_json(str(batch["_runner"][0]))
                buf.backend, buf.precision = runner.backend, runner.precision  # the part rows' columns
                on_start(runner)
                first_s, first_rows = time.perf_counter() - t0, len(batch["idx"])
            stats.decode_worker_s += float(np.sum(batch["_decode_s"]))
            infer_s += float(np.sum(batch["_infer_s"]))
            redone += int(np.sum(batch["_redone"]))
            n, n_scored = len(batch["idx"]), replay(batch, buf)
            stats.scored, stats.failed, stats.images = (
                stats.scored + n_scored,
                stats.failed + n - n_scored,
                stats.images + n,
            )
            if progress is not None:
                el = time.perf_counter() - t0
                progress.update(task, completed=stats.images, rate=stats.images / el if el > 0 else 0.0)
            if buf.n_rows >= chunk_size:
                write()
        write()
    except BaseException:
        write()  # keep every row already received (atomic part), then stop
        raise
    finally:
        stats.loop_s = time.perf_counter() - t0
    assert runner is not None
    return runner, {"infer_actor_s": round(infer_s, 3), "first_rows_after_s": round(first_s, 3),
                    "first_rows": first_rows, "decode_batches_redone_file_by_file": redone}  # fmt: skip
