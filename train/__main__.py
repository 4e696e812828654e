"""`python -m train`: cross-validated training of XAttn-BMD / the concat baseline, with report and plots.

Examples (from the repo root):

    # README demo: quick preset, one 90/10 split, plus a final model ready for `python -m export`
    python -m train --cohort demo_out/cohort --preset quick --single-split --final --out runs/demo

    # the paper's comparison (XAttn vs concat, four losses) on the same folds, paired Wilcoxon tests
    python -m train --cohort data/cohort --preset quick --compare --out runs/compare

    # the paper's protocol (10-fold, 224^2), on a GPU
    python -m train --cohort data/cohort --preset paper --final --out runs/paper

torchvision-references style: `get_args_parser()` + `main(args)`, so tests call `main` directly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

# the command line (train/args.py), the model a preset builds (train/presets.py) and the output stage
# (train/outputs.py) live in their own modules; re-exported here for the code that imports them from here
# (tests/test_train_e2e.py: get_args_parser, main; benchmarks/ensemble_cost.py: model_config_for)
from train.args import command_line, get_args_parser, variants, vname
from train.outputs import write_outputs
from train.presets import model_config_for


def _nan_to_none(d: dict[str, Any]) -> dict[str, Any]:
    """Strict-JSON friendly copy (the checkpoint summary ends up in the ONNX model card)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def oof_residuals(oof: pl.DataFrame, reference: str) -> dict[str, Any]:
    """Issue 15's contract: one (calibrated out-of-fold estimate, label) pair per subject, plain floats.

    ``oof`` is one variant's out-of-fold rows; a subject with several images gets the mean of its estimates.
    """
    per = (
        oof.group_by("subject_id", maintain_order=True)
        .agg(pl.col("y_pred").mean(), pl.col("y_true").first())
        .sort("subject_id")
    )
    return {
        "prediction": [float(x) for x in per["y_pred"].to_list()],
        "target": [float(x) for x in per["y_true"].to_list()],
        "calibrated": True,
        "reference": reference,
        "n": int(per.height),
    }


@dataclass
class Data:
    """The data stage's result: the cohort, its image cache, the rows that take part and their splits."""

    cohort: Any  # train.data.Cohort
    builder: Any  # train.data.ArrayDataBuilder (cohort + image cache -> per-fold arrays)
    pp: Any  # PreprocessConfig
    rows: np.ndarray  # cohort rows whose image decoded
    splits: list[tuple[np.ndarray, np.ndarray]]  # (train rows, test rows) per fold, cohort row numbers
    protocol: str
    notes: list[str]


@dataclass
class Run:
    """What every stage shares: the run folder, hyper-parameters, device, console/progress and the logs."""

    args: argparse.Namespace
    out: Path
    hp: Any  # train.presets.Preset with the command-line overrides
    device: Any  # torch.device
    console: Any  # rich Console
    variants: list[tuple[str, str]]
    hist_rows: list[dict[str, Any]] = field(default_factory=list)
    log_f: Any = None  # log.jsonl, one line per epoch
    prog: Any = None  # rich Progress spanning CV and the final model

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.hist_rows.append(row)
        self.log_f.write(json.dumps(_nan_to_none(row)) + "\n")
        self.log_f.flush()

    @property
    def primary(self) -> str:
        return vname(*self.variants[0])


@dataclass
class FoldResult:
    metric_row: dict[str, Any]
    oof: pl.DataFrame  # out-of-fold predictions (and field attention) of the fold's test rows
    best_epoch: int  # 1-based


@dataclass
class CV:
    """Cross-validation results: out-of-fold predictions, metric rows, best epochs, per-fold encodings."""

    oof: pl.DataFrame
    metrics: pl.DataFrame
    best_epochs: dict[str, list[int]]
    enc_cache: dict[int, Any]
    base_oof: pl.DataFrame  # the reference predictors' out-of-fold rows (train.baselines)


