"""`xbmd-batch bench`: per-stage throughput of the score pipeline on one cohort + model, comparable across
machines and backends (one flat row per measurement, machine info alongside).

Stages: header read (thread pool, all files), decode + preprocess per transfer syntax (one process, a sample
per syntax), model-only images/s per backend at the chosen batch size (warm-up, then timed calls on real
preprocessed images), end-to-end images/s of `score` with that backend, and the ratio end-to-end / model-only
(1.0 = decode fully hidden behind inference). Every row also shows its ratio to a *plain loop*, what a user
writes by hand on the same files and model: pydicom -> numpy -> OpenCV resize -> the model at batch 1, one
process (``bench_plain_loop``). Results: OUT/bench.parquet, OUT/bench.json, a printed table (fits 80
columns), and optionally a PNG (log axis) labelled SYNTHETIC when the cohort came from `xbmd-batch synth`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from xbmd_batch.defaults import DEFAULT_BATCH_SIZE
from xbmd_batch.score.manifest import is_synthetic

if TYPE_CHECKING:
    from xbmd_batch.infer.model_file import ModelFile

__all__ = ["BENCH_SCHEMA", "BenchOptions", "bench_table", "is_synthetic", "run_bench"]

BENCH_SCHEMA: dict[str, pl.DataType] = {
    "stage": pl.String,
    "backend": pl.String,
    "precision": pl.String,
    "transfer_syntax": pl.String,
    "batch_size": pl.Int64,
    "workers": pl.Int64,
    "n": pl.Int64,
    "seconds": pl.Float64,
    "items_per_s": pl.Float64,
    "ratio_to_model_only": pl.Float64,
    "ratio_to_plain_loop": pl.Float64,
    "note": pl.String,
}

_TS_NAMES = {
    "1.2.840.10008.1.2": "implicit-le",
    "1.2.840.10008.1.2.1": "explicit-le",
    "1.2.840.10008.1.2.4.90": "j2k-lossless",
    "1.2.840.10008.1.2.4.91": "j2k",
    "1.2.840.10008.1.2.5": "rle",
    "1.2.840.10008.1.2.4.70": "jpeg-lossless",
    "1.2.840.10008.1.2.4.80": "jpeg-ls",
}


@dataclass(frozen=True)
class BenchOptions:
    backends: tuple[str, ...] = ("auto",)
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None
    decode_sample: int = 24  # files per transfer syntax for the decode stage
    model_iters: int = 10
    end_to_end: bool = True
    plain_loop_n: int = 32  # files for the plain-loop reference (0: skip it)
    plot: Path | None = None
    preprocess_device: str = "auto"  # end-to-end runs: where preprocessing finishes (score's option)


def _row(**kw: Any) -> dict[str, Any]:
    return {k: kw.get(k) for k in BENCH_SCHEMA}


def bench_headers(dicom_dir: Path) -> tuple[dict[str, Any], pl.DataFrame]:
    from xbmd_batch.score.discover import discover
    from xbmd_batch.score.headers import read_headers

    disc = discover(dicom_dir)
    t0 = time.perf_counter()
    h = read_headers(dicom_dir, disc.dicom)
    dt = time.perf_counter() - t0
    return _row(stage="header_read", n=h.height, seconds=dt, items_per_s=h.height / dt if dt else None), h


def bench_decode(
    dicom_dir: Path, headers: pl.DataFrame, card: Any, sample: int
) -> tuple[list[dict], np.ndarray]:
    """One process, per transfer syntax; returns rows and a few preprocessed images for the model stage."""
    from xbmd_batch.preprocess import load_and_preprocess

    rows: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    ok = headers.filter(pl.col("header_error").is_null() & pl.col("rows").is_not_null())
    for ts, grp in ok.group_by("transfer_syntax_uid", maintain_order=True):
        uid = ts[0] if isinstance(ts, tuple) else ts
        paths = grp.get_column("relative_path").to_list()[:sample]
        t0 = time.perf_counter()
        levels = []
        for rel in paths:
            arr, info = load_and_preprocess(Path(dicom_dir) / rel, card.preprocess)
            levels.append(getattr(info, "reduce_level", 0))
            if len(images) < 256:
                images.append(arr)
        dt = time.perf_counter() - t0
        rows.append(
            _row(
                stage="decode_preprocess",
                transfer_syntax=_TS_NAMES.get(str(uid), str(uid)),
                workers=1,
                n=len(paths),
                seconds=dt,
                items_per_s=len(paths) / dt if dt else None,
                note=f"one process; mean J2K reduce level {np.mean(levels):.1f}" if levels else None,
            )
        )
    return rows, np.stack(images) if images else np.zeros((0,))


def bench_model(model: ModelFile, backend: str, o: BenchOptions, images: np.ndarray, n_fields: int) -> dict:
    from xbmd_batch.infer.select import open_runner
    from xbmd_batch.parity_feeds import make_reference_feeds

    b = o.batch_size
    reps = int(np.ceil(b / max(1, len(images))))
    batch = np.concatenate([images] * reps)[:b].astype(np.float32)
    feeds = {
        "image": batch,
        "meta": np.zeros((b, n_fields), np.float32),
        "meta_mask": np.ones((b, n_fields), np.float32),
    }
    with open_runner(model, backend, o.device, o.precision, b, parity_feeds=make_reference_feeds) as r:
        for _ in range(3):
            r.infer(feeds)  # warm-up (and, for TensorRT/CUDA, synchronised by returning host arrays)
        t0 = time.perf_counter()
        for _ in range(o.model_iters):
            r.infer(feeds)
        dt = time.perf_counter() - t0
        n = b * o.model_iters
        return _row(
            stage="model_only", backend=r.backend, precision=r.precision, batch_size=b, n=n, seconds=dt,
            items_per_s=n / dt, note=r.reason,
        )  # fmt: skip


def bench_end_to_end(
    dicom_dir: Path, meta: Path, model_path: Path, out: Path, backend: str, o: BenchOptions
) -> dict:
    from xbmd_batch.score import ScoreOptions, score_cohort

    res = score_cohort(
        dicom_dir,
        meta,
        model_path,
        out,
        ScoreOptions(
            backend=backend,
            device=o.device,
            precision=o.precision,
            batch_size=o.batch_size,
            workers=o.workers,
            quiet=True,
            preprocess_device=o.preprocess_device,
        ),  # fmt: skip
    )
    tp = res.throughput
    return _row(
        stage="end_to_end", backend=res.backend, precision=res.precision, batch_size=o.batch_size,
        workers=tp.get("decode_workers"), n=tp.get("images_this_session"), seconds=tp.get("scoring_loop_s"),
        items_per_s=tp.get("images_per_s"),
        note=f"score exit {res.exit_code}; preprocessing on {res.preprocess_device}",
    )  # fmt: skip


def bench_plain_loop(
    dicom_dir: Path, headers: pl.DataFrame, model: ModelFile, backend: str, o: BenchOptions
) -> dict:
    """The reference a user would write by hand, on the same files and model: for each file
    ``pydicom.dcmread(...).pixel_array`` -> OpenCV ``INTER_AREA`` resize to the model's size -> percentile
    clip + standardise -> the model at batch 1 (metadata all missing). One process; no padding, rescale or
    MONOCHROME1 handling (it is a speed reference, not a correct pipeline)."""
    import cv2
    import pydicom

    from xbmd_batch.infer.select import open_runner
    from xbmd_batch.parity_feeds import make_reference_feeds

    card = model.card
    s = card.preprocess.image_size
    lo_q, hi_q = card.preprocess.clip_percentiles
    mean, std = card.preprocess.norm_mean, card.preprocess.norm_std
    nf = len(card.schema.fields)
    ok = headers.filter(pl.col("header_error").is_null() & pl.col("rows").is_not_null())
    paths = [Path(dicom_dir) / r for r in ok.get_column("relative_path").to_list()[: o.plain_loop_n]]
    meta, mask = np.zeros((1, nf), np.float32), np.ones((1, nf), np.float32)
    # channels_last=False: the module as a user would run it (torch's default layout); the torch runner's
    # NHWC weights are one of the things the comparison measures
    with open_runner(
        model, backend, o.device, o.precision, 1, parity_feeds=make_reference_feeds, channels_last=False
    ) as r:

        def one(p: Path) -> None:
            a = pydicom.dcmread(p).pixel_array
            y = cv2.resize(a, (s, s), interpolation=cv2.INTER_AREA).astype(np.float32)
            lo, hi = np.percentile(y, (lo_q, hi_q))
            y = (np.clip((y - lo) / max(hi - lo, 1e-6), 0, 1) - mean) / std
            r.infer({"image": y[None, None], "meta": meta, "meta_mask": mask})

        if paths:
            one(paths[0])  # warm-up
        t0 = time.perf_counter()
        for p in paths:
            one(p)
        dt = time.perf_counter() - t0
        return _row(
            stage="plain_loop", backend=r.backend, precision=r.precision, batch_size=1, workers=1,
            n=len(paths), seconds=dt, items_per_s=len(paths) / dt if dt else None,
            note="pydicom -> numpy -> cv2 resize -> model, batch 1",
        )  # fmt: skip


def model_for_backend(models: list[ModelFile], backend: str, precision: str = "auto") -> ModelFile:
    """torch needs the checkpoint, onnxruntime / TensorRT the ONNX file; auto takes the first given.

    onnxruntime runs an ONNX graph in the precision it was stored in, so with ``--precision fp16`` it takes
    the ``.fp16.onnx`` file when one was given (else the fp32 graph); TensorRT converts by itself and takes
    the fp32 graph first, so one engine cache serves every precision."""
    want = {"torch": "checkpoint", "onnxruntime": "onnx", "tensorrt": "onnx"}.get(backend)
    candidates = [m for m in models if want is None or m.kind == want]
    if not candidates:
        from xbmd_batch.errors import InputError

        raise InputError(f"--backend {backend} needs a {want} model file; pass it with another --model")
    if want == "onnx" and len(candidates) > 1:
        prefer = precision if backend == "onnxruntime" and precision in ("fp16", "fp32") else "fp32"
        for m in candidates:
            if str(m.card.extra.get("onnx_precision", "fp32")) == prefer:
                return m
    return candidates[0]


def run_bench(
    dicom_dir: Path, meta: Path, model_path: Path | list[Path], out_dir: Path, o: BenchOptions | None = None
) -> pl.DataFrame:
    """Measure every stage; write OUT/bench.parquet and OUT/bench.json; return the table.

    ``model_path`` may list the same model as checkpoint and ONNX, so torch and onnxruntime compare."""
    from xbmd_batch.infer.model_file import open_model
    from xbmd_batch.score.manifest import machine_info, versions

    o = o or BenchOptions()
    models = [open_model(m) for m in (model_path if isinstance(model_path, list) else [model_path])]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = models[0].card
    rows: list[dict[str, Any]] = []
    hrow, headers = bench_headers(dicom_dir)
    rows.append(hrow)
    drows, images = bench_decode(dicom_dir, headers, card, o.decode_sample)
    rows.extend(drows)
    plain: float | None = None
    if o.plain_loop_n > 0:
        pb = o.backends[0]
        p_row = bench_plain_loop(dicom_dir, headers, model_for_backend(models, pb, o.precision), pb, o)
        rows.append(p_row)
        plain = p_row["items_per_s"]
    for backend in o.backends:
        mp = model_for_backend(models, backend, o.precision)
        m = bench_model(mp, backend, o, images, len(card.schema.fields))
        rows.append(m)
        if o.end_to_end:
            e = bench_end_to_end(dicom_dir, meta, mp.path, out_dir / f"e2e_{m['backend']}", backend, o)
            e["ratio_to_model_only"] = (
                (e["items_per_s"] or 0.0) / m["items_per_s"] if m["items_per_s"] else None
            )
            rows.append(e)
    for r in rows:
        if plain and r["items_per_s"]:
            r["ratio_to_plain_loop"] = r["items_per_s"] / plain
    df = pl.DataFrame(rows, schema=BENCH_SCHEMA)
    synthetic = is_synthetic(dicom_dir)
    info = {
        "synthetic_cohort": synthetic,
        "machine": machine_info(),
        "versions": versions(),
        "models": [{"path": str(m.path), "sha256": m.sha256} for m in models],
        "image_size": card.preprocess.image_size,
        "options": {**o.__dict__, "plot": str(o.plot) if o.plot else None, "backends": list(o.backends)},
        "rows": df.to_dicts(),
    }
    df.write_parquet(out_dir / "bench.parquet")
    (out_dir / "bench.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    if o.plot:
        plot_bench(df, Path(o.plot), synthetic)
    return df


_TABLE_NAMES = {"header_read": "headers", "decode_preprocess": "decode", "model_only": "model",
                "end_to_end": "score", "plain_loop": "plain loop"}  # fmt: skip


def bench_table(df: pl.DataFrame, synthetic: bool) -> Any:
    """Rich table that fits an 80-column terminal: ratios to model-only and to the plain loop per row."""
    from rich import box
    from rich.table import Table

    t = Table(
        title="xbmd-batch bench" + (" (SYNTHETIC cohort)" if synthetic else ""),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        caption="/model: ratio to model-only; /plain: ratio to the plain loop (pydicom, resize, batch 1)",
        caption_justify="left",
    )
    for c in ("stage", "backend", "prec", "syntax", "batch", "n", "items/s", "/model", "/plain"):
        t.add_column(c, justify="left" if c in ("stage", "backend", "prec", "syntax") else "right")
    for r in df.iter_rows(named=True):
        t.add_row(
            _TABLE_NAMES.get(r["stage"], r["stage"]), r["backend"] or "", r["precision"] or "",
            r["transfer_syntax"] or "", "" if r["batch_size"] is None else str(r["batch_size"]),
            str(r["n"] or ""), "" if r["items_per_s"] is None else f"{r['items_per_s']:.1f}",
            "" if r["ratio_to_model_only"] is None else f"{r['ratio_to_model_only']:.2f}",
            "" if r["ratio_to_plain_loop"] is None else f"{r['ratio_to_plain_loop']:.2f}x",
        )  # fmt: skip
    return t


def plot_bench(df: pl.DataFrame, path: Path, synthetic: bool) -> Path:
    """Horizontal bars on a log axis (a 3-item/s plain loop and a 3,000-item/s header read both stay
    readable), each labelled with its ratio to the plain loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        " ".join(x for x in (r["stage"], r["backend"] or "", r["transfer_syntax"] or "") if x)
        for r in df.iter_rows(named=True)
    ]
    vals = [r["items_per_s"] or 0.0 for r in df.iter_rows(named=True)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    bars = ax.barh(
        labels, vals, color=["grey" if r["stage"] == "plain_loop" else "C0" for r in df.iter_rows(named=True)]
    )
    ax.set_xscale("log")
    ax.set_xlabel("items / s (log scale)")
    for bar, r in zip(bars, df.iter_rows(named=True), strict=True):
        if r["ratio_to_plain_loop"]:
            y = bar.get_y() + bar.get_height() / 2
            ax.text(bar.get_width(), y, f" {r['ratio_to_plain_loop']:.1f}x plain", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_title("xbmd-batch bench" + (" - SYNTHETIC cohort" if synthetic else ""))
    if synthetic:
        fig.text(0.99, 0.01, "SYNTHETIC", ha="right", va="bottom", fontsize=9, color="crimson")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
