"""Training primitives: augmentation, `train_one_epoch`, `evaluate`, and `fit` (early stopping + schedule).

Data stay as arrays (a memory-mapped image cache plus small metadata/label arrays) and batches are gathered by
index, so a fold is a pair of index arrays and no DataLoader workers fight the decode pool for the 2 cores.
Augmentation runs on the batch tensor (one `affine_grid` + `grid_sample` for geometry, then intensity jitter)
so it costs the same on CPU and GPU. No left-right flip: laterality is not modelled.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.data import ArrayData
from train.presets import Preset
from train.wide import ALPHAS as WIDE_ALPHAS  # noqa: F401  (the wide path's ridge penalties; tests use it)


def augment(
    x: torch.Tensor, hp: Preset, gen: torch.Generator, norm_mean: float, norm_std: float
) -> torch.Tensor:
    """Small random rotation/scale/translation, then gamma + gain/offset jitter, per sample."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(b, generator=gen) * (hi - lo) + lo).to(x.device)

    ang = u(-hp.rot_deg, hp.rot_deg) * math.pi / 180.0
    sc = u(1.0 - hp.scale_frac, 1.0 + hp.scale_frac)
    tx, ty = u(-hp.translate_frac, hp.translate_frac) * 2, u(-hp.translate_frac, hp.translate_frac) * 2
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # intensity in [0, 1] space (the preprocessing's clip range), then back to the model's standardisation
    z = (x * norm_std + norm_mean).clamp(0.0, 1.0)
    gamma = u(1.0 - hp.gamma_jitter, 1.0 + hp.gamma_jitter).view(b, 1, 1, 1)
    gain = u(1.0 - hp.gain_jitter, 1.0 + hp.gain_jitter).view(b, 1, 1, 1)
    off = u(-hp.offset_jitter, hp.offset_jitter).view(b, 1, 1, 1)
    z = z.clamp_min(1e-6) ** gamma * gain + off
    return (z - norm_mean) / norm_std


