"""Stage 8: parts + plan -> OUT/scores.parquet and OUT/failures.parquet (each written atomically).

The clinical columns (T-score, WHO class, screening flags) and the uncertainty columns (conformal interval
``bmd_lo``/``bmd_hi`` and predictive probabilities ``p_t_le_*``, ``xbmd_batch.uncertainty``) are derived here
from ``bmd_pred``, the chosen reference and the model card's out-of-fold residuals, so a resumed run may
change ``--reference`` or ``--interval`` without rescoring. ``cohort_summary.parquet``
(``xbmd_batch.score.cohort_summary``) is written from the final scores. Only rows of the current plan are
kept (a file deleted between sessions drops out), in plan order (relative path), each exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from xbmd_batch.clinical import SCREEN_THRESHOLDS, WHO_CLASSES, get_reference, who_class
from xbmd_batch.fsutil import atomic_write_parquet
from xbmd_batch.score.cohort_summary import cohort_summary, threshold_suffix
from xbmd_batch.score.reconcile import FAILURE_SCHEMA
from xbmd_batch.score.writer import list_parts
from xbmd_batch.uncertainty import DEFAULT_LEVEL, ConditionalConformal

ID_COLUMNS = ("subject_key", "relative_path", "sop_instance_uid", "study_instance_uid")


def screen_column(t: float) -> str:
    """Column name of the screening flag T <= t, e.g. -1.0 -> screen_t_le_m1, -2.5 -> screen_t_le_m2_5."""
    return f"screen_t_le_{threshold_suffix(t)}"


def prob_column(t: float) -> str:
    """Column name of the predictive probability P(T <= t), e.g. -2.5 -> p_t_le_m2_5."""
    return f"p_t_le_{threshold_suffix(t)}"


def scores_schema(field_names: tuple[str, ...]) -> dict[str, pl.DataType]:
    """The scores.parquet columns and types, in order (docs/outputs.md)."""
    return {
        **{c: pl.String for c in ID_COLUMNS},
        "image_index_for_subject": pl.Int32,
        "n_images_for_subject": pl.Int32,
        "bmd_pred": pl.Float32,
        "bmd_lo": pl.Float32,
        "bmd_hi": pl.Float32,
        "interval_level": pl.Float32,
        "bmd_sd_models": pl.Float32,
        "t_score": pl.Float64,
        "who_class": pl.String,
        **{screen_column(t): pl.Boolean for t in SCREEN_THRESHOLDS},
        **{prob_column(t): pl.Float32 for t in SCREEN_THRESHOLDS},
        "t_score_reference": pl.String,
        "sex": pl.String,
        "age_band": pl.String,
        **{f"attn_{f}": pl.Float32 for f in field_names},
        **{f"missing_{f}": pl.Boolean for f in field_names},
        **{f"derived_{f}": pl.Boolean for f in field_names},
        "model_sha256": pl.String,
        "backend": pl.String,
        "precision": pl.String,
        "run_id": pl.String,
    }


FAILURE_COLUMNS = [*FAILURE_SCHEMA.keys(), "run_id"]


def read_parts(out_dir: Path, part_files: list[Path] | None = None) -> pl.DataFrame | None:
    parts = list_parts(out_dir) if part_files is None else list(part_files)
    if not parts:
        return None
    return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")


def finalize(
    out_dir: Path,
    plan_keys: pl.DataFrame,
    quarantine: pl.DataFrame,
    field_names: tuple[str, ...],
    reference: str,
    model_sha256: str,
    run_id: str,
    *,
    conformal: ConditionalConformal | None = None,
    interval: float = DEFAULT_LEVEL,
    strata: pl.DataFrame | None = None,
    n_boot: int = 1000,
    part_files: list[Path] | None = None,
) -> dict[str, Any]:
    """Write scores.parquet, failures.parquet and cohort_summary.parquet. ``plan_keys``: relative_path,
    sop_instance_uid (output form) in plan order, optionally file_size / file_mtime_ns (the files now): a row
    recorded for other bytes is not used; the latest row of a key wins (a retried transient failure or a
    re-scored changed file supersedes). ``conformal``: the card's out-of-fold residual model (None: null
    intervals and probabilities). ``strata``: meta_row, sex, age_band (the cohort summary's groups).

    ``part_files``: read these parts instead of OUT/parts/ (`merge` passes the union of its shards' parts).

    Returns counts (scored, failed_in_scoring, not_processed, rows_dropped_from_parts, failures_total) and the
    WHO class distribution of scores.parquet, so nobody has to read the tables back to count them.
    """
    ref = get_reference(reference)
    stat_cols = [c for c in ("file_size", "file_mtime_ns") if c in plan_keys.columns]
    order = plan_keys.select("relative_path", "sop_instance_uid", *stat_cols).with_row_index("_order")
    order = order.rename({c: f"_now_{c}" for c in stat_cols})
    parts = read_parts(out_dir, part_files)
    if parts is None:
        parts = pl.DataFrame(
            schema={"status": pl.String, "relative_path": pl.String, "sop_instance_uid": pl.String}
        )
    n_before = parts.height
    parts = parts.join(order, on=["relative_path", "sop_instance_uid"], how="inner", maintain_order="left")
    if stat_cols and all(c in parts.columns for c in stat_cols):
        same = pl.lit(True)
        for c in stat_cols:
            same = same & (
                pl.col(c).is_null() | pl.col(f"_now_{c}").is_null() | (pl.col(c) == pl.col(f"_now_{c}"))
            )
        parts = parts.filter(same)  # a row about bytes that are no longer on disk
    parts = parts.drop([f"_now_{c}" for c in stat_cols])
    parts = parts.unique(subset=["relative_path", "sop_instance_uid"], keep="last", maintain_order=True)
    dropped = n_before - parts.height  # rows of files no longer planned, or (never expected) repeats
    parts = parts.sort("_order")

    scored = parts.filter(pl.col("status") == "scored")
    bmd = scored.get_column("bmd_pred").to_numpy().astype(np.float64) if scored.height else np.zeros(0)
    t = np.asarray(ref.t_score(bmd), dtype=np.float64)
    extra = {
        "t_score": pl.Series("t_score", t, dtype=pl.Float64),
        "who_class": pl.Series("who_class", who_class(t).tolist() if len(t) else [], dtype=pl.String),
        **{
            screen_column(th): pl.Series(screen_column(th), t <= th, dtype=pl.Boolean)
            for th in SCREEN_THRESHOLDS
        },
    }
    if conformal is not None and len(bmd):
        lo, hi = conformal.interval(bmd, interval)
        extra["bmd_lo"] = pl.Series("bmd_lo", lo, dtype=pl.Float32)
        extra["bmd_hi"] = pl.Series("bmd_hi", hi, dtype=pl.Float32)
        extra["interval_level"] = pl.Series("interval_level", np.full(len(bmd), interval), dtype=pl.Float32)
        bins = conformal.bin_of(bmd)
        for th in SCREEN_THRESHOLDS:
            p = conformal.prob_le(bmd, ref.bmd_at(th), bins)
            extra[prob_column(th)] = pl.Series(prob_column(th), p, dtype=pl.Float32)
    if strata is not None and scored.height:
        scored = scored.join(
            strata.select("meta_row", "sex", "age_band"), on="meta_row", how="left", maintain_order="left"
        )
    scored = scored.with_columns(
        *extra.values(),
        pl.lit(reference, pl.String).alias("t_score_reference"),
        pl.lit(model_sha256, pl.String).alias("model_sha256"),
        pl.lit(run_id, pl.String).alias("run_id"),
    )
    schema = scores_schema(field_names)
    for c, dt in schema.items():  # an empty run still gets the full schema
        if c not in scored.columns:
            scored = scored.with_columns(pl.lit(None, dt).alias(c))
    scored = scored.select(pl.col(c).cast(dt) for c, dt in schema.items())
    atomic_write_parquet(Path(out_dir) / "scores.parquet", scored.to_arrow())
    summary = cohort_summary(scored, ref, conformal, interval, n_boot=n_boot)
    atomic_write_parquet(Path(out_dir) / "cohort_summary.parquet", summary.to_arrow())

    failed = parts.filter(pl.col("status") == "failed")
    if failed.height:
        failed = failed.select(*FAILURE_SCHEMA.keys())
    else:
        failed = pl.DataFrame(schema=FAILURE_SCHEMA)
    failures = pl.concat([quarantine.cast(FAILURE_SCHEMA), failed.cast(FAILURE_SCHEMA)], how="vertical")
    failures = failures.with_columns(pl.lit(run_id, pl.String).alias("run_id")).select(FAILURE_COLUMNS)
    atomic_write_parquet(Path(out_dir) / "failures.parquet", failures.to_arrow())
    return {
        "scored": scored.height,
        "failed_in_scoring": failed.height,
        "not_processed": plan_keys.height - parts.height,
        "rows_dropped_from_parts": dropped,
        "failures_total": failures.height,  # quarantined before scoring + failed while scoring
        "who_distribution": {c: int((scored.get_column("who_class") == c).sum()) for c in WHO_CLASSES},
    }
