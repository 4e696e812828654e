"""train.engine: the ridge-fitted wide path, and keeping the last epoch (select_best=False)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tests.helpers.models import smallcnn_wide_cfg
from train.data import ArrayData
from train.engine import WIDE_ALPHAS, fit, fit_wide
from train.presets import get_preset
from xbmd_batch.config import DEFAULT_SCHEMA
from xbmd_batch.loss import make_loss
from xbmd_batch.model import build_model

F = len(DEFAULT_SCHEMA.fields)


def _data(n: int = 60, size: int = 32, seed: int = 0) -> ArrayData:
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32)
    meta = rng.normal(0, 1, (n, F)).astype(np.float32)
    mask = (rng.random((n, F)) > 0.1).astype(np.float32)
    y = (0.75 + 0.05 * img[:, 0, :8, :8].mean((1, 2)) + 0.02 * meta[:, 1] * mask[:, 1]).astype(np.float32)
    return ArrayData(images=img, row_of=np.arange(n), meta=meta, mask=mask, y=y)


def _model(size: int = 32, side: int = 16):
    return build_model(smallcnn_wide_cfg(size, side))


def test_fit_wide_is_sklearn_ridge_folded_into_the_model_and_frozen() -> None:
    data = _data()
    model = _model()
    idx = np.arange(50)
    info = fit_wide(model, data, idx, torch.device("cpu"))
    x = (
        model.wide.features(
            torch.from_numpy(data.images), torch.from_numpy(data.meta), torch.from_numpy(data.mask)
        )
        .double()
        .numpy()
    )
    ref = make_pipeline(StandardScaler(), RidgeCV(alphas=WIDE_ALPHAS)).fit(x[idx], data.y[idx])
    with torch.no_grad():
        got = model.wide(
            torch.from_numpy(data.images), torch.from_numpy(data.meta), torch.from_numpy(data.mask)
        )
    np.testing.assert_allclose(got.numpy(), ref.predict(x), rtol=0, atol=1e-4)
    assert info["alpha"] == pytest.approx(ref[-1].alpha_)
    assert not any(p.requires_grad for p in model.wide.parameters())
    assert x.shape[1] == 16 * 16 + 2 * F  # 32 px pooled by 2, metadata values + mask


def test_fit_trains_the_network_on_top_and_keeps_the_last_epoch() -> None:
    data = _data()
    model = _model()
    hp = get_preset("quick").replace(image_size=32, epochs=3, batch_size=16, select_best=False, augment=True)
    res = fit(
        model, make_loss("mse"), data, np.arange(40), np.arange(40, 60), hp, torch.device("cpu"), seed=0
    )
    assert res.wide is not None and res.epochs_run == 3 and res.best_epoch == 2  # last epoch kept
    w = model.wide.linear.weight.detach().clone()
    # crossfit (the preset's) fitted the wide path on train + val = rows 0-59; new rows -> a new fit
    fit(model, make_loss("mse"), data, np.arange(50), None, hp, torch.device("cpu"), seed=1, epochs=1)
    assert not torch.equal(w, model.wide.linear.weight)  # refitted on the new training rows (final model)


def test_crossfit_fits_the_wide_path_on_train_and_val_and_trains_on_cross_fitted_offsets() -> None:
    """wide_fit "crossfit" (the quick preset): the wide path sees every labelled row the caller gives, the
    network trains against the wide fit's out-of-fold predictions, kept in FitResult.wide_oof."""
    from train.wide import fit_wide_arrays

    data = _data()
    hp = get_preset("quick").replace(image_size=32, epochs=1, batch_size=16)
    assert hp.wide_fit == "crossfit" and hp.loss == "mse" and hp.wide and not hp.wide_gain
    model = _model()
    tr, val = np.arange(40), np.arange(40, 50)
    res = fit(model, make_loss("mse"), data, tr, val, hp, torch.device("cpu"), seed=0)
    t = [torch.from_numpy(a) for a in (data.images, data.meta, data.mask)]
    x = model.wide.features(*t).double().numpy()
    n_meta = model.wide.n_meta
    fw = fit_wide_arrays(x[:50], data.y[:50].astype(np.float64), n_meta, gain=False)
    with torch.no_grad():
        np.testing.assert_allclose(model.wide(*t).numpy(), fw.predict(x, n_meta), rtol=0, atol=1e-4)
    oof = res.wide_oof
    assert oof is not None and np.isfinite(oof[:50]).all() and np.isnan(oof[50:]).all()
    assert not np.allclose(oof[:50], fw.predict(x[:50], n_meta), atol=1e-3)  # out of fold, not in-sample
    inner = fit(
        _model(), make_loss("mse"), data, np.arange(40), np.arange(40, 50), hp.replace(wide_fit="inner"),
        torch.device("cpu"), seed=0,
    )  # fmt: skip
    assert inner.wide_oof is None and inner.wide["n"] == 40


def test_member_ensemble_trains_every_member_on_its_own_loss() -> None:
    from xbmd_batch.model import MemberEnsemble

    data = _data()
    cfg = smallcnn_wide_cfg(32, 16, n_members=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, MemberEnsemble)
    before = [p.detach().clone() for p in model.members.parameters()]
    hp = get_preset("quick").replace(image_size=32, epochs=1, batch_size=16)
    fit(model, make_loss("mse"), data, np.arange(40), np.arange(40, 50), hp, torch.device("cpu"), seed=0)
    moved = [not torch.equal(a, b) for a, b in zip(model.members.parameters(), before, strict=True)]
    half = len(moved) // 2
    assert any(moved[:half]) and any(moved[half:])
