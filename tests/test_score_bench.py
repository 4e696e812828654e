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
    # the plain-loop reference (pydicom -> resize -> model at batch 1) and every row's ratio to it
    plain = df.filter(pl.col("stage") == "plain_loop")
    assert plain.height == 1 and plain["batch_size"][0] == 1 and plain["n"][0] >= 1
    assert plain["ratio_to_plain_loop"][0] == 1.0
    assert df.filter(pl.col("items_per_s").is_not_null())["ratio_to_plain_loop"].is_not_null().all()


def test_bench_table_fits_80_columns() -> None:
    from rich.console import Console

    from xbmd_batch.bench import bench_table

    rows = [
        {"stage": "decode_preprocess", "transfer_syntax": "j2k-lossless", "workers": 1, "n": 24,
         "items_per_s": 41.234, "ratio_to_plain_loop": 3.5},
        {"stage": "end_to_end", "backend": "onnxruntime", "precision": "fp32", "batch_size": 32, "n": 256,
         "items_per_s": 1234.5, "ratio_to_model_only": 0.93, "ratio_to_plain_loop": 12.25},
    ]  # fmt: skip
    df = pl.DataFrame([{k: r.get(k) for k in BENCH_SCHEMA} for r in rows], schema=BENCH_SCHEMA)
    console = Console(width=80, record=True)
    console.print(bench_table(df, synthetic=True))
    text = console.export_text()
    lines = text.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text, text  # no cell truncated
    assert "onnxruntime" in text and "j2k-lossless" in text
    assert sum("onnxruntime" in line and "12.25x" in line for line in lines) == 1  # one row, one line
    assert "12.25x" in text and "0.93" in text and "1234.5" in text


def test_model_for_backend_picks_the_graph_of_the_precision(
    tiny_onnx: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """onnxruntime runs a graph as stored: with --precision fp16 bench must hand it the .fp16.onnx file, and
    TensorRT (which converts by itself) the fp32 graph, whatever order the files were given in."""
    import onnx

    from xbmd_batch.bench import model_for_backend
    from xbmd_batch.infer.model_file import open_model
    from xbmd_batch.onnx_card import embed_card, read_onnx_card

    card = read_onnx_card(tiny_onnx)
    m16 = onnx.load(str(tiny_onnx))
    embed_card(m16, card.with_extra(onnx_precision="fp16"))  # the card decides; the graph is irrelevant here
    fp16 = tmp_path / "tiny.fp16.onnx"
    onnx.save(m16, str(fp16))
    models = [open_model(p) for p in (fp16, tiny_model, tiny_onnx)]

    def pick(backend: str, precision: str, ms: list = models) -> Path:
        return model_for_backend(ms, backend, precision).path

    assert pick("onnxruntime", "fp16") == fp16
    assert pick("onnxruntime", "fp32") == tiny_onnx
    assert pick("tensorrt", "fp16") == tiny_onnx
    assert pick("torch", "fp16") == tiny_model
    assert pick("onnxruntime", "fp32", models[:1]) == fp16  # only one: let the runner say why not
