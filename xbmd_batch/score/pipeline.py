"""Orchestration of `xbmd-batch score`: `score_cohort` reads as the table of contents of one run.

setup (options, model card, --out, run state) -> stages 1-4 (`ingest`: discover, headers, META join,
reconcile; printed, saved; --strict may stop here) -> what resume leaves to do -> decode pool + runner ->
`ScoringLoop` (batches -> runner -> parts) -> finalize -> run.json. Every finished row reaches a part file
within ``chunk_size`` rows, so an interrupted run loses at most one chunk and the same command resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from xbmd_batch.arrowutil import to_arrow
from xbmd_batch.clinical import REFERENCES
from xbmd_batch.defaults import BACKENDS, DEFAULT_BATCH_SIZE, ENGINES, PRECISIONS, PREPROCESS_DEVICES
from xbmd_batch.errors import EXIT_OK, EXIT_QUARANTINE, EXIT_STRICT, InputError
from xbmd_batch.fsutil import atomic_write_json, now_iso
from xbmd_batch.score import manifest, metacheck, privacy, resume, runstate
from xbmd_batch.score.decode import DecodePool
from xbmd_batch.score.finalize import finalize
from xbmd_batch.score.ingest import Ingested, ingest
from xbmd_batch.score.join import KeySpec
from xbmd_batch.score.lock import OutLock
from xbmd_batch.score.loop import ScoringLoop
from xbmd_batch.score.placement import Placement, plan_preprocess
from xbmd_batch.score.privacy import Pseudonymizer
from xbmd_batch.score.stopwatch import Stopwatch
from xbmd_batch.score.writer import ChunkBuffer, PartWriter

# Test hook: "N" SIGKILLs this process right after the N-th part of a session is written; "N:INT" sends
# SIGINT instead (Ctrl-C). Crash-safety tests only; read once, handed to the PartWriter.
KILL_AFTER_PARTS_ENV = "XBMD_BATCH_TEST_KILL_AFTER_PARTS"
RESUME_KEY = ("relative_path", "sop_instance_uid")  # a row already in a part (output form) is not redone


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


@dataclass
class ScoreResult:
    exit_code: int
    out_dir: Path
    counts: dict[str, int]
    backend: str = ""
    precision: str = ""
    backend_reason: str = ""
    throughput: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    run_id: str = ""
    preprocess_device: str = ""  # where preprocessing finished ("cpu" = the decode workers)


def default_workers() -> int:
    """One decode process per core this process may use (respects taskset / cgroup CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_options(o: ScoreOptions, dicom_dir: Path, meta_path: Path) -> None:
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


def score_cohort(
    dicom_dir: Path, meta_path: Path, model_path: Path, out_dir: Path, options: ScoreOptions | None = None
) -> ScoreResult:
    """Score every matched image under ``dicom_dir``; write only under ``out_dir``; return counts + exit code.

    Raises InputError / ModelFileError for bad inputs (before anything is scored); per-file problems never
    raise, they become failure rows.
    """
    opts = options or ScoreOptions()
    dicom_dir, meta_path, model_path, out_dir = map(Path, (dicom_dir, meta_path, model_path, out_dir))
    _check_options(opts, dicom_dir, meta_path)
    try:
        with _sigterm_as_interrupt(), contextlib.ExitStack() as out_stack:
            return _score(dicom_dir, meta_path, model_path, out_dir, opts, out_stack)
    except OSError as e:  # a full / read-only / unwritable --out: a clear message, and the rerun resumes
        err = runstate.as_output_error(e, out_dir)
        if err is None:
            raise
        raise err from None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Any:
    """SIGTERM (what Slurm/PBS send at the time limit) ends the run like Ctrl-C: the current rows are saved
    as a part, decode workers stop, and the CLI exits 143 saying how to resume."""
    import threading

    from xbmd_batch.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _score(
    dicom_dir: Path, meta_path: Path, model_path: Path, out_dir: Path, opts: ScoreOptions, out_stack: Any
) -> ScoreResult:
    from xbmd_batch.fsutil import sha256_file
    from xbmd_batch.infer.model_file import open_model
    from xbmd_batch.score.cohort_summary import rich_table
    from xbmd_batch.score.summary import final_table, print_tables, reconciliation_table

    console = _console(opts.quiet)
    sw = Stopwatch()

    # setup: everything is validated before --out is touched (a refused run leaves nothing pinned)
    model = open_model(model_path)  # read once: card, sha256, graph/weights (the runner takes it)
    card, model_sha = model.card, model.sha256
    model.release_proto()  # the runner reads the file itself; keeping the parsed weights costs ~their size
    placement = plan_preprocess(
        opts.preprocess_device, card, model.kind, opts.backend, opts.device, opts.engine
    )
    pseudo = Pseudonymizer.from_keyfile(opts.pseudonymize)
    runstate.check_out_dir(out_dir, dicom_dir, meta_path)
    key_spec = KeySpec(opts.key_column, opts.path_column)
    expect = {
        "model_sha256": model_sha,
        "meta_sha256": sha256_file(meta_path),
        "pseudonym_key_fingerprint": pseudo.fingerprint,
        "key_spec": dataclasses.asdict(key_spec),
        "dicom_dir": str(dicom_dir.resolve()),
        "shard": opts.shard.replace(" ", "") if opts.shard else None,
    }
    sw.lap("setup")

    # 1-4. discover, headers, META join, reconcile: before any pixel is decoded; then the per-field
    # missingness check (a clinical column lost for many subjects is an error unless accepted)
    ing = ingest(dicom_dir, meta_path, card.schema, key_spec, opts.header_threads, sw, opts.follow_symlinks)
    meta_report, meta_accepted = metacheck.check_meta(  # on the whole plan: every shard decides alike
        ing.encoded,
        ing.meta,
        ing.plan.items.get_column("meta_row").to_numpy(),
        max_missing=opts.max_missing,
        allow=tuple(opts.allow_missing),
        source=meta_path.name,
    )
    shard_info = None
    if opts.shard:  # keep what this shard owns (the whole plan was built, so decisions match a single run)
        from xbmd_batch.score import shard as shard_mod

        ing.plan, shard_info = shard_mod.restrict_plan(ing.plan, shard_mod.parse_shard(opts.shard))
    plan, join_desc = ing.plan, key_spec.describe(card.schema.subject_key)

    # --out: created and locked only now; an existing run's pins are checked, but a new run is pinned only
    # once the runner has opened the model (below)
    runstate.make_out_dir(out_dir)
    lock = out_stack.enter_context(OutLock(out_dir))
    if lock.stale:
        console.print(
            f"[yellow]note: the previous run on this folder (PID {lock.stale.get('pid')} on "
            f"{lock.stale.get('host')}) ended without releasing its lock (killed?); resuming it[/]"
        )
    state = runstate.read_state(out_dir)
    if state is not None:
        runstate.check_pins(out_dir, state, expect)
    resumed = state is not None
    run_id = state["run_id"] if state is not None else runstate.new_run_id()
    _write_reconciliation(out_dir, run_id, ing, join_desc, pseudo, meta_report, meta_accepted)
    print_tables(console, [reconciliation_table(plan.counts, join_desc)])
    invalid = metacheck.invalid_records(ing.encoded, ing.meta_info, pseudonymized=True)  # console: no text
    print_tables(console, metacheck.meta_tables(meta_report, invalid, ing.meta_info, opts.max_missing))
    for w in [*ing.encoded.warnings, *meta_accepted]:
        console.print(f"[yellow]META: {w}[/]")
    quarantine = privacy.failures_for_output(plan.quarantine, pseudo)
    ids = privacy.ids_for_output(plan.items, pseudo)
    plan_keys = pl.DataFrame(
        {c: ids[c].tolist() for c in RESUME_KEY}, schema=dict.fromkeys(RESUME_KEY, pl.String)
    )
    preview = state or {"sessions": [], "created": now_iso(), "meta_sha256": expect["meta_sha256"]}
    run = manifest.run_manifest(
        run_id, resumed, preview, dicom_dir, meta_path, model_path, model_sha, card, opts, pseudo, plan.counts
    )
    conformal, strata, run["uncertainty"] = _uncertainty(card, ing, opts, console)
    if shard_info is not None:
        shard_mod.save_slice(out_dir, plan_keys, quarantine, shard_info, strata)
        run["shard"] = shard_mod.manifest_entry(shard_info)
    sw.lap("reconcile")

    if opts.strict and plan.n_quarantined:
        finalize(
            out_dir, plan_keys.clear(), quarantine, card.schema.names, opts.reference, model_sha, run_id,
            conformal=conformal, interval=opts.interval, strata=strata,
        )  # fmt: skip
        manifest.write_run_json(out_dir, manifest.refused_strict(run, plan.n_quarantined, sw.timings))
        console.print(
            f"[bold red]--strict: {plan.n_quarantined} input(s) quarantined before scoring; nothing scored. "
            f"See {out_dir / 'failures.parquet'} and reconciliation.json.[/]"
        )
        return ScoreResult(EXIT_STRICT, out_dir, {**plan.counts, "scored": 0}, resumed=resumed, run_id=run_id)

    # 5. what is left to do: resume skips rows already in parts, except transient failures (worker crash,
    # OOM, I/O error) and rows of files changed in place since; unreadable parts are moved aside and redone
    checked = resume.check_parts(out_dir)
    for name, why in checked.moved:
        console.print(
            f"[yellow]part {name} unreadable ({why}): moved to {resume.CORRUPT_DIR}/, rows redone[/]"
        )
    todo, n_redone, file_stats = _todo(plan, ids, ing, out_dir)
    if n_redone:
        console.print(f"resume: {n_redone} row(s) redone (transient failures, or files changed since)")
    plan_keys = plan_keys.with_columns(
        pl.Series("file_size", file_stats[0], pl.Int64), pl.Series("file_mtime_ns", file_stats[1], pl.Int64)
    ).with_columns(pl.when(pl.col(c) >= 0).then(pl.col(c)).alias(c) for c in ("file_size", "file_mtime_ns"))
    sw.lap("reconcile")

    # 6-7. decode pool (starts while the model loads), runner, then the loop: batches -> runner -> parts
    if opts.engine == "ray":  # the same decode, inference and parts on a Ray cluster (score/ray_engine.py)
        runner, stats, workers = _score_on_ray(
            dicom_dir, model_path, model_sha, card, ing, ids, todo, file_stats, out_dir, opts, sw, console,
            run, lambda: runstate.pin(out_dir, state, expect, run_id),
        )  # fmt: skip
        run["preprocess"] = placement.describe(None)
    else:
        workers = default_workers() if opts.workers is None else opts.workers
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(_decode_pool(dicom_dir, plan.items, card, workers, opts, placement))
            pool.start(todo)
            runner = stack.enter_context(_open_runner(model, opts, console))
            finish_device = placement.finish_device(runner)
            run["runner"] = runner.provenance()
            run["preprocess"] = placement.describe(finish_device)
            run["model"]["engine_sha256"] = run["runner"].get("engine_sha256")
            state = runstate.pin(out_dir, state, expect, run_id)  # the run really starts: pin model/META/...
            run["sessions"], run["created"] = len(state["sessions"]), state["created"]
            why = f" - {runner.reason}" if runner.reason else ""
            console.print(f"backend: [bold]{runner.backend}[/] ({runner.precision}){why}")
            if finish_device is not None:
                console.print(f"preprocessing finished on {finish_device} ({placement.reason})")
            sw.lap("model_load")
            loop = _scoring_loop(runner, card, ing, ids, out_dir, opts, sw, file_stats, finish_device)
            progress = _progress(console, opts.quiet)
            with progress:
                stats = loop.run(pool, progress, progress.add_task("scoring", total=len(todo), rate=0.0))
    sw.add("decode_wait", stats.decode_wait_s)
    sw.restart()

    # 8. finalize: parts + plan -> scores.parquet, failures.parquet; then run.json and the summary table
    fin = finalize(
        out_dir, plan_keys, quarantine, card.schema.names, opts.reference, model_sha, run_id,
        conformal=conformal, interval=opts.interval, strata=strata,
    )  # fmt: skip
    sw.lap("finalize")
    result = manifest.result_info(runner, plan, fin, stats, todo, workers, sw.timings, sw.elapsed())
    result["counts"].update(redone_resume=n_redone, corrupt_parts_moved=len(checked.moved))
    manifest.write_run_json(out_dir, {**run, **result})
    synthetic = run["synthetic_cohort"]
    print_tables(console, final_table({**result, "reference": opts.reference, "synthetic": synthetic}))
    print_tables(console, [rich_table(pl.read_parquet(out_dir / "cohort_summary.parquet"), synthetic)])
    quarantined = fin["failures_total"] > 0 or fin["not_processed"] > 0
    return ScoreResult(
        EXIT_QUARANTINE if quarantined else EXIT_OK,
        out_dir,
        result["counts"],
        runner.backend,
        runner.precision,
        runner.reason,
        result["throughput"],
        result["timings_s"],
        resumed,
        run_id,
        run["preprocess"]["device"],
    )


def _score_on_ray(
    dicom_dir: Path, model_path: Path, model_sha: str, card: Any, ing: Ingested, ids: dict[str, np.ndarray],
    todo: np.ndarray, file_stats: Any, out_dir: Path, o: ScoreOptions, sw: Stopwatch, console: Any,
    run: dict[str, Any], pin: Callable[[], dict[str, Any]],
) -> tuple[Any, Any, int]:  # fmt: skip
    """Steps 6-7 on Ray: the driver keeps the plan and writes every part; the run is pinned once the first
    actor has opened the model (as the local engine pins once its runner has)."""
    from xbmd_batch.score import ray_engine

    def started(runner: Any) -> None:
        run["runner"] = runner.info or {"backend": None, "reason": runner.reason}
        run["model"]["engine_sha256"] = run["runner"].get("engine_sha256")
        state = pin()
        run["sessions"], run["created"] = len(state["sessions"]), state["created"]
        why = f" - {runner.reason}" if runner.reason else ""
        console.print(f"backend: [bold]{runner.backend or '-'}[/] ({runner.precision or '-'}) on Ray{why}")
        sw.lap("model_load")

    buf, values, mask = _loop_inputs(card, ing, ids, "", "", file_stats)  # backend: each actor's runner
    paths = to_arrow(ing.plan.items.get_column("relative_path"), pa.large_string())
    progress = _progress(console, o.quiet)
    with progress:
        runner, stats, run["ray"] = ray_engine.score_on_ray(
            opts=o, dicom_dir=dicom_dir, paths=paths, card=card, model_path=model_path,
            model_sha256=model_sha, todo=todo, buf=buf, values=values, mask=mask,
            writer=PartWriter(out_dir, after_write=kill_hook_from_env()), on_start=started,
            progress=progress, task=progress.add_task("scoring (Ray)", total=len(todo), rate=0.0),
        )  # fmt: skip
    sw.add("infer", run["ray"].get("infer_actor_s", 0.0))
    return runner, stats, o.workers or int(run["ray"].get("cluster_cpus", 0))


def _decode_pool(
    dicom_dir: Path, items: pl.DataFrame, card: Any, workers: int, o: ScoreOptions, placement: Placement
) -> DecodePool:
    paths = to_arrow(items.get_column("relative_path"), pa.large_string())
    return DecodePool(
        dicom_dir, paths, card.preprocess, workers, o.task_size, o.max_inflight, handoff=placement.handoff
    )


def _open_runner(model: Any, o: ScoreOptions, console: Any = None) -> Any:
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


def _uncertainty(card: Any, ing: Ingested, o: ScoreOptions, console: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The card's out-of-fold residual model (None when the card has none), the cohort-summary strata and
    run.json's "uncertainty" entry (xbmd_batch.uncertainty, issue 15)."""
    from xbmd_batch.score.cohort_summary import strata_table
    from xbmd_batch.uncertainty import ConditionalConformal

    strata = strata_table(ing.encoded.raw_values, card.schema)
    conformal, why_not = ConditionalConformal.from_training_summary(card.training_summary)
    if conformal is None:
        console.print(f"[yellow]uncertainty: {why_not}[/]")
        return None, strata, {"available": False, "reason": why_not}
    return conformal, strata, {**conformal.describe(o.interval), "available": True}


def _todo(
    plan: Any, ids: dict[str, np.ndarray], ing: Ingested, out_dir: Path
) -> tuple[np.ndarray, int, tuple[np.ndarray, np.ndarray]]:
    """Plan rows to (re)do under the resume rules (score/resume.py), how many of them were redone, and the
    (size, mtime_ns) of each planned file as discovered (-1 unknown)."""
    latest = resume.latest_rows(out_dir)
    stats = [ing.disc.stat_of(r) for r in plan.items.get_column("relative_path").to_list()]
    size = np.array([-1 if st[0] is None else st[0] for st in stats], dtype=np.int64)
    mtime = np.array([-1 if st[1] is None else st[1] for st in stats], dtype=np.int64)
    todo: list[int] = []
    n_redone = 0
    for i, key in enumerate(zip(*(ids[c] for c in RESUME_KEY), strict=True)):
        row = latest.get(key)
        if not resume.is_done(row, int(size[i]), int(mtime[i])):
            todo.append(i)
            n_redone += row is not None
    return np.array(todo, dtype=np.int64), n_redone, (size, mtime)


def _write_reconciliation(
    out_dir: Path,
    run_id: str,
    ing: Ingested,
    join_desc: str,
    pseudo: Pseudonymizer,
    meta_report: list[dict[str, Any]],
    meta_accepted: list[str],
) -> None:
    """OUT/reconciliation.json: the plan's counts and lists, every identifier in output form."""
    recon = {
        "run_id": run_id,
        "created": now_iso(),
        "join": join_desc,
        "pseudonymized": pseudo.enabled,
        "counts": ing.plan.counts,
        **privacy.listed_for_output(ing.plan.listed, pseudo, ing.meta_keys()),
        "metadata_warnings": [*ing.encoded.warnings, *meta_accepted],
        "metadata_table": ing.meta_info.describe(),
        "metadata_missingness": meta_report,
    }
    atomic_write_json(out_dir / "reconciliation.json", recon)


def _loop_inputs(
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


def _scoring_loop(
    runner: Any,
    card: Any,
    ing: Ingested,
    ids: dict[str, np.ndarray],
    out_dir: Path,
    o: ScoreOptions,
    sw: Stopwatch,
    file_stats: tuple[np.ndarray, np.ndarray] | None = None,
    finish_device: str | None = None,
) -> ScoringLoop:
    """The loop over this plan: its rows' ids, META encoding and flags, parts under out_dir."""
    buf, values, mask = _loop_inputs(card, ing, ids, runner.backend, runner.precision, file_stats)
    writer = PartWriter(out_dir, after_write=kill_hook_from_env())
    return ScoringLoop(
        runner, card, buf, writer, values, mask, buf.meta_row, o.batch_size, o.chunk_size, sw, finish_device
    )


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def _progress(console: Any, quiet: bool) -> Any:
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
