"""Figures of a training run (matplotlib, Agg backend): the paper's Figures 6 and 7 plus diagnostics.

Each function takes plain tables (polars) and a path, writes one PNG, and returns the path. `tag` is appended
to every title ("synthetic cohort" for generated data) so no figure can be mistaken for a clinical result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from xbmd_batch.clinical import SCREEN_THRESHOLDS, WHO_CLASSES, get_reference, who_class


def _plt():  # noqa: ANN202 - matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _title(text: str, tag: str) -> str:
    return f"{text} ({tag})" if tag else text


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def scatter_by_fold(oof: pl.DataFrame, path: Path, tag: str = "", label: str = "") -> Path:
    """True vs estimated BMD, one panel per fold, identity line (the paper's Figure 7)."""
    plt = _plt()
    folds = sorted(oof["fold"].unique().to_list())
    ncol = min(5, len(folds))
    nrow = math.ceil(len(folds) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 3.0 * nrow), squeeze=False)
    lo = float(min(oof["y_true"].min(), oof["y_pred"].min())) - 0.02
    hi = float(max(oof["y_true"].max(), oof["y_pred"].max())) + 0.02
    for ax in axes.flat[len(folds) :]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, folds, strict=False):
        d = oof.filter(pl.col("fold") == k)
        y, p = d["y_true"].to_numpy(), d["y_pred"].to_numpy()
        ss = float(np.sum((y - y.mean()) ** 2))
        r2 = 1.0 - float(np.sum((y - p) ** 2)) / ss if ss > 0 else float("nan")
        ax.scatter(y, p, s=10, alpha=0.7)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_title(f"fold {k}: R² = {r2:.2f}, n = {len(y)}", fontsize=9)
        ax.set_xlabel("DXA BMD (g/cm²)", fontsize=8)
        ax.set_ylabel("estimated BMD (g/cm²)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(_title(f"True vs estimated femoral-neck BMD per fold {label}".rstrip(), tag), fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def scatter_pooled(oof: pl.DataFrame, path: Path, tag: str = "", label: str = "") -> Path:
    """All out-of-fold predictions in one panel, coloured by fold, with the identity line (for the README)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    y, p = oof["y_true"].to_numpy(), oof["y_pred"].to_numpy()
    lo, hi = float(min(y.min(), p.min())) - 0.02, float(max(y.max(), p.max())) + 0.02
    folds = oof["fold"].to_numpy()
    for k in np.unique(folds):
        m = folds == k
        ax.scatter(y[m], p[m], s=12, alpha=0.75, color=f"C{int(k) % 10}", label=f"fold {k}")
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
    ss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - p) ** 2)) / ss if ss > 0 else float("nan")
    mae = float(np.mean(np.abs(y - p)))
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("DXA BMD (g/cm²)")
    ax.set_ylabel("estimated BMD (g/cm²)")
    ax.legend(loc="upper left", fontsize=7, title=f"R² = {r2:.2f}, MAE = {mae:.3f}", title_fontsize=8)
    ax.set_title(_title(f"Out-of-fold predictions {label}".rstrip(), tag), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def loss_comparison(metrics: pl.DataFrame, losses: Sequence[str], path: Path, tag: str = "") -> Path:
    """Per-fold MSE / MAE / R² for each training loss, same folds (the paper's Figure 6)."""
    plt = _plt()
    keys = [("mse", "MSE (g²/cm⁴)"), ("mae", "MAE (g/cm²)"), ("r2", "R²")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, lab) in zip(axes, keys, strict=True):
        for loss in losses:
            d = metrics.filter((pl.col("fusion") == "xattn") & (pl.col("loss") == loss)).sort("fold")
            if d.height:
                ax.plot(d["fold"].to_numpy(), d[key].to_numpy(), marker="o", label=loss)
        ax.set_xlabel("fold")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    axes[0].legend(title="loss (XAttn)", fontsize=8)
    fig.suptitle(_title("Loss functions compared on the same folds", tag))
    fig.tight_layout()
    return _save(fig, path)


def fusion_comparison(metrics: pl.DataFrame, loss: str, path: Path, tag: str = "") -> Path:
    """Paired per-fold metric of XAttn vs concat (one line per fold joins the pair)."""
    plt = _plt()
    keys = [("mse", "MSE"), ("mae", "MAE (g/cm²)"), ("r2", "R²")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    a = metrics.filter((pl.col("fusion") == "xattn") & (pl.col("loss") == loss)).sort("fold")
    b = metrics.filter((pl.col("fusion") == "concat") & (pl.col("loss") == loss)).sort("fold")
    for ax, (key, lab) in zip(axes, keys, strict=True):
        for va, vb in zip(b[key].to_list(), a[key].to_list(), strict=False):
            ax.plot([0, 1], [va, vb], color="0.6", lw=1)
        ax.scatter(np.zeros(b.height), b[key].to_numpy(), label="concat", zorder=3)
        ax.scatter(np.ones(a.height), a[key].to_numpy(), label="XAttn", zorder=3)
        ax.set_xticks([0, 1], ["concat", "XAttn"])
        ax.set_xlim(-0.4, 1.4)
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    fig.suptitle(_title(f"XAttn vs concatenation, per fold (loss {loss})", tag))
    fig.tight_layout()
    return _save(fig, path)


def roc_curves(
    oof: pl.DataFrame,
    reference: str,
    path: Path,
    tag: str = "",
    thresholds: Sequence[float] = SCREEN_THRESHOLDS,
) -> Path:
    """ROC per T threshold: one pooled out-of-fold curve per variant, thin per-fold lines for the first."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    ref = get_reference(reference)
    fig, axes = plt.subplots(1, len(thresholds), figsize=(4.6 * len(thresholds), 4.4), squeeze=False)
    variants = oof["variant"].unique(maintain_order=True).to_list()
    for ax, t in zip(axes.flat, thresholds, strict=True):
        for vi, v in enumerate(variants):
            d = oof.filter(pl.col("variant") == v)
            pos = ref.t_score(d["y_true"].to_numpy()) <= t + 1e-9
            if pos.all() or not pos.any():
                continue
            if vi == 0:
                for k in d["fold"].unique().sort().to_list():
                    dk = d.filter(pl.col("fold") == k)
                    pk = ref.t_score(dk["y_true"].to_numpy()) <= t + 1e-9
                    if pk.any() and not pk.all():
                        fpr, tpr, _ = roc_curve(pk, -dk["y_pred"].to_numpy())
                        ax.plot(fpr, tpr, color="C0", alpha=0.2, lw=0.8)
            score = -d["y_pred"].to_numpy()
            fpr, tpr, _ = roc_curve(pos, score)
            auc = roc_auc_score(pos, score)
            ax.plot(fpr, tpr, color=f"C{vi}", lw=2, label=f"{v} pooled AUC {auc:.2f} ({pos.sum()} pos)")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set_xlabel("1 − specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"T ≤ {t:g} ({reference}: BMD ≤ {ref.bmd_at(t):.3f})", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(_title("Screening ROC, score = −estimated BMD", tag))
    fig.tight_layout()
    return _save(fig, path)


def field_attention(
    oof: pl.DataFrame, field_names: Sequence[str], reference: str, path: Path, tag: str = "", label: str = ""
) -> Path:
    """Mean image->field attention per metadata field, overall and by WHO class of the DXA label."""
    plt = _plt()
    cols = [f"attn_{f}" for f in field_names]
    att = oof.select(cols).to_numpy()
    groups = who_class(get_reference(reference).t_score(oof["y_true"].to_numpy()))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(field_names))
    axes[0].bar(x, att.mean(0), yerr=att.std(0), capsize=2, color="C0")
    axes[0].axhline(1.0 / len(field_names), color="k", ls=":", lw=1, label="uniform 1/F")
    axes[0].set_title("mean attention per field (± SD over subjects)", fontsize=9)
    axes[0].legend(fontsize=8)
    w = 0.8 / len(WHO_CLASSES)
    for gi, g in enumerate(WHO_CLASSES):
        m = groups == g
        if m.any():
            axes[1].bar(x + (gi - 1) * w, att[m].mean(0), width=w, label=f"{g} (n={int(m.sum())})")
    axes[1].set_title(f"by WHO class of the DXA label ({reference})", fontsize=9)
    axes[1].set_ylim(0, 1.35 * float(att.mean(0).max()))
    axes[1].legend(fontsize=8, ncol=3, loc="upper center")
    for ax in axes:
        ax.set_xticks(x, field_names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("attention weight")
    fig.suptitle(_title(f"Field-level metadata attention {label}".rstrip(), tag))
    fig.tight_layout()
    return _save(fig, path)


def training_curves(history: pl.DataFrame, path: Path, tag: str = "", label: str = "") -> Path:
    """Train / inner-validation loss and validation MAE per epoch, one line per fold."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, k in enumerate(sorted(history["fold"].unique().to_list())):
        d = history.filter(pl.col("fold") == k).sort("epoch")
        ep = d["epoch"].to_numpy() + 1
        name = "final" if k < 0 else f"fold {k}"
        axes[0].plot(ep, d["train_loss"].to_numpy(), color=f"C{i % 10}", ls="-", label=f"{name} train")
        if d["val_loss"].is_not_nan().any():
            axes[0].plot(ep, d["val_loss"].to_numpy(), color=f"C{i % 10}", ls="--", label=f"{name} val")
            axes[1].plot(ep, d["val_mae"].to_numpy(), color=f"C{i % 10}", label=name)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("inner-validation MAE (g/cm²)")
    axes[1].legend(fontsize=6)
    fig.suptitle(_title(f"Training curves {label}".rstrip(), tag))
    fig.tight_layout()
    return _save(fig, path)


def calibration_plot(
    deciles: pl.DataFrame, raw_deciles: pl.DataFrame | None, path: Path, tag: str = ""
) -> Path:
    """Mean DXA BMD vs mean estimate per decile of the estimate, calibrated (and raw), identity line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    vals = [deciles["mean_pred"], deciles["mean_true"]]
    if raw_deciles is not None and raw_deciles.height:
        ax.plot(
            raw_deciles["mean_pred"],
            raw_deciles["mean_true"],
            "s--",
            color="0.6",
            label="before recalibration",
        )
        vals += [raw_deciles["mean_pred"], raw_deciles["mean_true"]]
    ax.plot(deciles["mean_pred"], deciles["mean_true"], "o-", label="recalibrated (as exported)")
    lo = float(min(v.min() for v in vals)) - 0.02
    hi = float(max(v.max() for v in vals)) + 0.02
    ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="identity")
    ax.set_xlabel("mean estimated BMD per decile (g/cm²)")
    ax.set_ylabel("mean DXA BMD (g/cm²)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(_title("Calibration by decile, out of fold", tag), fontsize=10)
    return _save(fig, path)


def bland_altman_plot(y: np.ndarray, p: np.ndarray, ba: dict[str, float], path: Path, tag: str = "") -> Path:
    """Difference (estimate − DXA) vs mean, bias and limits, and the regression of difference on mean."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    m, d = (p + y) / 2, p - y
    ax.scatter(m, d, s=8, alpha=0.6)
    for v, style, lab in (
        (ba["bias"], "-", f"bias {ba['bias']:+.3f}"),
        (ba["loa_low"], "--", f"95 % limits {ba['loa_low']:+.3f} / {ba['loa_high']:+.3f}"),
        (ba["loa_high"], "--", None),
    ):
        ax.axhline(v, color="k", ls=style, lw=1, label=lab)
    if math.isfinite(ba.get("ba_slope", float("nan"))):
        xs = np.linspace(float(m.min()), float(m.max()), 2)
        ax.plot(
            xs,
            ba["ba_intercept"] + ba["ba_slope"] * xs,
            "r-",
            lw=1.2,
            label=f"difference ~ mean: slope {ba['ba_slope']:+.2f} (p = {ba['ba_slope_p']:.2g})",
        )
    ax.set_xlabel("mean of estimate and DXA (g/cm²)")
    ax.set_ylabel("estimate − DXA (g/cm²)")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(_title("Bland–Altman, out of fold", tag), fontsize=10)
    return _save(fig, path)