def lr_lambda(step: int, total: int, warmup: int, min_frac: float) -> float:
    """Linear warm-up to 1, then cosine down to min_frac at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (no grad scaler needed); plain fp32 on CPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _batches(idx: np.ndarray, bs: int, rng: np.random.Generator | None, drop_tiny: bool) -> list[np.ndarray]:
    order = rng.permutation(idx) if rng is not None else np.asarray(idx)
    out = [order[i : i + bs] for i in range(0, len(order), bs)]
    if drop_tiny and len(out) > 1 and len(out[-1]) < 2:  # BatchNorm cannot train on a batch of one
        out[-2] = np.concatenate([out[-2], out[-1]])
        out.pop()
    return out


def train_one_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: ArrayData,
    idx: np.ndarray,
    hp: Preset,
    device: torch.device,
    rng: np.random.Generator,
    gen: torch.Generator,
    on_step: Callable[[], None] | None = None,
    offsets: np.ndarray | None = None,
) -> float:
    """One pass over idx in shuffled batches; returns the sample-weighted mean training loss.

    ``offsets`` (per cohort row): the wide path's cross-fitted predictions to train the network's residual
    against, instead of the fitted wide path's own (in-sample) output.
    """
    model.train()
    total, count = 0.0, 0
    for b in _batches(idx, hp.batch_size, rng, drop_tiny=True):
        img, meta, mask, y, order = data.batch(b, device)
        offset = None
        if offsets is not None:
            offset = torch.as_tensor(offsets[order], dtype=torch.float32, device=device)
        elif getattr(model, "wide", None) is not None:  # the frozen linear path reads the un-augmented image
            with torch.no_grad():
                offset = model.wide(img, meta, mask)
        if hp.augment:
            img = augment(img, hp, gen, data.norm_mean, data.norm_std)
        with _autocast(device):
            pred = model(img, meta, mask) if offset is None else model(img, meta, mask, wide_offset=offset)
        pred = pred.float()
        if pred.ndim == 2:  # a MemberEnsemble in training mode: one output per member, each on its own loss
            y = y.unsqueeze(-1).expand_as(pred).flatten()
            pred = pred.flatten()
        loss = loss_fn(pred, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hp.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(b)
        count += len(b)
        if on_step is not None:
            on_step()
    return total / max(count, 1)


@dataclass
class EvalResult:
    loss: float
    mae: float
    idx: np.ndarray  # rows, in the order of pred/attention
    pred: np.ndarray  # float64 [n]
    y: np.ndarray  # float64 [n]
    attention: np.ndarray  # float32 [n, F]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    data: ArrayData,
    idx: np.ndarray,
    batch_size: int,
    device: torch.device,
    offsets: np.ndarray | None = None,
) -> EvalResult:
    """Predictions, field attention, and the loss over the whole set at once (not a mean of batch losses).

    ``offsets`` (per cohort row) replace the wide path's output (cross-fitted calibration, see ``fit``).
    """
    model.eval()
    preds, atts, ys, rows = [], [], [], []
    for b in _batches(np.sort(idx), max(batch_size, 1) * 2, None, drop_tiny=False):
        img, meta, mask, y, order = data.batch(b, device)
        kw = {}
        if offsets is not None:
            kw["wide_offset"] = torch.as_tensor(offsets[order], dtype=torch.float32, device=device)
        with _autocast(device):
            out = model(img, meta, mask, return_attention=True, **kw)
        pred, att = out if isinstance(out, tuple) else (out, torch.full_like(meta, 1.0 / meta.shape[1]))
        preds.append(pred.float().cpu())
        atts.append(att.float().cpu())
        ys.append(y.cpu())
        rows.append(order)
    p, yy = torch.cat(preds), torch.cat(ys)
    loss = float(loss_fn(p, yy)) if len(p) else float("nan")
    return EvalResult(
        loss=loss,
        mae=float((p - yy).abs().mean()) if len(p) else float("nan"),
        idx=np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64),
        pred=p.double().numpy(),
        y=yy.double().numpy(),
        attention=torch.cat(atts).numpy() if atts else np.zeros((0, data.meta.shape[1]), np.float32),
    )


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1  # 0-based epoch whose weights were kept
    best_val_loss: float = float("nan")
    epochs_run: int = 0
    seconds: float = 0.0
    wide: dict[str, Any] | None = None  # fit_wide's result when the model has a wide path
    # cross-fitted wide offsets per cohort row (wide_fit "crossfit"): evaluate(..., offsets=) with them gives
    # predictions on the inner-validation rows that no part of the model was fitted on (calibration)
    wide_oof: np.ndarray | None = None


def param_groups(model: nn.Module, hp: Preset) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and positional embeddings; the CNN trunk at a scaled lr.

    A from-scratch ResNet34 wants a smaller step than the small fusion/metadata/head layers; one shared lr is
    either too slow for the head or unstable for the trunk in a few-epoch CPU run.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        trunk = ".image_encoder.stem." in f".{name}" or ".image_encoder.layers." in f".{name}"
        decay = p.ndim >= 2 and name.split(".")[-1] != "pos"
        groups.setdefault((trunk, decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": hp.lr * (hp.backbone_lr_mult if trunk else 1.0),
            "weight_decay": hp.weight_decay if decay else 0.0,
        }
        for (trunk, decay), ps in sorted(groups.items())
    ]


WIDE_FITS: tuple[str, ...] = ("inner", "full", "crossfit")


@torch.no_grad()
def wide_features(model: nn.Module, data: ArrayData, idx: np.ndarray, device: torch.device) -> np.ndarray:
    """The wide path's input features [len(idx), n_features] (float64) of rows ``np.sort(idx)``."""
    feats = []
    for b in _batches(np.sort(idx), 256, None, drop_tiny=False):
        img, meta, mask, _y, _ = data.batch(b, device)
        feats.append(model.wide.features(img, meta, mask).double().cpu().numpy())
    return np.concatenate(feats)