def _summary(
    run: Run,
    data: Data,
    v: str,
    loss_name: str,
    fold: int | str,
    head: dict[str, Any],
    body: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The training summary a checkpoint carries (fold and final models alike; it reaches the model card)."""
    args = run.args
    return {
        "run": run.out.name,
        "variant": v,
        "fold": fold,
        **head,
        "protocol": data.protocol,
        "preset": run.hp.to_dict(),
        "loss": loss_name,
        "label_col": args.label_col,
        "synthetic_cohort": data.cohort.is_synthetic,
        **body,
        "reference": args.reference,
        **extra,
        "seed": args.seed,
    }


def setup_run(args: argparse.Namespace) -> Run:
    """Preset + overrides, device and threads, the run folder with run.json and log.jsonl."""
    import torch
    from rich.console import Console

    from train.engine import pick_device
    from train.presets import get_preset
    from xbmd_batch.clinical import get_reference
    from xbmd_batch.errors import InputError

    console = Console(stderr=True, quiet=False)
    get_reference(args.reference)  # validate early
    if args.pretrained and not Path(args.pretrained).is_file():
        raise InputError(f"{args.pretrained}: --pretrained weights file not found")
    hp = get_preset(args.preset).replace(
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult,
        d_model=args.d_model,
        patience=args.patience,
        folds=args.folds,
        wide_gain=None if args.wide_gain is None else args.wide_gain == "on",
        wide_fit=args.wide_fit,
        n_members=args.members,
    )
    if args.loss is None:
        args.loss = hp.loss
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(
        json.dumps(
            {"command": command_line(args), "args": vars(args), "preset": hp.to_dict()}, indent=2, default=str
        )
    )
    return Run(args, out, hp, device, console, variants(args))


def prepare_data(run: Run) -> Data:
    """Cohort (score's ingest path), image cache, the rows that decoded, and the CV splits."""
    from train.analysis import split_by_column
    from train.data import ArrayDataBuilder, build_image_cache, default_cache_dir, load_cohort
    from train.folds import holdout_split, make_folds
    from xbmd_batch.config import DEFAULT_SCHEMA, PreprocessConfig
    from xbmd_batch.errors import InputError
    from xbmd_batch.score.join import KeySpec

    args, hp = run.args, run.hp
    key_spec = KeySpec(args.key_column, args.path_column)
    cohort = load_cohort(args.cohort, args.meta, args.labels, args.label_col, DEFAULT_SCHEMA, key_spec)
    pp = PreprocessConfig(image_size=hp.image_size)
    cache_dir = default_cache_dir(Path(args.out), args.cache_dir)
    run.console.log(
        f"cohort: {cohort.n} images, {cohort.n_subjects} subjects ({cohort.mapping}); cache {cache_dir}"
    )
    cache = build_image_cache(
        cohort.paths, pp, cache_dir, workers=args.workers, progress=not args.no_progress
    )
    run.console.log(f"image cache {'reused' if cache.reused else 'built'}: {cache.path.name}")
    notes = list(cohort.notes)
    if not cache.ok.all():
        notes.append(f"{int((~cache.ok).sum())} image(s) failed to decode and were excluded")
    rows = np.flatnonzero(cache.ok)  # rows of the cohort that take part
    y, groups = cohort.y[rows], cohort.subject_ids[rows]
    if len(np.unique(groups)) < 4:
        raise InputError(f"{cohort.root}: only {len(np.unique(groups))} usable subjects; need at least 4")

    if args.split_by:
        splits, levels = split_by_column(
            groups, args.labels or Path(args.cohort) / "truth.csv", args.split_by
        )
        protocol = (
            f"leave-one-{args.split_by}-out: {len(levels)} folds, each holding out all subjects of one level "
            f"({', '.join(levels)})"
        )
    elif args.single_split:
        splits = [holdout_split(y, groups, 0.1, args.seed, hp.n_bins)]
        protocol = f"single stratified, subject-grouped 90/10 split (seed {args.seed})"
    else:
        splits = make_folds(y, groups, hp.folds, args.seed, hp.n_bins)
        protocol = (
            f"{hp.folds}-fold CV stratified by {hp.n_bins} BMD quantile bins, grouped by subject "
            f"(seed {args.seed})"
        )
    protocol += (
        f"; inner validation {hp.val_frac:.0%} of each training part for early stopping; device {run.device}"
    )
    # map positions within `rows` back to cohort rows
    splits = [(rows[tr], rows[te]) for tr, te in splits]
    return Data(cohort, ArrayDataBuilder(cohort, cache, pp), pp, rows, splits, protocol, notes)


def train_fold(run: Run, data: Data, fusion: str, loss_name: str, k: int, enc: Any) -> FoldResult:
    """Train one variant on fold k, save fold_k.pt; returns its metric row and out-of-fold predictions."""
    import torch

    from train.engine import evaluate, fit
    from train.folds import split_inside
    from train.metrics import all_metrics
    from xbmd_batch.calibration import fit_calibration
    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.loss import make_loss, weight_params_for
    from xbmd_batch.model import build_model, load_pretrained_resnet34, set_calibration

    args, hp, prog, cohort = run.args, run.hp, run.prog, data.cohort
    v = vname(fusion, loss_name)
    vdir = run.out if (fusion, loss_name) == run.variants[0] else run.out / v
    tr, te = data.splits[k]
    k_total = len(data.splits)
    inner_tr, inner_val = split_inside(tr, cohort.y, cohort.subject_ids, hp.val_frac, args.seed + k)
    arrays = data.builder.arrays(enc)
    mcfg = model_config_for(enc.schema, fusion, hp, cohort.y[tr])
    torch.manual_seed(args.seed * 1000 + k)
    model = build_model(mcfg)
    if args.pretrained:
        load_pretrained_resnet34(model, args.pretrained)
    loss_fn = make_loss(loss_name, reference=args.reference)
    steps = prog.add_task(f"{v} fold {k + 1}/{k_total}", total=None)

    def on_epoch(rec: dict[str, float]) -> None:
        run.log_epoch({"variant": v, "fold": k, **rec})
        prog.console.log(
            f"{v} fold {k} ep {int(rec['epoch']) + 1}: train {rec['train_loss']:.4g} "
            f"val {rec['val_loss']:.4g} val MAE {rec['val_mae']:.4f} lr {rec['lr']:.2e} "
            f"({rec['seconds']:.1f}s)"
        )

    res = fit(
        model,
        loss_fn,
        arrays,
        inner_tr,
        inner_val,
        hp,
        run.device,
        seed=args.seed * 1000 + k,
        on_epoch=on_epoch,
        on_step=lambda: prog.advance(steps),
    )
    prog.remove_task(steps)
    # recalibrate on the inner-validation split (not trained on), inside the model itself
    ev_raw = evaluate(model, loss_fn, arrays, te, hp.batch_size, run.device)
    # (with wide_fit "crossfit" the inner-validation rows get the wide path's cross-fitted offsets: the
    # calibration then sees predictions no part of the model was fitted on)
    cal = fit_calibration(
        evaluate(model, loss_fn, arrays, inner_val, hp.batch_size, run.device, res.wide_oof).pred,
        cohort.y[inner_val],
    )
    mcfg = set_calibration(model, cal["intercept"], cal["slope"])
    ev = evaluate(model, loss_fn, arrays, te, hp.batch_size, run.device)
    m = all_metrics(ev.y, ev.pred, args.reference)
    field_cols = [f"attn_{f}" for f in enc.schema.names]
    oof = pl.DataFrame(
        {
            "variant": [v] * len(ev.idx),
            "fusion": [fusion] * len(ev.idx),
            "loss": [loss_name] * len(ev.idx),
            "subject_id": cohort.subject_ids[ev.idx].tolist(),
            "fold": np.full(len(ev.idx), k, dtype=np.int32),
            "y_true": ev.y,
            "y_pred": ev.pred,
            "y_pred_raw": ev_raw.pred,
            **{c: ev.attention[:, j] for j, c in enumerate(field_cols)},
        }
    )
    summary = _summary(
        run,
        data,
        v,
        loss_name,
        k,
        {"n_folds": k_total},
        {
            "n_train": len(inner_tr),
            "n_val": len(inner_val),
            "n_test": len(te),
            "best_epoch": res.best_epoch + 1,
            "epochs_run": res.epochs_run,
            "train_seconds": round(res.seconds, 1),
        },
        {
            "loss_weighting": weight_params_for(args.reference) if loss_name == "wsmoothl1" else None,
            "calibration": {**cal, "fitted_on": "inner-validation split"},
        },
    )
    summary["test_metrics"] = _nan_to_none(m)
    save_checkpoint(vdir / f"fold_{k}.pt", model, mcfg, enc.schema, data.pp, summary)
    run.console.log(
        f"{v} fold {k}: test MAE {m['mae']:.4f} R² {m['r2']:.3f} (best epoch {res.best_epoch + 1})"
    )
    row = {"variant": v, "fusion": fusion, "loss": loss_name, "fold": k, "scope": "fold", **m}
    return FoldResult(row, oof, res.best_epoch + 1)


def run_cv(run: Run, data: Data, runs_task: Any) -> CV:
    """Every variant on every fold, then pooled out-of-fold metrics and the reference predictors."""
    from train.baselines import pixel_features, reference_predictions
    from train.metrics import all_metrics

    cohort, args = data.cohort, run.args
    oof_parts: list[pl.DataFrame] = []
    metric_rows: list[dict[str, Any]] = []
    best_epochs: dict[str, list[int]] = {}
    enc_cache: dict[int, Any] = {}
    for fusion, loss_name in run.variants:
        for k, (tr, _te) in enumerate(data.splits):
            if k not in enc_cache:
                enc_cache[k] = data.builder.encode(tr)
            fold = train_fold(run, data, fusion, loss_name, k, enc_cache[k])
            best_epochs.setdefault(vname(fusion, loss_name), []).append(fold.best_epoch)
            metric_rows.append(fold.metric_row)
            oof_parts.append(fold.oof)
            run.prog.advance(runs_task)

    oof = pl.concat(oof_parts)
    for fusion, loss_name in run.variants:
        v = vname(fusion, loss_name)
        d = oof.filter(pl.col("variant") == v)
        m = all_metrics(d["y_true"].to_numpy(), d["y_pred"].to_numpy(), args.reference)
        metric_rows.append(
            {"variant": v, "fusion": fusion, "loss": loss_name, "fold": -1, "scope": "pooled", **m}
        )
    # reference rows on the same folds: training mean, ridge on metadata, on pixels, on both
    cache, rows = data.builder.cache, data.rows
    pix_ok = pixel_features(cache.images[cache.row_of[rows]])
    pixels = np.zeros((cohort.n, pix_ok.shape[1]), dtype=np.float32)
    pixels[rows] = pix_ok
    base_parts: list[pl.DataFrame] = []
    for k, (tr, te) in enumerate(data.splits):
        enc = enc_cache[k]
        for bname, pred in reference_predictions(pixels, enc.values, enc.mask, cohort.y, tr, te).items():
            m = all_metrics(cohort.y[te], pred, args.reference)
            metric_rows.append(
                {"variant": bname, "fusion": "none", "loss": "none", "fold": k, "scope": "baseline", **m}
            )
            base_parts.append(
                pl.DataFrame(
                    {
                        "variant": [bname] * len(te),
                        "subject_id": cohort.subject_ids[te].tolist(),
                        "fold": np.full(len(te), k, dtype=np.int32),
                        "y_true": cohort.y[te].astype(np.float64),
                        "y_pred": np.asarray(pred, dtype=np.float64),
                    }
                )
            )
    return CV(oof, pl.DataFrame(metric_rows), best_epochs, enc_cache, pl.concat(base_parts))


def train_final(run: Run, data: Data, cv: CV) -> dict[str, Any]:
    """The primary variant on all rows for the median best epoch of its folds -> final.pt; its summary."""
    import torch

    from train.engine import fit
    from train.metrics import mean_sd
    from xbmd_batch.calibration import fit_calibration
    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.loss import make_loss, weight_params_for
    from xbmd_batch.model import build_model, load_pretrained_resnet34, set_calibration

    args, hp, prog, rows = run.args, run.hp, run.prog, data.rows
    fusion, loss_name = run.variants[0]
    v = vname(fusion, loss_name)
    n_ep = int(max(1, round(float(np.median(cv.best_epochs[v])))))
    enc = data.builder.encode(rows)
    mcfg = model_config_for(enc.schema, fusion, hp, data.cohort.y[rows])
    torch.manual_seed(args.seed * 1000 + 999)
    model = build_model(mcfg)
    if args.pretrained:
        load_pretrained_resnet34(model, args.pretrained)
    steps = prog.add_task(f"{v} final ({n_ep} epochs)", total=None)
    res = fit(
        model,
        make_loss(loss_name, reference=args.reference),
        data.builder.arrays(enc),
        rows,
        None,
        hp,
        run.device,
        seed=args.seed * 1000 + 999,
        epochs=n_ep,
        on_epoch=lambda rec: run.log_epoch({"variant": v, "fold": -1, **rec}),
        on_step=lambda: prog.advance(steps),
    )
    prog.remove_task(steps)
    # calibration of the final model: fitted on the CV fold models' raw out-of-fold estimates (the
    # final model has no held-out data of its own); intercept + slope when >= MIN_N_SLOPE subjects
    prim = cv.oof.filter(pl.col("variant") == v)
    cal = fit_calibration(prim["y_pred_raw"].to_numpy(), prim["y_true"].to_numpy())
    mcfg = set_calibration(model, cal["intercept"], cal["slope"])
    folds = cv.metrics.filter((pl.col("variant") == v) & (pl.col("scope") == "fold"))
    cv_summary = {
        f"cv_{key}_mean_sd": [None if not math.isfinite(x) else x for x in mean_sd(folds[key].to_list())[:2]]
        for key in ("mse", "mae", "r2", "pearson_r")
    }
    body = {"n_train": len(rows), "epochs": n_ep, "train_seconds": round(res.seconds, 1)}
    extra = {
        "loss_weighting": weight_params_for(args.reference) if loss_name == "wsmoothl1" else None,
        "calibration": {**cal, "fitted_on": "raw out-of-fold estimates of the CV fold models"},
        "oof_residuals": oof_residuals(prim, args.reference),
    }
    final_info = {**_summary(run, data, v, loss_name, "all", {}, body, extra), **cv_summary}
    save_checkpoint(run.out / "final.pt", model, mcfg, enc.schema, data.pp, final_info)
    return final_info


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole protocol; returns a summary dict (paths, per-variant mean metrics, wall time)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    t_start = time.perf_counter()
    run = setup_run(args)
    data = prepare_data(run)
    run.prog = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=run.console,
        disable=args.no_progress,
    )
    final_info: dict[str, Any] | None = None
    with (run.out / "log.jsonl").open("w") as run.log_f, run.prog:
        n_runs = len(run.variants) * len(data.splits) + (1 if args.final else 0)
        runs_task = run.prog.add_task("runs", total=n_runs)
        cv = run_cv(run, data, runs_task)
        if args.final:
            final_info = train_final(run, data, cv)
            run.prog.advance(runs_task)
    return write_outputs(run, data, cv, final_info, t_start)


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    _args.argv = sys.argv[1:]
    main(_args)
