"""Steps 6-7 of `score --engine local` (the default): the decode pool (started before the model loads, so
decoding overlaps it), the runner, then `ScoringLoop` (batches -> runner -> parts) under a progress bar.

The run is pinned (``pin``) only once the runner has opened the model, so a run refused by the model leaves
no pins. `loop_inputs` (the part buffer over the plan and the encoded META) and `progress_bar` are shared with
the Ray glue (`run_ray.py`), so both engines write the same rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from xbmd_batch.arrowutil import to_arrow
from xbmd_batch.score.decode import DecodePool
from xbmd_batch.score.ingest import Ingested
from xbmd_batch.score.loop import LoopStats, ScoringLoop
from xbmd_batch.score.options import ScoreOptions, default_workers, kill_hook_from_env
from xbmd_batch.score.placement import Placement
from xbmd_batch.score.stopwatch import Stopwatch
from xbmd_batch.score.writer import ChunkBuffer, PartWriter


def run_local(
    model: Any, placement: Placement, dicom_dir: Path, ing: Ingested, ids: dict[str, np.ndarray],
    todo: np.ndarray, file_stats: tuple[np.ndarray, np.ndarray], out_dir: Path, opts: ScoreOptions,
    sw: Stopwatch, console: Any, run: dict[str, Any], pin: Callable[[], dict[str, Any]],
) -> tuple[Any, LoopStats, int]:  # fmt: skip
    """Score the plan rows ``todo`` on this machine; fill run.json's runner/preprocess/session entries in
    ``run``; return the runner (closed), the loop's counts and the number of decode workers."""
    card = model.card
    workers = default_workers() if opts.workers is None else opts.workers
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(decode_pool(dicom_dir, ing.plan.items, card, workers, opts, placement))
        pool.start(todo)
        runner = stack.enter_context(open_runner(model, opts, console))
        finish_device = placement.finish_device(runner)
        run["runner"] = runner.provenance()
        run["preprocess"] = placement.describe(finish_device)
        run["model"]["engine_sha256"] = run["runner"].get("engine_sha256")
        state = pin()  # the run really starts: pin model/META/...
        run["sessions"], run["created"] = len(state["sessions"]), state["created"]
        why = f" - {runner.reason}" if runner.reason else ""
        console.print(f"backend: [bold]{runner.backend}[/] ({runner.precision}){why}")
        line = placement.console_line(finish_device)  # where batches finish, or why auto kept the workers
        if line is not None:
            console.print(line, markup=False)
        j2k = j2k_stage(placement, card, pool, finish_device)
        if j2k is not None:
            console.print(f"JPEG 2000: {placement.j2k_reason}", markup=False)
        sw.lap("model_load")
        loop = scoring_loop(runner, card, ing, ids, out_dir, opts, sw, file_stats, finish_device, j2k)
        progress = progress_bar(console, opts.quiet)
        try:
            with progress:
                stats = loop.run(pool, progress, progress.add_task("scoring", total=len(todo), rate=0.0))
        finally:
            if j2k is not None:
                run["preprocess"]["j2k"] = j2k.describe()
        if stats.upload is not None:  # CUDA finishing: what was page-locked for the uploads, or why not
            run["preprocess"]["upload"] = stats.upload
    return runner, stats, workers


def j2k_stage(placement: Placement, card: Any, pool: DecodePool, finish_device: str | None) -> Any:
    """The GPU JPEG 2000 stage of the loop (score/j2k_device.py) when the plan decoded JPEG 2000 there; its
    CPU fallback is the pool's CPU path in a worker (``DecodePool.decode_now``)."""
    if placement.j2k != "nvimgcodec" or finish_device is None:
        return None
    from xbmd_batch.score.j2k_device import J2KDeviceStage

    return J2KDeviceStage(placement.j2k_decoder, card.preprocess, pool.decode_now, placement.j2k_reason)


def decode_pool(
    dicom_dir: Path, items: pl.DataFrame, card: Any, workers: int, o: ScoreOptions, placement: Placement
) -> DecodePool:
    paths = to_arrow(items.get_column("relative_path"), pa.large_string())
    j2k = "device" if placement.j2k == "nvimgcodec" else "cpu"  # device: workers hand over codestreams
    return DecodePool(
        dicom_dir,
        paths,
        card.preprocess,
        workers,
        o.task_size,
        o.max_inflight,
        handoff=placement.handoff,
        j2k=j2k,
    )


def open_runner(model: Any, o: ScoreOptions, console: Any = None) -> Any:
    """The runner for the already-opened model file (TensorRT takes its parity feeds from us, not synth); an
    engine build prints what it does (miss, build time, parity) through ``console``."""
    from xbmd_batch.infer.select import open_runner
    from xbmd_batch.parity_feeds import make_reference_feeds

    return open_runner(
        model,
        backend=o.backend,
        device=o.device,
        precision=o.precision,
        batch_size=o.batch_size,
        engine_cache_dir=o.engine_cache,
        parity_feeds=make_reference_feeds,
        log=None if console is None else (lambda m: console.print(m, style="dim", markup=False)),
    )


def loop_inputs(
    card: Any,
    ing: Ingested,
    ids: dict[str, np.ndarray],
    backend: str,
    precision: str,
    file_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[ChunkBuffer, np.ndarray, np.ndarray]:
    """The part buffer over this plan (its rows' ids, META flags, file stats) and the encoded META."""
    items, enc = ing.plan.items, ing.encoded
    meta_row = items.get_column("meta_row").to_numpy().astype(np.int64)
    buf = ChunkBuffer(
        ids,
        meta_row,
        items.get_column("image_index_for_subject").to_numpy(),
        items.get_column("n_images_for_subject").to_numpy(),
        np.asarray(enc.missing, dtype=bool),
        np.asarray(enc.derived, dtype=bool),
        card.schema.names,
        backend,
        precision,
        file_stats=file_stats,
    )
    return buf, np.asarray(enc.values, dtype=np.float32), np.asarray(enc.mask, dtype=np.float32)


def scoring_loop(
    runner: Any,
    card: Any,
    ing: Ingested,
    ids: dict[str, np.ndarray],
    out_dir: Path,
    o: ScoreOptions,
    sw: Stopwatch,
    file_stats: tuple[np.ndarray, np.ndarray] | None = None,
    finish_device: str | None = None,
    j2k: Any = None,
) -> ScoringLoop:
    """The loop over this plan: its rows' ids, META encoding and flags, parts under out_dir; ``j2k``: the GPU
    JPEG 2000 stage (``j2k_stage``) or None."""
    buf, values, mask = loop_inputs(card, ing, ids, runner.backend, runner.precision, file_stats)
    writer = PartWriter(out_dir, after_write=kill_hook_from_env())
    return ScoringLoop(
        runner, card, buf, writer, values, mask, buf.meta_row, o.batch_size, o.chunk_size, sw, finish_device,
        j2k=j2k,
    )  # fmt: skip


def progress_bar(console: Any, quiet: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} images/s"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )
