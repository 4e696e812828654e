"""Orchestration of `xbmd-batch score`: one function, stages in data-flow order, nothing clever in between.

discover -> headers -> META join -> reconcile (printed, saved; --strict may stop here) -> decode pool ->
batcher -> runner -> parts -> finalize -> run.json. Every finished row reaches a part file within
``chunk_size`` rows, so an interrupted run loses at most one chunk of work and the same command resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from xbmd_batch.clinical import REFERENCES, WHO_CLASSES
from xbmd_batch.defaults import DEFAULT_BATCH_SIZE
from xbmd_batch.errors import InputError
from xbmd_batch.fsutil import atomic_write_json, now_iso
from xbmd_batch.score import manifest, resume, runstate
from xbmd_batch.score.batcher import Batcher
from xbmd_batch.score.decode import DecodePool
from xbmd_batch.score.discover import discover
from xbmd_batch.score.finalize import finalize
from xbmd_batch.score.headers import read_headers
from xbmd_batch.score.join import KeySpec, join_metadata
from xbmd_batch.score.lock import OutLock
from xbmd_batch.score.privacy import Pseudonymizer
from xbmd_batch.score.reconcile import Plan, build_plan
from xbmd_batch.score.writer import ChunkBuffer, PartWriter

# Exit codes (docs/outputs.md; the CLI's help repeats them).
EXIT_OK = 0
EXIT_ERROR = 1  # unexpected internal error
EXIT_USAGE = 2  # usage / config / input error (InputError, ModelFileError)
EXIT_QUARANTINE = 3  # finished, but some inputs were quarantined (failures.parquet is not empty)
EXIT_STRICT = 4  # --strict: reconciliation found quarantined inputs; nothing was decoded or scored

# Test hook: "N" SIGKILLs this process right after the N-th part of a session is written; "N:INT" sends
# SIGINT instead (Ctrl-C). Crash-safety tests only.
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
    interval: float = 0.9  # central level of bmd_lo/bmd_hi (0.8, 0.9 or 0.95)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pseudonymize"] = bool(self.pseudonymize)  # never the key's location
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


def default_workers() -> int:
    """One decode process per core this process may use (respects taskset / cgroup CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_options(o: ScoreOptions) -> None:
    if o.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1 (got {o.batch_size})")
    if o.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1 (got {o.chunk_size})")
    if o.workers is not None and o.workers < 0:
        raise InputError(f"--workers must be >= 0 (got {o.workers})")
    if o.reference not in REFERENCES:
        raise InputError(f"--reference {o.reference!r} is unknown; choose one of {sorted(REFERENCES)}")
    if not 0.0 <= o.max_missing <= 1.0:
        raise InputError(f"--max-missing must be a share between 0 and 1 (got {o.max_missing})")
    if o.key_column and o.path_column and o.key_column == o.path_column:
        raise InputError("--key-column and --path-column must name different META columns")
    from xbmd_batch.uncertainty import check_level

    try:
        check_level(o.interval)
    except ValueError as e:
        raise InputError(str(e)) from None


def _plain_issue(x: Any) -> dict[str, Any]:
    """A metadata validation issue as a JSON object (the metadata module's own record, made plain)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
                for k, v in dataclasses.asdict(x).items()}  # fmt: skip
    if hasattr(x, "_asdict"):  # NamedTuple, e.g. metadata.InvalidValue
        x = x._asdict()
    if isinstance(x, dict):
        return {
            str(k): v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for k, v in x.items()
        }
    return {"issue": str(x)}


def _pseudo_listed(plan: Plan, pseudo: Pseudonymizer, meta_keys: list[str | None]) -> dict[str, Any]:
    """Reconciliation lists with every identifier in output form (HMACed under --pseudonymize)."""
    ls = plan.listed
    out: dict[str, Any] = {
        "non_dicom_files": pseudo.many(ls["non_dicom_files"]),
        "hidden_files": pseudo.many(ls["hidden_files"]),
        "skipped_links": [{**d, "path": pseudo(d["path"])} for d in ls["skipped_links"]],
        "special_files": [{**d, "path": pseudo(d["path"])} for d in ls["special_files"]],
        "non_image_dicoms": pseudo.many(ls["non_image_dicoms"]),
        "metadata_rows_without_images": [
            {"meta_row": i, "subject_key": pseudo(meta_keys[i]) if i < len(meta_keys) else None}
            for i in ls["metadata_rows_without_images"]
        ],
        "metadata_duplicate_keys": [
            {"key": pseudo(d["key"]), "rows": d["rows"]} for d in ls["metadata_duplicate_keys"]
        ],
        "metadata_invalid_values": [],
    }
    for issue in ls["metadata_invalid_values"]:
        d = dict(issue)
        if pseudo.enabled:
            d.pop("raw", None)  # META cell text can be an identifier typed into the wrong column
        for k in list(d):
            if k in ("subject", "subject_key", "subject_id", "key", "patient_id"):
                d[k] = pseudo(None if d[k] is None else str(d[k]))
            elif pseudo.enabled and k in ("message", "value") and isinstance(d[k], str):
                for mk in meta_keys:  # a message quoting a key must not leak it
                    if mk and mk in d[k]:
                        d[k] = d[k].replace(mk, "<subject>")
        out["metadata_invalid_values"].append(d)
    return out


def _out_ids(plan: Plan, pseudo: Pseudonymizer) -> dict[str, np.ndarray]:
    ids = {}
    for c in ("relative_path", "subject_key", "sop_instance_uid", "study_instance_uid"):
        ids[c] = np.array(pseudo.many(plan.items.get_column(c).to_list()), dtype=object)
    return ids


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def score_cohort(
    dicom_dir: Path, meta_path: Path, model_path: Path, out_dir: Path, options: ScoreOptions | None = None
) -> ScoreResult:
    """Score every matched image under ``dicom_dir``; write only under ``out_dir``; return counts + exit code.

    Raises InputError / ModelFileError for bad inputs (before anything is scored); per-file problems never
    raise, they become failure rows.
    """
    o = options or ScoreOptions()
    _check_options(o)
    try:
        with _sigterm_as_interrupt(), contextlib.ExitStack() as out_stack:
            return _score(dicom_dir, meta_path, model_path, out_dir, o, out_stack)
    except OSError as e:
        err = runstate.as_output_error(e, Path(out_dir))
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
    dicom_dir: Path, meta_path: Path, model_path: Path, out_dir: Path, o: ScoreOptions, out_stack: Any
) -> ScoreResult:
    from xbmd_batch.fsutil import sha256_file
    from xbmd_batch.infer.model_file import open_model

    dicom_dir, meta_path, model_path, out_dir = (
        Path(dicom_dir),
        Path(meta_path),
        Path(model_path),
        Path(out_dir),
    )
    if not dicom_dir.is_dir():
        raise InputError(f"{dicom_dir}: DICOM folder does not exist or is not a directory")
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: metadata table not found")
    console = _console(o.quiet)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + (now - t0)
        return now

    t = time.perf_counter()
    # setup: everything is validated before --out is touched (a refused run leaves nothing pinned)
    model = open_model(model_path)  # read once: card, sha256, graph/weights (the runner takes it)
    card = model.card
    pseudo = Pseudonymizer.from_keyfile(o.pseudonymize)
    runstate.check_out_dir(out_dir, dicom_dir, meta_path)
    model_sha = model.sha256
    key_spec = KeySpec(o.key_column, o.path_column)
    expect = {
        "model_sha256": model_sha,
        "meta_sha256": sha256_file(meta_path),
        "pseudonym_key_fingerprint": pseudo.fingerprint,
        "key_spec": dataclasses.asdict(key_spec),
        "dicom_dir": str(dicom_dir.resolve()),
    }
    t = lap("setup", t)

    # 1-2. discover and read headers
    disc = discover(dicom_dir, threads=o.header_threads, follow_symlinks=o.follow_symlinks)
    t = lap("discover", t)
    headers = read_headers(dicom_dir, disc.dicom, threads=o.header_threads)
    t = lap("headers", t)

    # 3. META: typed and validated by the card's schema, joined on the subject key
    from xbmd_batch.score import metacheck

    schema = card.schema
    read_key = o.key_column or (o.path_column if o.path_column else schema.subject_key)
    meta_df, meta_info, enc = metacheck.load_meta(meta_path, schema, read_key)
    joined = join_metadata(
        headers.get_column("relative_path").to_list(),
        headers.get_column("patient_id").to_list(),
        meta_df,
        key_spec,
        schema.subject_key,
        meta_name=meta_path.name,
    )
    t = lap("metadata_join", t)

    # 4. plan + reconcile, before any pixel is decoded
    issues = metacheck.invalid_records(enc, meta_info, pseudo.enabled)
    derived = np.asarray(enc.derived, dtype=bool)
    missing = np.asarray(enc.missing, dtype=bool)
    plan = build_plan(disc, headers, joined, meta_df.height, issues, int(derived.sum()))
    meta_report, meta_accepted = metacheck.check_meta(
        enc,
        meta_df,
        plan.items.get_column("meta_row").to_numpy(),
        max_missing=o.max_missing,
        allow=tuple(o.allow_missing),
        source=meta_path.name,
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
    key_col = joined.meta_key_column
    meta_keys = (
        [None if v is None else str(v).strip() for v in meta_df.get_column(key_col).cast(pl.String).to_list()]
        if key_col and key_col in meta_df.columns
        else [None] * meta_df.height
    )
    recon = {
        "run_id": run_id,
        "created": now_iso(),
        "join": key_spec.describe(schema.subject_key),
        "pseudonymized": pseudo.enabled,
        "counts": plan.counts,
        **_pseudo_listed(plan, pseudo, meta_keys),
        "metadata_warnings": [*enc.warnings, *meta_accepted],
        "metadata_table": meta_info.describe(),
        "metadata_missingness": meta_report,
    }
    atomic_write_json(out_dir / "reconciliation.json", recon)
    from xbmd_batch.score.summary import print_tables, reconciliation_table

    print_tables(console, [reconciliation_table(plan.counts, key_spec.describe(schema.subject_key))])
    print_tables(console, metacheck.meta_tables(meta_report, issues, meta_info, o.max_missing))
    for w in [*enc.warnings, *meta_accepted]:
        console.print(f"[yellow]META: {w}[/]")
    quarantine = plan.quarantine.with_columns(
        pl.Series(
            "relative_path", pseudo.many(plan.quarantine.get_column("relative_path").to_list()), pl.String
        ),
        pl.Series("subject_key", pseudo.many(plan.quarantine.get_column("subject_key").to_list()), pl.String),
        pl.Series(
            "sop_instance_uid",
            pseudo.many(plan.quarantine.get_column("sop_instance_uid").to_list()),
            pl.String,
        ),
    )
    t = lap("reconcile", t)

    from xbmd_batch.score.cohort_summary import strata_table
    from xbmd_batch.uncertainty import ConditionalConformal

    strata = strata_table(enc.raw_values, schema)
    conformal, no_interval_reason = ConditionalConformal.from_training_summary(card.training_summary)
    if conformal is None:
        console.print(f"[yellow]uncertainty: {no_interval_reason}[/]")
    uncertainty_info = (
        {**conformal.describe(o.interval), "available": True}
        if conformal is not None
        else {"available": False, "reason": no_interval_reason}
    )

    ids = _out_ids(plan, pseudo)
    plan_keys = pl.DataFrame(
        {
            "relative_path": ids["relative_path"].tolist(),
            "sop_instance_uid": ids["sop_instance_uid"].tolist(),
        },
        schema={"relative_path": pl.String, "sop_instance_uid": pl.String},
    )
    synthetic = manifest.is_synthetic(dicom_dir)
    base_manifest: dict[str, Any] = {
        "format": "xbmd-batch-run",
        "run_id": run_id,
        "resumed": resumed,
        "sessions": len((state or {}).get("sessions", [])) + 1,
        "created": (state or {}).get("created") or now_iso(),
        "finished": None,
        "inputs": {
            "dicom_dir": str(dicom_dir.resolve()),
            "meta": str(meta_path.resolve()),
            "meta_sha256": expect["meta_sha256"],
        },  # fmt: skip
        "model": {
            "path": str(model_path.resolve()),
            "sha256": model_sha,
            "checkpoint_sha256": getattr(card, "checkpoint_sha256", ""),
            "engine_sha256": None,
            "image_size": card.preprocess.image_size,
            "fields": list(schema.names),
            "training_synthetic": bool((card.training_summary or {}).get("synthetic", False)),
        },
        "reference": REFERENCES[o.reference].to_dict(),
        "synthetic_cohort": synthetic,
        "pseudonymized": pseudo.enabled,
        "pseudonym_key_fingerprint": pseudo.fingerprint,
        "options": o.to_dict(),
        "versions": manifest.versions(),
        "machine": manifest.machine_info(),
        "reconciliation": plan.counts,
        "uncertainty": uncertainty_info,
    }

    if o.strict and plan.n_quarantined:
        finalize(out_dir, plan_keys.clear(), quarantine, schema.names, o.reference, model_sha, run_id,
                 conformal=conformal, interval=o.interval, strata=strata)  # fmt: skip
        manifest.write_run_json(
            out_dir,
            {
                **base_manifest,
                "status": "refused_strict",
                "finished": now_iso(),
                "counts": {"quarantined_before_scoring": plan.n_quarantined},
                "timings_s": timings,
            },  # fmt: skip
        )
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
    latest = resume.latest_rows(out_dir)
    rel_o, sop_o = ids["relative_path"], ids["sop_instance_uid"]
    stats = [disc.stat_of(r) for r in plan.items.get_column("relative_path").to_list()]
    f_size = np.array([-1 if st[0] is None else st[0] for st in stats], dtype=np.int64)
    f_mtime = np.array([-1 if st[1] is None else st[1] for st in stats], dtype=np.int64)
    todo_l: list[int] = []
    n_retried = 0
    for i in range(plan.items.height):
        row = latest.get((rel_o[i], sop_o[i]))
        if not resume.is_done(row, int(f_size[i]), int(f_mtime[i])):
            todo_l.append(i)
            n_retried += row is not None
    todo = np.array(todo_l, dtype=np.int64)
    n_skipped = plan.items.height - len(todo)
    if n_retried:
        console.print(f"resume: {n_retried} row(s) redone (transient failures, or files changed since)")
    plan_keys = plan_keys.with_columns(
        pl.Series("file_size", f_size, pl.Int64), pl.Series("file_mtime_ns", f_mtime, pl.Int64)
    ).with_columns(pl.when(pl.col(c) >= 0).then(pl.col(c)).alias(c) for c in ("file_size", "file_mtime_ns"))
    t = lap("reconcile", t)

    # 6-7. runner, decode pool, batches, parts
    from xbmd_batch.infer.select import open_runner
    from xbmd_batch.parity_feeds import make_reference_feeds

    workers = default_workers() if o.workers is None else o.workers
    values = np.asarray(enc.values, dtype=np.float32)
    mask = np.asarray(enc.mask, dtype=np.float32)
    meta_row = plan.items.get_column("meta_row").to_numpy().astype(np.int64)
    session = {"scored": 0, "failed": 0, "parts": 0}
    decode_worker_s = 0.0
    wait_s = 0.0
    paths_arr = pa.array(plan.items.get_column("relative_path").to_list(), type=pa.large_string())
    t_loop = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # Decode workers start (and decode the first tasks) while the model loads.
        pool = stack.enter_context(
            DecodePool(dicom_dir, paths_arr, card.preprocess, workers, o.task_size, o.max_inflight)
        )
        pool.start(todo)
        runner = stack.enter_context(
            open_runner(model, backend=o.backend, device=o.device, precision=o.precision,
                        batch_size=o.batch_size, parity_feeds=make_reference_feeds)
        )  # fmt: skip
        backend, precision, reason = runner.backend, runner.precision, runner.reason
        prov = runner.provenance()
        base_manifest["runner"] = prov
        base_manifest["model"]["engine_sha256"] = prov.get("engine_sha256")
        has_attn = runner.has_attention
        state = runstate.pin(out_dir, state, expect, run_id)  # the run really starts: pin model/META/key/DIR
        console.print(f"backend: [bold]{backend}[/] ({precision}){' - ' + reason if reason else ''}")
        t = lap("model_load", t)

        buf = ChunkBuffer(
            ids,
            meta_row,
            plan.items.get_column("image_index_for_subject").to_numpy(),
            plan.items.get_column("n_images_for_subject").to_numpy(),
            missing,
            derived,
            schema.names,
            backend,
            precision,
            file_stats=(f_size, f_mtime),
        )
        writer = PartWriter(out_dir)
        hook = (os.environ.get(KILL_AFTER_PARTS_ENV, "") or "0").split(":")
        kill_after = int(hook[0] or 0)
        kill_sig = getattr(signal, f"SIG{hook[1]}") if len(hook) > 1 else signal.SIGKILL

        def write_part() -> None:
            nonlocal t
            tw = time.perf_counter()
            table = buf.take()
            if table is not None:
                writer.write(table)
                session["parts"] += 1
                if kill_after and session["parts"] >= kill_after:
                    os.kill(os.getpid(), kill_sig)
            timings["write"] = timings.get("write", 0.0) + time.perf_counter() - tw

        def infer(idx: np.ndarray, images: np.ndarray) -> None:
            ti = time.perf_counter()
            rows = meta_row[idx]
            try:
                out = runner.infer({"image": images, "meta": values[rows], "meta_mask": mask[rows]})
                _accept(idx, out)
            except Exception:  # noqa: BLE001 - isolate the bad image: retry one by one
                for k in range(len(idx)):
                    try:
                        out = runner.infer(
                            {
                                "image": images[k : k + 1],
                                "meta": values[rows[k : k + 1]],
                                "meta_mask": mask[rows[k : k + 1]],
                            }  # fmt: skip
                        )
                        _accept(idx[k : k + 1], out)
                    except Exception as e:  # noqa: BLE001
                        buf.add_failed(
                            idx[k : k + 1], "infer", ["inference_error"], [f"{type(e).__name__}: {e}"[:500]]
                        )
            timings["infer"] = timings.get("infer", 0.0) + time.perf_counter() - ti

        def _accept(idx: np.ndarray, out: dict[str, np.ndarray]) -> None:
            bmd = np.asarray(out["bmd"], dtype=np.float32).reshape(len(idx))
            attn = out.get("field_attention") if has_attn else None
            attn = None if attn is None else np.asarray(attn, dtype=np.float32).reshape(len(idx), -1)
            sd = out.get("bmd_sd_models")  # a fold ensemble's between-model SD (export --ensemble)
            sd = None if sd is None else np.asarray(sd, dtype=np.float32).reshape(len(idx))
            good = np.isfinite(bmd)
            if attn is not None:
                good &= np.isfinite(attn).all(axis=1)
            if good.all():
                buf.add_scored(idx, bmd, attn, sd)
            else:
                buf.add_scored(idx[good], bmd[good], None if attn is None else attn[good],
                               None if sd is None else sd[good])  # fmt: skip
                bad = idx[~good]
                buf.add_failed(bad, "infer", ["nonfinite_prediction"] * len(bad),
                               ["the model returned NaN/inf for this image"] * len(bad))  # fmt: skip

        batcher = Batcher(o.batch_size, card.preprocess.image_size)
        progress = _progress(console, o.quiet)
        task = progress.add_task("scoring", total=len(todo), rate=0.0)
        n_done = 0
        t_loop = time.perf_counter()
        try:
            with progress:
                for dec in pool.results():
                    decode_worker_s += dec.seconds
                    if dec.failures:
                        f_idx = np.array([f[0] for f in dec.failures], dtype=np.int64)
                        buf.add_failed(
                            f_idx, "decode", [f[1] for f in dec.failures], [f[2] for f in dec.failures]
                        )
                    ok = dec.ok
                    for b in batcher.add(dec.idx[ok], dec.images[ok]):
                        infer(b.idx, b.images)
                    n_done += len(dec.idx)
                    el = time.perf_counter() - t_loop
                    progress.update(task, completed=n_done, rate=n_done / el if el > 0 else 0.0)
                    if buf.n_rows >= o.chunk_size:
                        write_part()
                last = batcher.flush()
                if last is not None:
                    infer(last.idx, last.images)
                write_part()
                wait_s = pool.wait_seconds
        except BaseException:
            write_part()  # KeyboardInterrupt / crash: keep every finished row (atomic part), then stop
            raise
        session["scored"], session["failed"] = buf.n_scored, buf.n_failed
    loop_s = time.perf_counter() - t_loop
    timings["decode_wait"] = wait_s
    t = time.perf_counter()

    # 8. finalize
    fin = finalize(out_dir, plan_keys, quarantine, schema.names, o.reference, model_sha, run_id,
                   conformal=conformal, interval=o.interval, strata=strata)  # fmt: skip
    t = lap("finalize", t)
    scores = pl.read_parquet(out_dir / "scores.parquet", columns=["who_class"])
    who = {c: int((scores.get_column("who_class") == c).sum()) for c in WHO_CLASSES}
    n_fail = int(pl.read_parquet(out_dir / "failures.parquet", columns=["stage"]).height)
    wall = time.perf_counter() - t_all
    counts = {
        **plan.counts,
        "scored": fin["scored"],
        "failed_in_scoring": fin["failed_in_scoring"],
        "failures_total": n_fail,
        "not_processed": fin["not_processed"],
        "skipped_resume": n_skipped,
        "redone_resume": n_retried,
        "corrupt_parts_moved": len(checked.moved),
        "scored_this_session": session["scored"],
        "failed_this_session": session["failed"],
        "parts_written_this_session": session["parts"],
    }
    main_stages = {k: round(v, 4) for k, v in timings.items()}
    through = {
        "images_per_s": round(len(todo) / loop_s, 3) if loop_s > 0 and len(todo) else 0.0,
        "scoring_loop_s": round(loop_s, 3),
        "wall_s": round(wall, 3),
        "decode_worker_s": round(decode_worker_s, 3),
        "decode_workers": workers,
        "images_this_session": int(len(todo)),
    }
    result_info = {
        "status": "complete" if fin["not_processed"] == 0 else "incomplete",
        "finished": now_iso(),
        "backend": backend,
        "backend_reason": reason,
        "precision": precision,
        "counts": counts,
        "timings_s": main_stages,
        "stage_shares": manifest.stage_shares(main_stages),
        "throughput": through,
        "who_distribution": who,
    }
    manifest.write_run_json(out_dir, {**base_manifest, **result_info})
    from xbmd_batch.score.summary import final_table

    print_tables(console, final_table({**result_info, "reference": o.reference, "synthetic": synthetic}))
    from xbmd_batch.score.cohort_summary import rich_table

    print_tables(console, [rich_table(pl.read_parquet(out_dir / "cohort_summary.parquet"), synthetic)])
    quarantined = n_fail > 0 or fin["not_processed"] > 0
    return ScoreResult(
        EXIT_QUARANTINE if quarantined else EXIT_OK,
        out_dir,
        counts,
        backend,
        precision,
        reason,
        through,
        main_stages,
        resumed,
        run_id,
    )


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
