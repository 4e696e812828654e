"""train.wide: the gain wide path's fit finds a planted image x metadata gain that a ridge cannot express,
its weights map onto WidePath exactly, and the cross-fitted predictions never use their own row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.models import smallcnn_wide_cfg
from train.wide import cross_fitted_wide, fit_wide_arrays
from xbmd_batch.config import DEFAULT_SCHEMA
from xbmd_batch.model import build_model

N_META = 4


def _planted(n: int, seed: int, p: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """y = (1 + 0.4 m0) * (w . pixels) + 0.1 m1 + noise: metadata scales what the image says."""
    rng = np.random.default_rng(seed)
    pix = rng.normal(0, 1, (n, p))
    m = rng.normal(0, 1, (n, N_META))
    w = np.zeros(p)
    w[:5] = 0.1
    y = (1.0 + 0.4 * m[:, 0]) * (pix @ w) + 0.1 * m[:, 1] + 0.75 + rng.normal(0, 0.02, n)
    return np.concatenate([pix, m], axis=1), y


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    return float(1.0 - np.mean((y - p) ** 2) / np.var(y))


def test_gain_fit_beats_ridge_on_a_planted_gain_and_the_ablation_loses_it() -> None:
    x, y = _planted(300, 0)
    xt, yt = _planted(300, 1)
    gain = fit_wide_arrays(x, y, N_META, gain=True)
    plain = fit_wide_arrays(x, y, N_META, gain=False)
    ablated = fit_wide_arrays(x, y, N_META, gain=True, interaction=False)
    r2_gain, r2_plain = _r2(yt, gain.predict(xt, N_META)), _r2(yt, plain.predict(xt, N_META))
    r2_ablated = _r2(yt, ablated.predict(xt, N_META))
    # unexplained variance on new rows: the gain fit leaves under a quarter of what ridge / the ablation leave
    assert 1 - r2_gain < 0.25 * (1 - r2_plain) and 1 - r2_gain < 0.25 * (1 - r2_ablated), (
        r2_gain,
        r2_plain,
        r2_ablated,
    )
    assert np.all(ablated.gain_w == 0)  # the ablation is the same fit without the z * m columns
    # the fitted gain is on m0 (the planted one), relative to the score's scale
    assert np.argmax(np.abs(gain.gain_w)) == 0


def test_wide_fit_maps_onto_the_module() -> None:
    """WideFit.predict (numpy) == WidePath.forward after the weights are copied in (what training does)."""
    from train.data import ArrayData
    from train.engine import fit_wide

    f = len(DEFAULT_SCHEMA.fields)
    rng = np.random.default_rng(0)
    n, size = 40, 32
    img = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32)
    meta = rng.normal(0, 1, (n, f)).astype(np.float32)
    mask = np.ones((n, f), np.float32)
    y = (0.7 + 0.05 * img[:, 0, :4, :4].mean((1, 2)) * (1 + 0.5 * meta[:, 1])).astype(np.float32)
    data = ArrayData(images=img, row_of=np.arange(n), meta=meta, mask=mask, y=y)
    model = build_model(smallcnn_wide_cfg(size, 8, wide_gain=True))
    info = fit_wide(model, data, np.arange(30), torch.device("cpu"), cross_fit=True)
    t = [torch.from_numpy(a) for a in (img, meta, mask)]
    x = model.wide.features(*t).double().numpy()
    fw = fit_wide_arrays(x[:30], y[:30].astype(np.float64), 2 * f, gain=True)
    with torch.no_grad():
        got = model.wide(*t).double().numpy()
    np.testing.assert_allclose(got, fw.predict(x, 2 * f), rtol=0, atol=1e-4)
    assert info["gain"] is True and not any(p.requires_grad for p in model.wide.parameters())
    assert np.isfinite(info["oof"][:30]).all() and np.isnan(info["oof"][30:]).all()


@pytest.mark.parametrize("gain", [False, True])
def test_cross_fitted_predictions_do_not_see_their_own_row(gain: bool) -> None:
    x, y = _planted(60, 2, p=12)
    base = cross_fitted_wide(x, y, N_META, gain)
    y2 = y.copy()
    y2[7] += 50.0  # a wild label moves every fit that trains on row 7, but not row 7's own prediction
    moved = cross_fitted_wide(x, y2, N_META, gain)
    assert moved[7] == pytest.approx(base[7], abs=1e-9)
    assert np.abs(moved - base).max() > 0.1
