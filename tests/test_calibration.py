"""Calibration: the fitting rule, and the round trip checkpoint -> ONNX -> every available runner.

The calibration pair sits in the model (ModelConfig -> head buffers), so every backend must return
``intercept + slope * raw`` without knowing about it. TensorRT is checked when it and a GPU are present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.models import smallcnn_wide_cfg
from xbmd_batch.calibration import MIN_N_SLOPE, apply_calibration, calibration_stats, compose, fit_calibration
from xbmd_batch.checkpoint import load_model, save_checkpoint
from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
from xbmd_batch.infer.select import open_runner
from xbmd_batch.model import build_model, set_calibration
from xbmd_batch.parity_feeds import make_reference_feeds

SIZE = 64
A, B = 0.0375, 1.25  # a visible intercept and slope


def test_rule_intercept_only_below_min_n_then_ols() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(0.75, 0.12, 400)
    raw = 0.5 * (y - 0.75) + 0.72 + rng.normal(0, 0.01, 400)  # shrunk and biased low
    small = fit_calibration(raw[:30], y[:30])
    assert small["slope"] == 1.0 and small["n"] == 30 and "intercept only" in small["method"]
    assert small["intercept"] == pytest.approx(np.mean(y[:30] - raw[:30]))
    big = fit_calibration(raw, y)
    assert big["n"] == 400 >= MIN_N_SLOPE and "slope" in big["method"]
    assert big["slope"] == pytest.approx(2.0, rel=0.05)
    cal = apply_calibration(raw, big["intercept"], big["slope"])
    st = calibration_stats(cal, y)
    assert abs(st["citl"]) < 1e-9 and st["cal_slope"] == pytest.approx(1.0, abs=1e-9)
    before = calibration_stats(raw, y)
    assert before["citl"] == pytest.approx(0.03, abs=0.01) and before["cal_slope"] > 1.5
    a, b = compose({"intercept": 0.1, "slope": 2.0}, {"intercept": -0.05, "slope": 0.5})
    assert (a, b) == pytest.approx((0.0, 1.0))
    assert fit_calibration(np.array([np.nan]), np.array([1.0]))["n"] == 0


def test_small_set_intercept_only_when_distinguishable_from_zero() -> None:
    """Below MIN_N_SLOPE an intercept inside its own noise (|mean| <= 1.96 SE) is not applied."""
    rng = np.random.default_rng(1)
    y = rng.normal(0.75, 0.12, 32)
    noise = rng.normal(0, 0.065, 32)
    noise -= noise.mean() - 0.004  # mean residual +0.004, SE ~0.011: noise
    quiet = fit_calibration(y - noise, y)
    assert quiet["intercept"] == 0.0 and quiet["slope"] == 1.0 and quiet["method"].startswith("none")
    assert quiet["intercept_estimate"] == pytest.approx(0.004)
    shifted = fit_calibration(y - noise - 0.03, y)  # a Weighted-Smooth-L1-sized shift is applied
    assert shifted["intercept"] == pytest.approx(0.034) and "intercept only" in shifted["method"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("cal")
    torch.manual_seed(0)
    cfg = smallcnn_wide_cfg(SIZE, 32, d_model=32, wide_gain=True, n_members=2)
    # the quick preset's architecture (2 members) plus the metadata gain: every part must export
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.wide.linear.weight.normal_(0, 1e-3)  # a non-trivial wide path
        model.wide.score.weight.normal_(0, 1e-2)
        model.wide.gain.weight.normal_(0, 0.1)
    raw_path = save_checkpoint(d / "raw.pt", model, cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=SIZE))
    cal_cfg = set_calibration(model, A, B)
    cal_path = save_checkpoint(
        d / "cal.pt", model, cal_cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=SIZE), {"note": "test"}
    )
    _, card = load_model(cal_path)
    feeds = make_reference_feeds(card, n=32)
    return d, raw_path, cal_path, feeds


def test_checkpoint_keeps_the_calibration_and_old_state_dicts_still_load(calibrated) -> None:
    _, raw_path, cal_path, feeds = calibrated
    raw_model, raw_card = load_model(raw_path)
    cal_model, cal_card = load_model(cal_path)
    assert (raw_card.model_config.calib_intercept, raw_card.model_config.calib_slope) == (0.0, 1.0)
    assert (cal_card.model_config.calib_intercept, cal_card.model_config.calib_slope) == (A, B)
    # same weights (the pair is config, not state): the state dicts are interchangeable
    assert raw_model.state_dict().keys() == cal_model.state_dict().keys()
    x = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        raw = raw_model(x["image"], x["meta"], x["meta_mask"]).numpy()
        cal = cal_model(x["image"], x["meta"], x["meta_mask"]).numpy()
    np.testing.assert_allclose(cal, A + B * raw, rtol=0, atol=1e-5)


def test_round_trip_checkpoint_onnx_every_runner(calibrated) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is needed for the ONNX leg")
    from export.onnx_export import export_onnx
    from xbmd_batch.onnx_card import read_onnx_card

    d, raw_path, cal_path, feeds = calibrated
    with open_runner(raw_path, backend="torch", device="cpu") as r:
        raw = r.infer(feeds)["bmd"]
    expected = A + B * raw.astype(np.float64)
    onnx_path = export_onnx(cal_path, d / "cal.onnx", parity_feeds=feeds).path
    card = read_onnx_card(onnx_path)
    assert (card.model_config.calib_intercept, card.model_config.calib_slope) == (A, B)
    outs = {}
    with open_runner(cal_path, backend="torch", device="cpu") as r:
        outs["torch"] = r.infer(feeds)["bmd"]
    with open_runner(onnx_path, backend="onnxruntime", device="cpu") as r:
        outs["onnxruntime"] = r.infer(feeds)["bmd"]
    try:
        import tensorrt  # noqa: F401

        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    if has_trt:  # pragma: no cover - needs a GPU
        with open_runner(onnx_path, backend="tensorrt", device="cuda") as r:
            outs["tensorrt"] = r.infer(feeds)["bmd"]
    for name, got in outs.items():
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4, err_msg=name)
    assert not np.allclose(outs["onnxruntime"], raw, atol=1e-3)  # the calibration really is in the graph
    # the metadata gain term is in the graph too: without it the checkpoint model's output moves
    model, _ = load_model(cal_path)
    x = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        f = model.wide.features(x["image"], x["meta"], x["meta_mask"])
        term = model.wide.score(f).squeeze(-1) * model.wide.gain(f[:, -model.wide.n_meta :]).squeeze(-1)
    assert float(term.abs().max()) > 1e-2


def test_set_calibration_rejects_nothing_but_replaces(tmp_path: Path) -> None:
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=SIZE, d_model=16, n_layers=1, encoder="smallcnn")
    m = build_model(cfg)
    set_calibration(m, 0.1, 2.0)
    ens = build_model(ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=SIZE, d_model=16, encoder="smallcnn",
                                             n_layers=1, n_members=2))  # fmt: skip
    assert set_calibration(ens, 0.3, 0.9).calib_intercept == 0.3
    assert float(ens.head.calib_slope) == pytest.approx(0.9)
    new = set_calibration(m, 0.2, 0.5)
    assert (new.calib_intercept, new.calib_slope) == (0.2, 0.5)
    assert float(m.head.calib_intercept) == pytest.approx(0.2) and float(m.head.calib_slope) == 0.5
