"""`xbmd-batch bench` on a tiny synthetic cohort: every stage measured, table written, SYNTHETIC labelled."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from xbmd_batch.bench import BENCH_SCHEMA, BenchOptions, is_synthetic, run_bench


def test_bench_all_stages(cohort_session: Path, tiny_model: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    o = BenchOptions(
        backends=("torch", "onnxruntime"), batch_size=4, workers=1, model_iters=2, plot=out / "b.png"
    )
    df = run_bench(cohort_session / "dicom", cohort_session / "meta.csv", [tiny_onnx, tiny_model], out, o)
    assert dict(df.schema) == BENCH_SCHEMA
    stages = df["stage"].to_list()
    assert stages[0] == "header_read" and "decode_preprocess" in stages
    # torch runs the checkpoint, onnxruntime the ONNX file: one table compares them
    assert df.filter(pl.col("stage") == "model_only")["backend"].to_list() == ["torch", "onnxruntime"]
    e2e = df.filter(pl.col("stage") == "end_to_end")
    assert e2e["backend"].to_list() == ["torch", "onnxruntime"] and (e2e["ratio_to_model_only"] > 0).all()
    ts = set(df.filter(pl.col("stage") == "decode_preprocess")["transfer_syntax"])
    assert {"explicit-le", "j2k-lossless"} <= ts
    info = json.loads((out / "bench.json").read_text())
    assert info["synthetic_cohort"] is True and is_synthetic(cohort_session / "dicom")
    assert info["machine"]["cpu_count"] >= 1
    assert (out / "b.png").stat().st_size > 1000
    assert pl.read_parquet(out / "bench.parquet").height == df.height
