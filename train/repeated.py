"""Repeated cross-validation for ``--compare fusion`` (issue 10): XAttn vs concat, a test that can answer.

Design: R repeats of K-fold CV (repeat r uses fold seed ``seed + r``), and in every fold S training seeds per
arm. Within a (repeat, fold, seed) both arms get the same folds, the same inner-validation split, the same
metadata statistics and the same initial seed, and each is recalibrated on that inner-validation split.

Analysis (``train.analysis``):
- per (repeat, fold) the arms' test MSE and R², averaged over the S seeds, give J = R x K paired
  differences; the Nadeau-Bengio corrected resampled t-test on them (n_test / n_train from the fold sizes)
  gives p and a CI;
- per subject, each arm's estimates averaged over repeats and seeds give one paired bootstrap of the pooled R²
  and MSE difference (subjects resampled).
The primary metric is MSE (pre-specified); R² is reported alongside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

ARMS: tuple[str, ...] = ("xattn", "concat")


def repeated_fusion_cv(
    *,
    cohort: Any,
    builder: Any,
    rows: np.ndarray,
    hp: Any,
    device: Any,
    loss_name: str,
    reference: str,
    repeats: int,
    seeds: int,
    base_seed: int,
    model_config_for: Callable[..., Any],
    log: Callable[[str], None] = lambda _m: None,
    pretrained: str | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Run every fit; returns (per-subject out-of-fold rows, per-split metric rows)."""
    import torch
    from sklearn.metrics import mean_squared_error, r2_score

    from train.engine import evaluate, fit
    from train.folds import make_folds, split_inside
    from xbmd_batch.calibration import fit_calibration
    from xbmd_batch.loss import make_loss
    from xbmd_batch.model import build_model, load_pretrained_resnet34, set_calibration

    y_all, groups = cohort.y, cohort.subject_ids
    oof_parts: list[pl.DataFrame] = []
    split_rows: list[dict[str, Any]] = []
    for r in range(repeats):
        splits = make_folds(y_all[rows], groups[rows], hp.folds, base_seed + r, hp.n_bins)
        for k, (tr_pos, te_pos) in enumerate(splits):
            tr, te = rows[tr_pos], rows[te_pos]
            inner_tr, inner_val = split_inside(tr, y_all, groups, hp.val_frac, base_seed + 100 * r + k)
            enc = builder.encode(tr)
            data = builder.arrays(enc)
            for s in range(seeds):
                seed = base_seed * 1000 + 100 * r + 10 * k + s
                for arm in ARMS:
                    mcfg = model_config_for(enc.schema, arm, hp, y_all[tr])
                    torch.manual_seed(seed)
                    model = build_model(mcfg)
                    if pretrained:
                        load_pretrained_resnet34(model, pretrained)
                    loss_fn = make_loss(loss_name, reference=reference)
                    res = fit(model, loss_fn, data, inner_tr, inner_val, hp, device, seed=seed)
                    val = evaluate(model, loss_fn, data, inner_val, hp.batch_size, device, res.wide_oof)
                    cal = fit_calibration(val.pred, y_all[inner_val])
                    set_calibration(model, cal["intercept"], cal["slope"])
                    ev = evaluate(model, loss_fn, data, te, hp.batch_size, device)
                    split_rows.append(
                        {
                            "repeat": r,
                            "fold": k,
                            "seed": s,
                            "arm": arm,
                            "n_train": len(tr),
                            "n_test": len(te),
                            "mse": float(mean_squared_error(ev.y, ev.pred)),
                            "r2": float(r2_score(ev.y, ev.pred)) if len(ev.y) > 1 else float("nan"),
                            "best_epoch": res.best_epoch + 1,
                            "train_seconds": res.seconds,
                        }
                    )
                    oof_parts.append(
                        pl.DataFrame(
                            {
                                "repeat": np.full(len(ev.idx), r, dtype=np.int32),
                                "fold": np.full(len(ev.idx), k, dtype=np.int32),
                                "seed": np.full(len(ev.idx), s, dtype=np.int32),
                                "arm": [arm] * len(ev.idx),
                                "subject_id": groups[ev.idx].tolist(),
                                "y_true": ev.y,
                                "y_pred": ev.pred,
                            }
                        )
                    )
                    log(
                        f"repeat {r + 1}/{repeats} fold {k + 1}/{len(splits)} seed {s + 1}/{seeds} {arm}: "
                        f"MSE {split_rows[-1]['mse']:.5f} R² {split_rows[-1]['r2']:.3f} ({res.seconds:.0f} s)"
                    )
    return pl.concat(oof_parts), pl.DataFrame(split_rows)


