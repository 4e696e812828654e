"""report.md of a training run: what was run, on what, how long, and every metric as mean ± SD over folds.

On a synthetic cohort (cohort.json present) every table and number is labelled SYNTHETIC: these are numbers
about our generator, not about patients.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from train.metrics import fmt_mean_sd, thr_tag
from xbmd_batch.clinical import SCREEN_THRESHOLDS, get_reference


def machine_summary() -> str:
    """CPU/GPU, core count and load average: timings on a shared box are only meaningful with the load."""
    import torch

    parts = [platform.node() or "?", platform.machine(), f"{os.cpu_count()} CPU cores"]
    try:
        la = os.getloadavg()
        parts.append(f"load avg {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} at report time")
    except OSError:
        pass
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    else:
        parts.append("no GPU")
    parts.append(f"torch {torch.__version__}, torch threads = {torch.get_num_threads()}")
    return ", ".join(parts)


def oracle_figures(info: dict[str, Any] | None, prefix: str = "") -> dict[str, float]:
    """Every numeric entry of cohort.json whose key mentions 'oracle' (flattened 'a.b' keys)."""
    out: dict[str, float] = {}
    if not isinstance(info, dict):
        return out
    for k, v in info.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(oracle_figures(v, f"{name}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and "oracle" in name.lower():
            out[name] = float(v)
    return out


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.{digits}g}" if abs(x) < 1e-3 else f"{x:.{digits}f}"
    return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def metrics_table(
    metrics: pl.DataFrame, variants: Sequence[str], keys: Sequence[tuple[str, str]], scope: str = "fold"
) -> str:
    """Rows = variants, columns = metrics as 'mean ± SD' over folds."""
    rows = []
    for v in variants:
        d = metrics.filter((pl.col("variant") == v) & (pl.col("scope") == scope))
        rows.append([f"`{v}`", *[fmt_mean_sd(d[k].to_list()) for k, _ in keys]])
    return _table(["variant", *[lab for _, lab in keys]], rows)


def write_report(
    path: Path,
    *,
    run_name: str,
    command: str,
    synthetic: bool,
    cohort: dict[str, Any],
    cohort_info: dict[str, Any] | None,
    preset: dict[str, Any],
    protocol: str,
    reference: str,
    variants: Sequence[str],
    primary: str,
    metrics: pl.DataFrame,
    paired: pl.DataFrame | None,
    files: Sequence[str],
    wall_seconds: float,
    notes: Sequence[str] = (),
    final: dict[str, Any] | None = None,
    epi: dict[str, Any] | None = None,
    extra_sections: Sequence[str] = (),
) -> Path:
    syn = "SYNTHETIC " if synthetic else ""
    ref = get_reference(reference)
    out: list[str] = [f"# Training report: {run_name}", ""]
    if synthetic:
        out += [
            "> **SYNTHETIC COHORT.** Every number below is measured on data from the project's generator "
            "(`xbmd_batch.synth`), not on patients. It shows that the pipeline learns what the generator "
            "put in; it says nothing about clinical accuracy.",
            "",
        ]
    out += [
        f"- command: `{command}`",
        f"- wall time: {wall_seconds:.0f} s ({wall_seconds / 60:.1f} min)",
        f"- machine: {machine_summary()}",
        f"- protocol: {protocol}",
        f"- cohort: {cohort.get('n_images')} images of {cohort.get('n_subjects')} subjects "
        f"({'SYNTHETIC, ' if synthetic else ''}label column `{cohort.get('label_col')}`, "
        f"subject↔file by {cohort.get('mapping')}), label mean {cohort.get('y_mean', float('nan')):.3f} "
        f"± {cohort.get('y_sd', float('nan')):.3f} g/cm²",
        f"- T-score reference: `{reference}` ({ref.description}); "
        f"thresholds T ≤ −1 → BMD ≤ {ref.bmd_at(-1):.3f}, "
        f"T ≤ −2.5 → BMD ≤ {ref.bmd_at(-2.5):.3f} g/cm²",
        f"- preset: `{preset.get('name')}` — encoder {preset.get('encoder', 'resnet34')}"
        f"{' + ridge-fitted wide path' if preset.get('wide') else ''}, image {preset.get('image_size')}², "
        f"d_model {preset.get('d_model')}, "
        f"{preset.get('n_layers')} layers × {preset.get('n_heads')} heads, ≤ {preset.get('epochs')} epochs, "
        f"batch {preset.get('batch_size')}, lr {preset.get('lr')}, "
        + (f"patience {preset.get('patience')}" if preset.get("select_best", True) else "last epoch kept"),
        "",
    ]
    oracle = oracle_figures(cohort_info)
    if oracle:
        out += [
            f"## {syn}Cohort ceiling",
            "",
            "The generator knows its irreducible noise; the oracle R² is the best any model could reach "
            "on this cohort (from `cohort.json`):",
            "",
            *[f"- `{k}` = {_fmt(v)}" for k, v in oracle.items()],
            "",
        ]
    elif synthetic:
        out += ["(cohort.json has no oracle figure)", ""]

    reg_keys = [("mse", "MSE"), ("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R²"), ("pearson_r", "Pearson r")]
    ba_keys = [("ba_bias", "BA bias"), ("ba_loa_low", "BA lower LoA"), ("ba_loa_high", "BA upper LoA")]
    out += [
        f"## {syn}Regression, mean ± SD over folds",
        "",
        "BMD in g/cm² (MSE in g²/cm⁴). Bland–Altman (BA): bias = mean(estimate − DXA), "
        "limits = bias ± 1.96 SD.",
        "",
        metrics_table(metrics, variants, reg_keys),
        "",
        "Reference predictors on the same folds (no image): the training-part mean, and ridge regression "
        "on the encoded metadata (values + presence mask):",
        "",
        metrics_table(
            metrics,
            metrics.filter(pl.col("scope") == "baseline")["variant"].unique(maintain_order=True).to_list(),
            reg_keys,
            scope="baseline",
        ),
        "",
        metrics_table(metrics, variants, ba_keys),
        "",
    ]
    for t in SCREEN_THRESHOLDS:
        tg = thr_tag(t)
        keys = [
            (f"auc_{tg}", "ROC-AUC"),
            (f"precision_{tg}", "precision"),
            (f"recall_{tg}", "recall"),
            (f"f1_{tg}", "F1"),
            (f"specificity_{tg}", "specificity"),
            (f"prevalence_{tg}", "prevalence"),
        ]
        out += [
            f"## {syn}Screening at T ≤ {t:g} (`{reference}`), mean ± SD over folds",
            "",
            "Positive = DXA T-score ≤ threshold; flagged = estimated T-score ≤ threshold; "
            "AUC score = −estimate. A fold without positives (or without flags) leaves that metric "
            "undefined; '(k/K folds)' says how many folds define it.",
            "",
            metrics_table(metrics, variants, keys),
            "",
        ]
    pooled = metrics.filter(pl.col("scope") == "pooled")
    if pooled.height:
        rows = []
        for v in variants:
            d = pooled.filter(pl.col("variant") == v)
            if d.height:
                r = d.row(0, named=True)
                rows.append(
                    [
                        f"`{v}`",
                        *[
                            _fmt(r[k])
                            for k in (
                                "mse",
                                "mae",
                                "r2",
                                "pearson_r",
                                f"auc_{thr_tag(-1)}",
                                f"auc_{thr_tag(-2.5)}",
                            )
                        ],
                    ]
                )
        out += [
            f"## {syn}All out-of-fold predictions pooled",
            "",
            _table(["variant", "MSE", "MAE", "R²", "Pearson r", "AUC T≤−1", "AUC T≤−2.5"], rows),
            "",
        ]
    if paired is not None and paired.height:
        rows = []
        for r in paired.iter_rows(named=True):
            rows.append(
                [
                    r["comparison"],
                    r["metric"],
                    _fmt(r["mean_a"]),
                    _fmt(r["mean_b"]),
                    _fmt(r["median_diff"]),
                    f"{int(r['wins_a'])}/{int(r['n_folds'])}",
                    _fmt(r["p_value"], 3),
                    _fmt(r["min_p_possible"], 3),
                    r["direction"],
                ]
            )
        out += [
            f"## {syn}Paired comparisons across folds (Wilcoxon signed-rank, two-sided)",
            "",
            "Same folds, same metadata statistics, same seeds for both arms; `a` is the first named arm. "
            "`wins a` = folds where a is better; `direction` = sign of the median paired difference (it can "
            "disagree with the means when one fold dominates). With K folds the smallest reachable p is "
            "2/2^K (0.0625 at K = 5): "
            "a 5-fold comparison cannot reach p < 0.05 however consistent it is. Reported as it fell.",
            "",
            _table(
                ["a vs b", "metric", "mean a", "mean b", "median(a−b)", "wins a", "p", "min p", "direction"],
                rows,
            ),
            "",
        ]
    out += list(extra_sections)
    if epi:
        out += epi_markdown(epi, syn, primary, reference)
    if final:
        out += [
            "## Final model",
            "",
            f"`final.pt` ({final.get('variant')}) trained on all {final.get('n_train')} images for "
            f"{final.get('epochs')} epochs (median best epoch over the CV folds), no held-out data: "
            "its quality is "
            "the cross-validated estimate above. Checkpoint format: `xbmd_batch.checkpoint`; export with "
            "`python -m export`.",
            "",
        ]
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    out += ["## Files", "", *[f"- `{f}`" for f in files], ""]
    path.write_text("\n".join(out))
    return path


def _ci(t: Sequence[float], digits: int = 3) -> str:
    """'point [lo, hi]'."""
    pt, lo, hi = t
    return f"{_fmt(float(pt), digits)} [{_fmt(float(lo), digits)}, {_fmt(float(hi), digits)}]"


def epi_markdown(epi: dict[str, Any], syn: str, primary: str, reference: str) -> list[str]:
    """The sections a reviewing epidemiologist needs (train.analysis.run_analysis), as markdown lines."""
    n_boot = epi.get("n_boot")
    out = [
        f"## {syn}Calibration, out of fold (`{primary}`)",
        "",
        "Each fold model is recalibrated inside the network (`calibrated = intercept + slope × raw`, "
        "fitted on its inner-validation split, intercept only below 100 subjects; "
        "see `xbmd_batch.calibration`). "
        "Calibration-in-the-large (CITL) = mean DXA − mean estimate; slope = OLS slope of DXA on estimate "
        "(1 = right spread, > 1 = estimates regressed to the mean).",
        "",
    ]
    rows = []
    for key, lab in (
        ("calibration_before", "raw (before recalibration)"),
        ("calibration_after", "recalibrated"),
    ):
        c = epi.get(key)
        if c:
            rows.append([lab, _fmt(c["citl"]), _fmt(c["cal_slope"], 3), _fmt(c["cal_intercept"])])
    out += [_table(["estimate", "CITL (g/cm²)", "slope", "intercept"], rows), ""]
    dec = epi.get("deciles")
    if dec is not None and dec.height:
        out += [
            "By decile of the recalibrated estimate (`calibration.png`):",
            "",
            _table(
                ["decile", "n", "mean estimate", "mean DXA"],
                [
                    [str(r["bin"]), str(r["n"]), _fmt(r["mean_pred"]), _fmt(r["mean_true"])]
                    for r in dec.iter_rows(named=True)
                ],
            ),
            "",
        ]
    out += [
        f"## {syn}Bland–Altman with proportional bias",
        "",
        "Difference = estimate − DXA against their mean (`bland_altman.png`); the regression of difference "
        "on mean shows proportional bias (negative slope = high BMD under-, low BMD over-estimated).",
        "",
    ]
    rows = []
    for key, lab in (("bland_altman_raw", "raw"), ("bland_altman", "recalibrated")):
        b = epi.get(key)
        if b:
            rows.append(
                [
                    lab,
                    _fmt(b["bias"]),
                    f"{_fmt(b['loa_low'])} / {_fmt(b['loa_high'])}",
                    _fmt(b["ba_slope"], 3),
                    _fmt(b["ba_slope_p"], 3),
                ]
            )
    out += [_table(["estimate", "bias", "95 % limits", "slope diff~mean", "p (slope)"], rows), ""]
    h = epi["headline"]
    reg = h["regression"]
    out += [
        f"## {syn}Pooled out-of-fold metrics with 95 % CIs",
        "",
        f"One row per subject ({epi['n_subjects']}), subject-level percentile bootstrap ({n_boot} draws).",
        "",
        _table(["MSE", "MAE", "R²"], [[_ci(reg["mse"], 4), _ci(reg["mae"], 4), _ci(reg["r2"])]]),
        "",
        f"Screening (`{reference}`). *Operating point*: a cut-off on the estimated BMD chosen for "
        f"sensitivity ≥ {epi['target_sensitivity']:.2f} on the other folds' out-of-fold estimates and "
        "applied to each fold (never chosen on the fold it is applied to). *WHO cut-off*: the estimate's "
        "T-score against the WHO threshold, for contrast. PPV/NPV at this cohort's prevalence.",
        "",
    ]
    rows = []
    for t in ("T-1", "T-2.5"):
        if t not in h:
            continue
        d = h[t]
        for rule, key in (("operating point", "operating_point"), ("WHO cut-off", "who_cutoff")):
            m = d[key]
            rows.append(
                [
                    f"{t.replace('T', 'T ≤ ')} (BMD ≤ {d['threshold_bmd']:.3f}, {d['n_pos']} pos.)",
                    rule,
                    _ci(m["auc"]),
                    _ci(m["sensitivity"]),
                    _ci(m["specificity"]),
                    _ci(m["ppv"]),
                    _ci(m["npv"]),
                ]
            )
    out += [_table(["threshold", "rule", "AUC", "sensitivity", "specificity", "PPV", "NPV"], rows), ""]
    cuts = {t: h[t]["cutoffs"] for t in ("T-1", "T-2.5") if t in h}
    out += [
        "Cut-offs per fold (g/cm²): "
        + "; ".join(f"{t}: " + ", ".join(_fmt(float(c), 3) for c in cs) for t, cs in cuts.items()),
        "",
    ]
    vs = epi.get("vs_baselines") or {}
    if vs:
        out += [
            f"## {syn}Network vs reference predictors (paired, same folds, same subjects)",
            "",
            f"Difference `{primary}` − reference, subject-level paired bootstrap 95 % CI ({n_boot} draws). "
            "R² difference > 0 / MSE difference < 0: the network is better.",
            "",
            _table(
                ["reference", "R² of reference", "ΔR² [95 % CI]", "ΔMSE [95 % CI]"],
                [
                    [f"`{k}`", _fmt(v["r2_baseline"], 3), _ci(v["r2"]), _ci(v["mse"], 4)]
                    for k, v in vs.items()
                ],
            ),
            "",
        ]
    sg = epi.get("subgroups")
    if sg is not None and sg.height:
        out += [
            f"## {syn}Subgroups",
            "",
            "Within a subgroup R² is lower than pooled when the grouping variable itself explains BMD (sex). "
            "CI: subject-level bootstrap.",
            "",
            _table(
                ["group", "level", "n", "R² [95 % CI]", "MAE", "bias"],
                [
                    [
                        r["group"],
                        r["level"],
                        str(r["n"]),
                        _ci((r["r2"], r["r2_lo"], r["r2_hi"])),
                        _fmt(r["mae"]),
                        _fmt(r["bias"]),
                    ]
                    for r in sg.iter_rows(named=True)
                ],
            ),
            "",
        ]
    return out
