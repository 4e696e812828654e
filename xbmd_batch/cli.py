"""The `xbmd-batch` command line: a thin Typer adapter over the library.

Heavy packages (torch, onnxruntime, tensorrt, onnx) are imported inside each command, never at module level,
so `xbmd-batch --help` stays fast on any machine. Exit codes: 0 success, 2 usage/config/input errors
(xbmd_batch.errors.InputError, or an option value outside its vocabulary), 1 any other XbmdError (one line,
no traceback), 130 Ctrl-C; other codes are documented per command. One mapper (``_exits``) does this for
every command; option vocabularies are checked by the parser, before anything touches ``--out``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from xbmd_batch import __version__
from xbmd_batch.clinical import REFERENCES
from xbmd_batch.defaults import BACKENDS, DEFAULT_BATCH_SIZE, ENGINES, PRECISIONS, PREPROCESS_DEVICES
from xbmd_batch.errors import EXIT_INTERRUPTED, InputError, exit_code

# Idle OpenMP threads sleep instead of spinning. Read once, when torch's libgomp loads, so it is set here,
# before any command imports torch (the user's own value wins). In `score` the model's threads and the decode
# workers share the cores; spinning threads stole them: `score --backend torch` on 256 SYNTHETIC images,
# 2-core VM at load ~7, ran at 2.5-2.8 images/s spinning vs 9.8-12.7 passive (issue 11).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Closed vocabularies as Enums: Typer lists the choices in --help and rejects a typo with exit 2.
Backend = Enum("Backend", {b: b for b in BACKENDS}, type=str)
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)
PreprocessDevice = Enum("PreprocessDevice", {d: d for d in PREPROCESS_DEVICES}, type=str)
_PREPROCESS_HELP = (
    "Where preprocessing finishes: cpu (decode workers) | cuda (batched on the runner's GPU; workers hand "
    "over reduced images) | auto (cpu for now: the device path measured slower on the one GPU run)."
)
Engine = Enum("Engine", {e: e for e in ENGINES}, type=str)
Reference = Enum("Reference", {r: r for r in sorted(REFERENCES)}, type=str)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_device(value: str) -> str:
    """--device is open-ended (cuda:N), so a validating callback rather than a closed Enum."""
    if not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r}: expected auto, cpu, cuda or cuda:N (N a GPU index)")
    return value


@contextlib.contextmanager
def _exits(interrupted: str = "interrupted") -> Iterator[None]:
    """Map the error hierarchy to exit codes (errors.exit_code): one line on stderr, never a traceback."""
    try:
        yield
    except (KeyboardInterrupt, Exception) as e:
        code = exit_code(e)
        if code is None:
            raise
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (errors.Terminated, exit 143)
            msg = (
                interrupted
                if code == EXIT_INTERRUPTED
                else interrupted.replace("interrupted", "terminated (SIGTERM)", 1)
            )
        else:
            msg = f"error: {e}"
        typer.echo(msg, err=True)
        raise typer.Exit(code) from None


app = typer.Typer(
    name="xbmd-batch",
    help="Femoral-neck BMD from hip X-ray DICOMs + clinical metadata (XAttn-BMD), for whole cohorts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def entry() -> None:
    """The console script (``xbmd-batch``, ``python -m xbmd_batch``): run the CLI, then leave without the
    interpreter's teardown.

    Every output is written and closed by the time a command returns, and the at-exit handlers (logging,
    multiprocessing, Ray) still run; what is skipped is the final garbage collection and module teardown of
    torch/onnxruntime/polars, which cost 0.5-2 s per run on the 2-core VM (issue 11: measured by exiting with
    and without it after ``score --backend torch`` on 256 SYNTHETIC images). Skipped only when no other
    thread is alive (a live thread keeps the normal exit, which waits for it). In-process callers
    (``typer.testing.CliRunner``, ``app()``) are unaffected.
    """
    try:
        app()
    except SystemExit as e:
        code = e.code
    else:  # pragma: no cover - app() always raises SystemExit in standalone mode
        code = 0
    if threading.active_count() > 1:
        sys.exit(code)
    if code is not None and not isinstance(code, int):  # sys.exit("message"): print it, exit 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # what a normal exit runs first (logging, multiprocessing, Ray shutdown)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    os._exit(code or 0)


@app.callback()
def main() -> None:
    """Femoral-neck BMD from hip X-ray DICOMs + clinical metadata (XAttn-BMD), for whole cohorts."""


@app.command()
def version() -> None:
    """Print the xbmd-batch version.

    Example: xbmd-batch version
    """
    typer.echo(f"xbmd-batch {__version__}")


@app.command(no_args_is_help=True)
def score(
    dicom_dir: Path = typer.Argument(..., help="Cohort folder, walked recursively; DICOMs found by content."),
    meta: Path = typer.Argument(..., help="Metadata table (CSV, TSV or parquet), one row per subject."),
    model: Path = typer.Option(..., "--model", "-m", help="model.onnx (card embedded) or checkpoint .pt."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder: new/empty, or a previous run to resume."
    ),
    backend: Backend = typer.Option("auto", help="Inference backend (auto picks the fastest that works)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N.", callback=_check_device),
    precision: Precision = typer.Option("auto", help="Numeric precision (backend permitting)."),
    preprocess_device: PreprocessDevice = typer.Option("auto", help=_PREPROCESS_HELP),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", help="Images per model call."),
    workers: int | None = typer.Option(None, help="Decode processes (default: one per core; 0: in-process)."),
    engine_cache: Path | None = typer.Option(
        None, "--engine-cache", metavar="DIR", help="TensorRT engine cache [$XBMD_ENGINE_CACHE or ~/.cache]."
    ),
    chunk_size: int = typer.Option(1024, help="Rows per part file (the most a resume redoes)."),
    reference: Reference = typer.Option("nhanes3-hologic", help="T-score reference."),
    interval: float = typer.Option(
        0.9, help="Level of the bmd_lo/bmd_hi conformal interval: 0.8 | 0.9 | 0.95."
    ),
    key_column: str | None = typer.Option(None, help="META column matched to PatientID [subject_id]."),
    path_column: str | None = typer.Option(
        None, help="META column holding each row's file (path relative to DIR, or a unique file name)."
    ),
    pseudonymize: Path | None = typer.Option(
        None, metavar="KEYFILE", help="HMAC-SHA256 subject keys, paths and UIDs with the key in KEYFILE."
    ),
    strict: bool = typer.Option(False, help="Exit 4 before decoding if any input is quarantined."),
    max_missing: float = typer.Option(
        0.2, help="Largest share of subjects (0-1) a metadata field may be missing/invalid for (else exit 2)."
    ),
    allow_missing: list[str] = typer.Option(
        [], "--allow-missing", metavar="FIELD", help="Accept FIELD missing beyond --max-missing (repeatable)."
    ),
    follow_symlinks: bool = typer.Option(
        False, help="Follow symlinks that leave DIR (default: listed as skipped, never opened)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables."),
    shard: str | None = typer.Option(
        None, metavar="K/N", help="Score only shard K of N (by subject key); combine with `merge`."
    ),
    engine: Engine = typer.Option(
        "local", help="local, or ray: decode tasks + model actors on a Ray cluster (extra `ray`)."
    ),
    ray_address: str | None = typer.Option(
        None, metavar="ADDR", help="--engine ray: cluster address, e.g. auto [a local Ray runtime]."
    ),
    ray_actors: int | None = typer.Option(
        None, metavar="N", help="--engine ray: model actors [one per GPU; without GPUs one per 4 CPUs]."
    ),
) -> None:
    """Score every hip X-ray under DIR with its META row: scores.parquet (with conformal intervals and
    predictive probabilities), cohort_summary.parquet, failures.parquet, run.json in OUT.

    Example: xbmd-batch score cohort/dicom cohort/meta.csv --model model.onnx --out results/

    Re-running the same command after Ctrl-C or a crash resumes (a different model file is refused).
    Outputs are documented in docs/outputs.md.

    Exit codes: 0 every image scored and every META row matched | 3 finished, some inputs quarantined
    (failures.parquet) | 4 --strict and reconciliation quarantined inputs (nothing decoded) | 2 usage,
    config or input error (also a full or read-only --out) | 5 the GPU failed (sticky CUDA error; finished
    rows kept, rerun to resume) | 1 other error, e.g. TensorRT missing (one line, no traceback) | 130
    interrupted, 143 terminated by SIGTERM (finished rows kept; rerun the same command to resume).
    """
    from xbmd_batch.score import ScoreOptions, score_cohort
    from xbmd_batch.score.privacy import silence_dicom_warnings

    silence_dicom_warnings()

    opts = ScoreOptions(
        backend=backend.value,
        device=device,
        precision=precision.value,
        batch_size=batch_size,
        workers=workers,
        chunk_size=chunk_size,
        reference=reference.value,
        interval=interval,
        key_column=key_column,
        path_column=path_column,
        pseudonymize=pseudonymize,
        strict=strict,
        quiet=quiet,
        max_missing=max_missing,
        allow_missing=tuple(allow_missing),
        follow_symlinks=follow_symlinks,
        shard=shard,
        engine_cache=engine_cache,
        preprocess_device=preprocess_device.value,
        engine=engine.value,
        ray_address=ray_address,
        ray_actors=ray_actors,
    )
    with _exits(f"interrupted: finished rows kept in {out}/parts; rerun the same command to resume"):
        res = score_cohort(dicom_dir, meta, model, out, opts)
    if not quiet:
        typer.echo(
            f"results in {res.out_dir}: scores.parquet, cohort_summary.parquet, failures.parquet, run.json "
            f"(exit {res.exit_code}); HTML report: xbmd-batch report {res.out_dir}"
        )
    raise typer.Exit(res.exit_code)


@app.command(no_args_is_help=True)
def merge(
    out: Path = typer.Argument(..., help="New or empty folder for the merged tables."),
    shards: list[Path] = typer.Argument(..., help="The N run folders of `score --shard K/N`, K = 1..N."),
) -> None:
    """Merge `score --shard K/N` run folders into the tables a single run would write.

    Example: xbmd-batch merge results/ shards/1 shards/2 shards/3

    Exit codes: 0 merged | 3 merged, some inputs quarantined (failures.parquet) | 2 shards missing, duplicated
    or from another model/META/options (nothing written).
    """
    from xbmd_batch.errors import InputError
    from xbmd_batch.score.shard import merge_shards

    try:
        res = merge_shards(out, shards)
    except InputError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"merged {len(shards)} shards into {res.out_dir} (run {res.run_id}, exit {res.exit_code})")
    raise typer.Exit(res.exit_code)


@app.command(no_args_is_help=True)
def bench(
    dicom_dir: Path = typer.Argument(..., help="Cohort folder (as for score)."),
    meta: Path = typer.Argument(..., help="Metadata table (as for score)."),
    model: list[Path] = typer.Option(
        ..., "--model", "-m", help="model.onnx and/or .pt (torch needs the .pt)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for bench.parquet, bench.json (+ e2e runs)."),
    backend: list[Backend] = typer.Option(["auto"], help="Repeat to compare backends."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N.", callback=_check_device),
    precision: Precision = typer.Option("auto", help="Numeric precision (backend permitting)."),
    preprocess_device: PreprocessDevice = typer.Option(
        "auto", help="As for score (the end-to-end runs only)."
    ),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", help="Images per model call."),
    workers: int | None = typer.Option(None, help="Decode processes for the end-to-end run."),
    plot: Path | None = typer.Option(None, help="Also write a PNG bar chart here."),
    no_e2e: bool = typer.Option(False, "--no-e2e", help="Skip the end-to-end score runs."),
    plain_loop_n: int = typer.Option(
        32, "--plain-loop-n", help="Files for the plain-loop reference (pydicom, resize, batch 1); 0 skips."
    ),
) -> None:
    """Per-stage throughput: header read, decode per transfer syntax, model-only, end-to-end, plain loop.

    Example: xbmd-batch bench cohort/dicom cohort/meta.csv -m model.onnx -o bench/ --backend onnxruntime

    Exit codes: 0 done | 2 usage, config or input error.
    """
    from rich.console import Console

    from xbmd_batch.bench import BenchOptions, bench_table, is_synthetic, run_bench

    opts = BenchOptions(
        backends=tuple(b.value for b in backend),
        device=device,
        precision=precision.value,
        batch_size=batch_size,
        workers=workers,
        end_to_end=not no_e2e,
        plot=plot,
        plain_loop_n=plain_loop_n,
        preprocess_device=preprocess_device.value,
    )
    with _exits():
        df = run_bench(dicom_dir, meta, list(model), out, opts)
    Console().print(bench_table(df, is_synthetic(dicom_dir)))
    typer.echo(f"results: {out}/bench.parquet, {out}/bench.json")


@app.command(no_args_is_help=True)
def report(
    results: Path = typer.Argument(..., help="A `score` output folder (scores.parquet, run.json, ...)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file [RESULTS/report.html]."),
) -> None:
    """One self-contained HTML cohort report (figures embedded, no network) plus its PNGs beside it.

    Example: xbmd-batch report results/ --out results/report.html

    Exit codes: 0 written | 2 RESULTS is not a finished score output.
    """
    from xbmd_batch.report import write_report

    with _exits():
        path = write_report(results, out)
    typer.echo(f"report: {path} (PNGs in {path.parent / (path.stem + '_figures')})")


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON instead of tables."),
) -> None:
    """Report torch/CUDA, onnxruntime providers, TensorRT and decodable DICOM transfer syntaxes.

    Example: xbmd-batch doctor
    """
    from xbmd_batch.doctor import run_doctor

    with _exits():
        run_doctor(as_json=as_json)


@app.command(no_args_is_help=True)
def synth(
    out: Path = typer.Argument(..., help="Output folder: dicom/, meta.csv, truth.csv, cohort.json."),
    n: int = typer.Option(500, "--n", help="Number of subjects."),
    seed: int = typer.Option(0, help="Seed; the same seed gives identical bytes."),
    size: int = typer.Option(2500, help="Nominal rows (scanners scale it by 0.9-1.1); e.g. 512 for demos."),
    j2k_fraction: float = typer.Option(0.1, help="Fraction of files in JPEG 2000 lossless."),
    rle_fraction: float = typer.Option(0.0, help="Fraction of files in RLE lossless."),
    mono1_fraction: float = typer.Option(0.3, help="Fraction of MONOCHROME1 files."),
    missing_rate: float = typer.Option(0.05, help="Probability that a metadata cell is empty."),
    age_min: float = typer.Option(60.0, help="Youngest age at X-ray (years)."),
    age_max: float = typer.Option(85.0, help="Oldest age at X-ray (years)."),
    scanners: int = typer.Option(4, help="Number of simulated scanners (sites)."),
    workers: int | None = typer.Option(None, help="Processes (default: one per core); output is identical."),
    preview: Path | None = typer.Option(None, metavar="PNG", help="Also write a contact sheet of 8 images."),
    generator_version: int = typer.Option(2, help="Generator version (1 reproduces v1 cohorts exactly)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Generate a SYNTHETIC hip X-ray cohort (DICOM + metadata + truth) from a documented forward model.

    Example: xbmd-batch synth demo_out --n 200 --size 512 --seed 0 --preview demo_out/preview.png
    """
    from xbmd_batch.synth import CovariateModel, SynthConfig, generate_cohort

    def make() -> SynthConfig:
        return SynthConfig(
            n=n,
            seed=seed,
            size=size,
            n_scanners=scanners,
            j2k_fraction=j2k_fraction,
            rle_fraction=rle_fraction,
            mono1_fraction=mono1_fraction,
            missing_rate=missing_rate,
            covariates=CovariateModel.for_version(generator_version, age_range=(age_min, age_max)),
            workers=workers,
            generator_version=generator_version,
        )

    with _exits():
        s = generate_cohort(out, _synth_config(make), progress=not quiet, preview=preview)
    if not quiet:
        r2 = s.oracle_r2
        typer.echo(
            f"SYNTHETIC cohort: {s.n} subjects in {s.out_dir} ({s.seconds:.1f} s, {s.workers} workers); "
            f"oracle R2 metadata {r2['metadata']:.3f}, image {r2['image']:.3f}, both {r2['both']:.3f}"
        )
        if s.preview:
            typer.echo(f"preview: {s.preview}")


def _synth_config(make: Callable[[], Any]) -> Any:
    """synth/ is a library and says "impossible parameter" with ValueError; at the CLI edge that is input."""
    try:
        cfg = make()
        cfg.validate()
    except ValueError as e:
        raise InputError(f"synth: {e}") from e
    return cfg
