"""The output stage of `python -m train`: tables, paired tests, plots, the repeated fusion comparison, the
epidemiology analysis and report.md, from the finished cross-validation (``write_outputs``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from train.args import LOSSES, command_line, repeats_seeds, vname
from train.presets import model_config_for

if TYPE_CHECKING:
    from train.__main__ import CV, Data, Run


def paired_tests(args: argparse.Namespace, fold_m: pl.DataFrame) -> pl.DataFrame | None:
    """Paired Wilcoxon tests over folds for the comparisons --compare asked for (None without --compare)."""
    from train.metrics import paired_wilcoxon

    if not args.compare:
        return None

    def per_fold(v: str, key: str) -> list[float]:
        return fold_m.filter(pl.col("variant") == v).sort("fold")[key].to_list()

    pairs = []
    if args.compare in ("all", "fusion"):
        pairs.append((vname("xattn", args.loss), vname("concat", args.loss)))
    if args.compare in ("all", "loss"):
        pairs += [(vname("xattn", "wsmoothl1"), vname("xattn", x)) for x in LOSSES if x != "wsmoothl1"]
    rows = []
    for a, b in pairs:
        for key in ("mse", "mae", "r2"):
            r = paired_wilcoxon(per_fold(a, key), per_fold(b, key), key)
            rows.append({"comparison": f"{a} vs {b}", "a": a, "b": b, **r})
    return pl.DataFrame(rows) if rows else None


def write_plots(run: Run, data: Data, cv: CV, history: pl.DataFrame, fold_m: pl.DataFrame) -> list[str]:
    """Every figure of the report; returns notes about figures that could not be drawn."""
    from train import plots
    from xbmd_batch.config import DEFAULT_SCHEMA

    args, out, primary, oof = run.args, run.out, run.primary, cv.oof
    tag = "synthetic cohort" if data.cohort.is_synthetic else ""
    notes: list[str] = []
    prim_oof = oof.filter(pl.col("variant") == primary)
    plots.scatter_by_fold(prim_oof, out / "scatter_folds.png", tag, f"({primary})")
    plots.scatter_pooled(prim_oof, out / "scatter_pooled.png", tag, f"({primary})")
    roc_variants = [primary] + (
        [vname("concat", args.loss)]
        if args.compare in ("all", "fusion") and primary.startswith("xattn")
        else []
    )
    plots.roc_curves(oof.filter(pl.col("variant").is_in(roc_variants)), args.reference, out / "roc.png", tag)
    att_v = primary if primary.startswith("xattn") else None
    if att_v is None and args.compare in ("all", "fusion"):
        att_v = vname("xattn", args.loss)
    if att_v is not None:
        plots.field_attention(
            oof.filter(pl.col("variant") == att_v),
            DEFAULT_SCHEMA.names,
            args.reference,
            out / "attention.png",
            tag,
            f"({att_v})",
        )
    else:
        notes.append("attention.png not drawn: the concat baseline has no cross-attention (uniform 1/F)")
    plots.training_curves(
        history.filter(pl.col("variant") == primary), out / "training_curves.png", tag, f"({primary})"
    )
    if args.compare in ("all", "loss"):
        plots.loss_comparison(fold_m, LOSSES, out / "loss_comparison.png", tag)
    if args.compare in ("all", "fusion"):
        plots.fusion_comparison(fold_m, args.loss, out / "fusion_comparison.png", tag)
    return notes


def repeated_fusion(run: Run, data: Data) -> dict[str, Any] | None:
    """--compare fusion: repeated CV x seeds, corrected t-test + paired bootstrap (train/repeated.py)."""
    from train.repeated import analyse as analyse_repeated
    from train.repeated import repeated_fusion_cv

    args, out = run.args, run.out
    repeats, n_seeds = repeats_seeds(args)
    if args.compare not in ("all", "fusion") or repeats * n_seeds <= 1:
        return None
    rep_oof, rep_splits = repeated_fusion_cv(
        cohort=data.cohort,
        builder=data.builder,
        rows=data.rows,
        hp=run.hp,
        device=run.device,
        loss_name=args.loss,
        reference=args.reference,
        repeats=repeats,
        seeds=n_seeds,
        base_seed=args.seed,
        model_config_for=model_config_for,
        log=run.console.log,
        pretrained=args.pretrained,
    )
    rep_oof.write_parquet(out / "fusion_repeated_oof.parquet")
    rep_splits.write_parquet(out / "fusion_repeated_splits.parquet")
    fusion_rep = analyse_repeated(rep_oof, rep_splits, seed=args.seed)
    (out / "fusion_repeated.json").write_text(json.dumps(fusion_rep, indent=2, default=float))
    return fusion_rep


def epidemiology(run: Run, data: Data, cv: CV) -> dict[str, Any]:
    """train.analysis on the primary variant: calibration, Bland-Altman, CIs, operating points, subgroups."""
    from train import plots
    from train.analysis import covariates_for, per_subject, run_analysis
    from xbmd_batch.clinical import get_reference

    args, out, cohort = run.args, run.out, data.cohort
    tag = "synthetic cohort" if cohort.is_synthetic else ""
    prim_oof = cv.oof.filter(pl.col("variant") == run.primary)
    labels_path = Path(args.labels) if args.labels else Path(args.cohort) / "truth.csv"
    covariates = covariates_for(cohort.subject_ids[data.rows], cohort.meta_df, labels_path)
    epi = run_analysis(
        prim_oof, cv.base_oof, get_reference(args.reference), covariates, target_sens=args.target_sensitivity
    )
    plots.calibration_plot(epi["deciles"], epi.get("deciles_raw"), out / "calibration.png", tag)
    subj = per_subject(prim_oof)
    plots.bland_altman_plot(
        subj["y"].to_numpy(), subj["p"].to_numpy(), epi["bland_altman"], out / "bland_altman.png", tag
    )
    return epi


def write_outputs(
    run: Run, data: Data, cv: CV, final_info: dict[str, Any] | None, wall_start: float
) -> dict[str, Any]:
    """Tables, plots and report.md; returns the run summary (paths, per-variant mean metrics, wall time)."""
    from train.metrics import mean_sd
    from train.repeated import markdown as repeated_markdown
    from train.report import write_report

    args, out, cohort, rows = run.args, run.out, data.cohort, data.rows
    fold_m = cv.metrics.filter(pl.col("scope") == "fold")
    paired = paired_tests(args, fold_m)
    fusion_rep = repeated_fusion(run, data)
    cv.oof.write_parquet(out / "oof.parquet")
    cv.base_oof.write_parquet(out / "baselines_oof.parquet")
    cv.metrics.write_parquet(out / "metrics.parquet")
    history = pl.DataFrame(run.hist_rows)
    history.write_parquet(out / "history.parquet")
    if paired is not None:
        paired.write_parquet(out / "paired_tests.parquet")
    notes = data.notes + write_plots(run, data, cv, history, fold_m)
    epi = epidemiology(run, data, cv)
    k_total = len(data.splits)
    if args.compare and k_total < 6:
        notes.append(
            f"{k_total} folds: the Wilcoxon test cannot reach p < 0.05 (smallest p = {2 / 2**k_total:.4f})"
        )

    wall = time.perf_counter() - wall_start
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) + ["report.md"]
    write_report(
        out / "report.md",
        run_name=out.name,
        command=command_line(args),
        synthetic=cohort.is_synthetic,
        cohort={
            "n_images": len(rows),
            "n_subjects": int(len(np.unique(cohort.subject_ids[rows]))),
            "label_col": args.label_col,
            "mapping": cohort.mapping,
            "y_mean": float(cohort.y[rows].mean()),
            "y_sd": float(cohort.y[rows].std(ddof=1)),
        },
        cohort_info=cohort.cohort_info,
        preset=run.hp.to_dict(),
        protocol=data.protocol,
        reference=args.reference,
        variants=[vname(*x) for x in run.variants],
        primary=run.primary,
        metrics=cv.metrics,
        paired=paired,
        files=sorted(set(files)),
        wall_seconds=wall,
        notes=notes,
        final=final_info,
        epi=epi,
        extra_sections=repeated_markdown(fusion_rep, "SYNTHETIC " if cohort.is_synthetic else "")
        if fusion_rep
        else (),
    )
    means = {
        vname(*x): {
            key: mean_sd(fold_m.filter(pl.col("variant") == vname(*x))[key].to_list())[:2]
            for key in ("mse", "mae", "r2")
        }
        for x in run.variants
    }
    run.console.log(f"done in {wall:.0f} s -> {out}/report.md")
    return {"out": str(out), "wall_seconds": wall, "means": means, "synthetic": cohort.is_synthetic}