def analyse(oof: pl.DataFrame, splits: pl.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Corrected t-test over (repeat, fold) differences, subject-level paired bootstrap (xattn - concat)."""
    from train.analysis import nadeau_bengio, paired_bootstrap_diff, regression_stats

    per = splits.group_by(["repeat", "fold", "arm"]).agg(
        pl.col("mse").mean(), pl.col("r2").mean(), pl.col("n_train").first(), pl.col("n_test").first()
    )
    wide = per.pivot(on="arm", index=["repeat", "fold", "n_train", "n_test"], values=["mse", "r2"]).sort(
        ["repeat", "fold"]
    )
    n_train = float(wide["n_train"].mean())
    n_test = float(wide["n_test"].mean())
    out: dict[str, Any] = {
        "n_repeats": int(splits["repeat"].n_unique()),
        "n_folds": int(splits["fold"].n_unique()),
        "n_seeds": int(splits["seed"].n_unique()),
        "n_fits": int(splits.height),
    }
    for m in ("mse", "r2"):
        a, b = wide[f"{m}_xattn"].to_numpy(), wide[f"{m}_concat"].to_numpy()
        out[m] = {
            "mean_xattn": float(a.mean()),
            "mean_concat": float(b.mean()),
            "wins_xattn": int(np.sum(a < b) if m == "mse" else np.sum(a > b)),
            "n_splits": int(len(a)),
            **nadeau_bengio(a - b, int(n_train), int(n_test)),
        }
    subj = oof.group_by(["subject_id", "arm"]).agg(pl.col("y_pred").mean(), pl.col("y_true").first())
    w = subj.pivot(on="arm", index=["subject_id", "y_true"], values="y_pred").sort("subject_id")
    y, pa, pb = w["y_true"].to_numpy(), w["xattn"].to_numpy(), w["concat"].to_numpy()
    out["bootstrap"] = paired_bootstrap_diff(y, pa, pb, n_boot, seed)
    out["pooled"] = {"xattn": regression_stats(y, pa), "concat": regression_stats(y, pb)}
    out["n_subjects"] = int(len(y))
    return out


def markdown(res: dict[str, Any], syn: str = "") -> list[str]:
    """The comparison table for report.md (and, copied by hand, docs/training.md / README)."""

    def f(x: float, d: int = 4) -> str:
        return "n/a" if not np.isfinite(x) else f"{x:.{d}f}"

    rows = []
    bs = res["bootstrap"]
    for m, lab in (("mse", "MSE (primary)"), ("r2", "R²")):
        r = res[m]
        rows.append(
            f"| {lab} | {f(r['mean_xattn'])} | {f(r['mean_concat'])} | {f(r['mean_diff'], 5)} "
            f"[{f(r.get('ci_low', float('nan')), 5)}, {f(r.get('ci_high', float('nan')), 5)}] | "
            f"{f(r['t'], 2)} | {f(r['p_value'], 3)} | {r['wins_xattn']}/{int(r['n_splits'])} | "
            f"{f(bs[m][0], 5)} [{f(bs[m][1], 5)}, {f(bs[m][2], 5)}] |"
        )
    return [
        f"## {syn}Fusion comparison: repeated CV ({res['n_repeats']} repeats × {res['n_folds']} folds × "
        f"{res['n_seeds']} seeds, {res['n_fits']} fits)",
        "",
        "Mean of per-split metrics (seeds averaged within a split); difference = XAttn − concat; "
        "Nadeau–Bengio corrected resampled t-test over the repeat × fold splits (95 % CI from the same "
        "corrected SE); subject-level paired bootstrap of the pooled difference (each arm's estimates "
        f"averaged over repeats and seeds, {res['n_subjects']} subjects).",
        "",
        "| metric | XAttn | concat | mean diff [corrected 95 % CI] | t | p (corrected) | XAttn better | "
        "bootstrap pooled diff [95 % CI] |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