@torch.no_grad()
def fit_wide(
    model: nn.Module,
    data: ArrayData,
    idx: np.ndarray,
    device: torch.device,
    seed: int = 0,
    cross_fit: bool = False,
) -> dict[str, Any]:
    """Fit the wide path on rows ``idx`` by ridge (``train.wide``; the gain form when the model has it), fold
    the weights into ``model.wide`` and freeze it. Returns the penalties, the in-sample R² and, with
    ``cross_fit``, ``"oof"``: the wide fit's out-of-fold predictions per cohort row (NaN off ``idx``).
    """
    from train.wide import cross_fitted_wide, fit_wide_arrays

    wide = model.wide
    rows = np.sort(np.asarray(idx))
    x = wide_features(model, data, rows, device)
    y = data.y[rows].astype(np.float64)
    gain = wide.gain is not None
    fw = fit_wide_arrays(x, y, wide.n_meta, gain, seed=seed)

    def put(lin: nn.Linear, w: np.ndarray, b: float) -> None:
        lin.weight.copy_(torch.as_tensor(w, dtype=lin.weight.dtype).view(1, -1))
        lin.bias.fill_(float(b))

    put(wide.linear, fw.linear_w, fw.linear_b)
    if gain:
        put(wide.score, fw.score_w, fw.score_b)
        put(wide.gain, fw.gain_w, fw.gain_b)
    for p in wide.parameters():
        p.requires_grad_(False)
    pred = fw.predict(x, wide.n_meta)
    out: dict[str, Any] = {
        "alpha": fw.alpha,
        "alpha_stage2": fw.alpha2,
        "gain": gain,
        "n": len(rows),
        "r2_in_sample": float(1.0 - np.mean((y - pred) ** 2) / max(np.var(y), 1e-12)),
    }
    if cross_fit:
        oof = np.full(len(data.y), np.nan)
        oof[rows] = cross_fitted_wide(x, y, wide.n_meta, gain, seed=seed)
        out["oof"] = oof
        out["r2_cross_fitted"] = float(1.0 - np.mean((y - oof[rows]) ** 2) / max(np.var(y), 1e-12))
    return out


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    data: ArrayData,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    hp: Preset,
    device: torch.device,
    seed: int,
    epochs: int | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> FitResult:
    """AdamW + warm-up/cosine; keeps the weights of the best inner-validation loss (patience early stop).

    Without a validation split (the final all-data model) it trains exactly `epochs` epochs, keeps the last.

    A wide path is fitted first. ``hp.wide_fit`` "inner": on ``train_idx``, the network then learns the
    residual of the fitted wide path. "full": on ``train_idx`` plus ``val_idx`` (every labelled row the caller
    gives), the network on its residual. "crossfit": on ``train_idx`` plus ``val_idx``, and the network learns
    the residual of the wide fit's cross-fitted (out-of-fold) predictions, the errors it makes on unseen
    rows; ``FitResult.wide_oof`` keeps those offsets so the caller can calibrate on ``val_idx`` with
    predictions no part of the model was fitted on.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n_epochs = int(epochs if epochs is not None else hp.epochs)
    steps_per_epoch = len(_batches(train_idx, hp.batch_size, None, drop_tiny=True))
    total = max(1, n_epochs * steps_per_epoch)
    warm = int(round(hp.warmup_epochs * steps_per_epoch))
    model.to(device)
    res = FitResult()
    offsets = None
    if getattr(model, "wide", None) is not None:  # the linear path first, then the network on its residual
        if hp.wide_fit not in WIDE_FITS:
            raise ValueError(f"unknown wide_fit {hp.wide_fit!r}; expected one of {WIDE_FITS}")
        crossfit = hp.wide_fit == "crossfit"
        every_row = hp.wide_fit in ("crossfit", "full") and val_idx is not None
        wide_rows = np.union1d(train_idx, val_idx) if every_row else train_idx
        res.wide = fit_wide(model, data, wide_rows, device, seed=seed, cross_fit=crossfit)
        if crossfit:
            offsets = res.wide.pop("oof")
            res.wide_oof = offsets
    opt = torch.optim.AdamW(param_groups(model, hp), lr=hp.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, warm, hp.min_lr_frac))
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    t0 = time.perf_counter()
    has_val = val_idx is not None and len(val_idx) > 0
    for ep in range(n_epochs):
        te = time.perf_counter()
        lr = max(g["lr"] for g in opt.param_groups)
        tr_loss = train_one_epoch(
            model, loss_fn, opt, sched, data, train_idx, hp, device, rng, gen, on_step, offsets
        )
        rec: dict[str, float] = {"epoch": float(ep), "train_loss": tr_loss, "lr": float(lr)}
        if has_val:
            ev = evaluate(model, loss_fn, data, val_idx, hp.batch_size, device, offsets)
            rec.update(val_loss=ev.loss, val_mae=ev.mae)
            if not hp.select_best:
                res.best_epoch, res.best_val_loss = ep, ev.loss  # keep the last epoch
            elif not math.isfinite(res.best_val_loss) or ev.loss < res.best_val_loss:
                res.best_val_loss, res.best_epoch, since_best = ev.loss, ep, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                since_best += 1
        else:
            rec.update(val_loss=float("nan"), val_mae=float("nan"))
            res.best_epoch = ep
        rec["seconds"] = time.perf_counter() - te
        res.history.append(rec)
        res.epochs_run = ep + 1
        if on_epoch is not None:
            on_epoch(rec)
        if has_val and hp.select_best and since_best >= hp.patience:
            break
    if best_state is not None and hp.select_best:
        model.load_state_dict(best_state)
    res.seconds = time.perf_counter() - t0
    return res


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
