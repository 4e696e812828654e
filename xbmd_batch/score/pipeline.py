"""Orchestration of `xbmd-batch score`: `score_cohort` reads as the table of contents of one run.

setup (options, model card, --out, run state) -> stages 1-4 (`ingest`: discover, headers, META join,
reconcile; printed, saved; --strict may stop here) -> what resume leaves to do -> decode pool + runner ->
`ScoringLoop` (batches -> runner -> parts) -> finalize -> run.json. Every finished row reaches a part file
within ``chunk_size`` rows, so an interrupted run loses at most one chunk and the same command resumes it.

The steps live in their own modules: `options` (ScoreOptions, checked before anything is read), `run_local`
(decode pool + runner + loop) or `run_ray` (the same on a Ray cluster), `outputs` (reconciliation.json,
run.json, the summary tables, ScoreResult). Their public names stay importable from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from pathlib import Path
from typing import Any

import polars as pl

from xbmd_batch.errors import EXIT_OK, EXIT_QUARANTINE, EXIT_STRICT
from xbmd_batch.fsutil import now_iso
from xbmd_batch.score import manifest, metacheck, outputs, privacy, resume, runstate
from xbmd_batch.score.finalize import finalize
from xbmd_batch.score.ingest import ingest
from xbmd_batch.score.join import KeySpec
from xbmd_batch.score.lock import OutLock
from xbmd_batch.score.options import (
    KILL_AFTER_PARTS_ENV,
    ScoreOptions,
    check_options,
    default_workers,
    kill_hook_from_env,
)
from xbmd_batch.score.outputs import ScoreResult
from xbmd_batch.score.placement import plan_j2k, plan_preprocess
from xbmd_batch.score.privacy import Pseudonymizer
from xbmd_batch.score.resume import RESUME_KEY
from xbmd_batch.score.run_local import run_local
from xbmd_batch.score.stopwatch import Stopwatch

__all__ = [
    "EXIT_OK",
    "EXIT_QUARANTINE",
    "EXIT_STRICT",
    "KILL_AFTER_PARTS_ENV",
    "RESUME_KEY",
    "ScoreOptions",
    "ScoreResult",
    "default_workers",
    "kill_hook_from_env",
    "score_cohort",
]


def score_cohort(
    dicom_dir: Path, meta_path: Path, model_path: Path, out_dir: Path, options: ScoreOptions | None = None
) -> ScoreResult:
    """Score every matched image under ``dicom_dir``; write only under ``out_dir``; return counts + exit code.

    Raises InputError / ModelFileError for bad inputs (before anything is scored); per-file problems never
    raise, they become failure rows.
    """
    opts = options or ScoreOptions()
    dicom_dir, meta_path, model_path, out_dir = map(Path, (dicom_dir, meta_path, model_path, out_dir))
    check_options(opts, dicom_dir, meta_path)
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
    from xbmd_batch.score.summary import print_tables, reconciliation_table

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
    # which decoder takes JPEG 2000 (the transfer syntaxes are known now; --out does not exist yet)
    placement = plan_j2k(
        placement, _count_j2k(plan.items), card, model.kind, opts.backend, opts.device, opts.engine
    )

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
    outputs.write_reconciliation(out_dir, run_id, ing, join_desc, pseudo, meta_report, meta_accepted)
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
    conformal, strata, run["uncertainty"] = outputs.uncertainty(card, ing, opts, console)
    if shard_info is not None:
        shard_mod.save_slice(out_dir, plan_keys, quarantine, shard_info, strata)
        run["shard"] = shard_mod.manifest_entry(shard_info)
    sw.lap("reconcile")

    if opts.strict and plan.n_quarantined:
        finalize(
            out_dir, plan_keys.clear(), quarantine, card.schema.names, opts.reference, model_sha, run_id,
            conformal=conformal, interval=opts.interval, strata=strata,
        )  # fmt: skip
        return outputs.refused_strict(out_dir, run, plan, sw, console, resumed, run_id)

    # 5. what is left to do: resume skips rows already in parts, except transient failures (worker crash,
    # OOM, I/O error) and rows of files changed in place since; unreadable parts are moved aside and redone
    checked = resume.check_parts(out_dir)
    for name, why in checked.moved:
        console.print(
            f"[yellow]part {name} unreadable ({why}): moved to {resume.CORRUPT_DIR}/, rows redone[/]"
        )
    todo, n_redone, file_stats = resume.todo_rows(plan, ids, ing, out_dir)
    if n_redone:
        console.print(f"resume: {n_redone} row(s) redone (transient failures, or files changed since)")
    plan_keys = plan_keys.with_columns(
        pl.Series("file_size", file_stats[0], pl.Int64), pl.Series("file_mtime_ns", file_stats[1], pl.Int64)
    ).with_columns(pl.when(pl.col(c) >= 0).then(pl.col(c)).alias(c) for c in ("file_size", "file_mtime_ns"))
    sw.lap("reconcile")

    # 6-7. decode pool (starts while the model loads), runner, then the loop: batches -> runner -> parts
    def pin() -> dict[str, Any]:  # the run really starts (the model is open): pin model/META/...
        return runstate.pin(out_dir, state, expect, run_id)

    if opts.engine == "ray":  # the same decode, inference and parts on a Ray cluster (score/run_ray.py)
        from xbmd_batch.score.run_ray import run_ray

        runner, stats, workers = run_ray(
            dicom_dir, model_path, model_sha, card, ing, ids, todo, file_stats, out_dir, opts, sw, console,
            run, pin,
        )  # fmt: skip
        run["preprocess"] = placement.describe(None)
    else:
        runner, stats, workers = run_local(
            model, placement, dicom_dir, ing, ids, todo, file_stats, out_dir, opts, sw, console, run, pin
        )
    sw.add("decode_wait", stats.decode_wait_s)
    sw.restart()

    # 8. finalize: parts + plan -> scores.parquet, failures.parquet; then run.json and the summary table
    fin = finalize(
        out_dir, plan_keys, quarantine, card.schema.names, opts.reference, model_sha, run_id,
        conformal=conformal, interval=opts.interval, strata=strata,
    )  # fmt: skip
    sw.lap("finalize")
    return outputs.finished(
        out_dir, run, runner, plan, fin, stats, todo, workers, sw,
        {"redone_resume": n_redone, "corrupt_parts_moved": len(checked.moved)}, opts.reference, console,
        resumed, run_id,
    )  # fmt: skip


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def _count_j2k(items: pl.DataFrame) -> int:
    """JPEG 2000 files among the plan's rows (their transfer syntax from the header pass)."""
    from pydicom.uid import JPEG2000TransferSyntaxes

    if "transfer_syntax_uid" not in items.columns:
        return 0
    j2k = [str(u) for u in JPEG2000TransferSyntaxes]
    return int(items.get_column("transfer_syntax_uid").is_in(j2k).sum())
