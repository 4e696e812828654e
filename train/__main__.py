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
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

LOSSES: tuple[str, ...] = ("mse", "l1", "smoothl1", "wsmoothl1")


def model_config_for(schema: Any, fusion: str, hp: Any, y: np.ndarray) -> Any:
    """The model for a preset and a training set: the head starts at the labels' mean and SD."""
    from xbmd_batch.config import ModelConfig

    return ModelConfig.for_schema(
        schema,
        fusion=fusion,
        image_size=hp.image_size,
        encoder=hp.encoder,
        cnn_width=hp.cnn_width,
        wide=hp.wide,
        wide_side=hp.wide_side,
        wide_gain=hp.wide_gain,
        n_members=hp.n_members,
        d_model=hp.d_model,
        n_layers=hp.n_layers,
        n_heads=hp.n_heads,
        dropout=hp.dropout,
        meta_hidden=hp.meta_hidden,
        head_hidden=hp.head_hidden,
        bmd_mean=float(y.mean()),
        bmd_std=float(y.std()) or 0.14,
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from train.presets import PRESETS
    from xbmd_batch.clinical import REFERENCES

    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Cross-validated training of XAttn-BMD (and the concat baseline) on a DICOM cohort.",
        epilog="example: python -m train --cohort demo_out/cohort --preset quick --single-split --final "
        "--out runs/demo",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cohort", required=True, help="cohort folder (DICOMs anywhere below it)")
    p.add_argument("--meta", default=None, help="metadata table (default: <cohort>/meta.csv)")
    p.add_argument("--labels", default=None, help="label table with subject_id (default: <cohort>/truth.csv)")
    p.add_argument("--label-col", default="bmd_dxa", help="BMD column of the label table (g/cm²)")
    p.add_argument(
        "--key-column", default=None, help="META column matched against PatientID (as `score --key-column`)"
    )
    p.add_argument(
        "--path-column", default=None, help="META column naming each row's file (as `score --path-column`)"
    )
    p.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--fusion", default="xattn", choices=["xattn", "concat"])
    p.add_argument(
        "--loss",
        default=None,
        choices=list(LOSSES),
        help="training loss (default: the preset's: quick mse, paper wsmoothl1)",
    )
    p.add_argument(
        "--compare",
        nargs="?",
        const="all",
        default=None,
        choices=["all", "fusion", "loss"],
        help="the paper's comparison on the same folds: XAttn vs concat ('fusion'), the four losses "
        "('loss'), or both (bare --compare)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="--compare fusion: repeats of K-fold CV with fresh fold assignments (default 5; 1 = off)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="--compare fusion: training seeds per fold and arm (default 3)",
    )
    p.add_argument("--folds", type=int, default=None, help="K for K-fold CV (default: the preset's)")
    p.add_argument(
        "--single-split", action="store_true", help="one stratified 90/10 split instead of K folds"
    )
    p.add_argument(
        "--split-by",
        default=None,
        metavar="COLUMN",
        help="leave-one-level-out validation on a label-table column, e.g. 'site' (leave-one-scanner-out)",
    )
    p.add_argument("--final", action="store_true", help="also train on all data -> <out>/final.pt")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's input size")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's max epochs")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--backbone-lr-mult", type=float, default=None, help="ResNet trunk lr = lr * this")
    p.add_argument("--d-model", type=int, default=None, help="override the preset's embedding width")
    p.add_argument("--patience", type=int, default=None)
    p.add_argument(
        "--members",
        type=int,
        default=None,
        help="networks averaged inside one model, each trained on its own loss (default: the preset's)",
    )
    p.add_argument(
        "--wide-gain",
        default=None,
        choices=["on", "off"],
        help="metadata gain on the wide path's image score (default: the preset's; 'off' = the ablation)",
    )
    p.add_argument(
        "--wide-fit",
        default=None,
        choices=["inner", "full", "crossfit"],
        help="wide path fitted on the inner-training rows ('inner'), on the whole training part ('full'), "
        "or on the whole training part with the network trained on its cross-fitted residual ('crossfit'); "
        "default: the preset's",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pretrained",
        default=None,
        metavar="PATH",
        help="torchvision ImageNet resnet34 state dict (a local file; nothing is downloaded) to start the "
        "resnet34 encoder from (the RGB stem summed to one channel); paper preset",
    )
    p.add_argument(
        "--reference", default="nhanes3-hologic", choices=sorted(REFERENCES), help="T-score reference"
    )
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.90,
        help="screening operating points: cut-off on the estimate reaching this sensitivity, chosen on the "
        "other folds and applied out of fold",
    )
    p.add_argument("--workers", type=int, default=2, help="decode processes for the image cache")
    p.add_argument("--cache-dir", default=None, help="image cache folder (default: <out>/.xbmd_cache)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: half the cores, at least 1: on a shared box OpenMP spin-waiting "
        "makes 2 threads on 2 busy cores several times slower than 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def _nan_to_none(d: dict[str, Any]) -> dict[str, Any]:
    """Strict-JSON friendly copy (the checkpoint summary ends up in the ONNX model card)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _variants(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(fusion, loss) pairs; the primary (the one asked for) first."""
    primary = (args.fusion, args.loss)
    if not args.compare:
        return [primary]
    want: list[tuple[str, str]] = []
    if args.compare in ("all", "fusion"):
        want += [("xattn", args.loss), ("concat", args.loss)]
    if args.compare in ("all", "loss"):
        want += [("xattn", loss) for loss in LOSSES]
    out = [primary]
    for v in want:
        if v not in out:
            out.append(v)
    return out


def _repeats_seeds(args: argparse.Namespace) -> tuple[int, int]:
    """--compare fusion defaults to 5 repeats x 3 seeds (issue 10); every other run to one CV, one seed."""
    fusion = args.compare in ("all", "fusion")
    repeats = args.repeats if args.repeats is not None else (5 if fusion else 1)
    seeds = args.seeds if args.seeds is not None else (3 if fusion else 1)
    return max(1, repeats), max(1, seeds)


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


def vname(fusion: str, loss: str) -> str:
    return f"{fusion}-{loss}"


def command_line(args: argparse.Namespace) -> str:
    """The equivalent command line: the argv when run from a shell, else rebuilt from the non-default args."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = []
        for act in get_args_parser()._actions:
            if not act.option_strings or act.dest == "help":
                continue
            val = getattr(args, act.dest, act.default)
            if val == act.default:
                continue
            if isinstance(act, argparse._StoreTrueAction):
                argv.append(act.option_strings[-1])
            else:
                argv += [act.option_strings[-1], str(val)]
    return "python -m train " + " ".join(shlex.quote(a) for a in argv)


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
    return Run(args, out, hp, device, console, _variants(args))


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
    repeats, n_seeds = _repeats_seeds(args)
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
