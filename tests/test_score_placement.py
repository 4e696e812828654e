"""score/placement + the loop's on-device preprocessing path (``--preprocess-device``).

There is no GPU in CI, so the reduced hand-off + batched torch finishing is run on CPU torch through the
internal ``Placement.torch_device`` hook and compared with the default path (decode workers preprocess);
the CUDA variant is gpu-marked and skips without a device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from xbmd_batch.errors import InputError
from xbmd_batch.infer.model_file import open_model
from xbmd_batch.score import ScoreOptions, score_cohort
from xbmd_batch.score import pipeline as pipeline_mod
from xbmd_batch.score.placement import Placement, plan_preprocess

torch = pytest.importorskip("torch")

# bmd_pred, reduced hand-off + torch-CPU finishing vs the CPU path. The model inputs agree within 2e-3
# (tests/test_preprocess_torch.py); measured on this cohort and tiny model: max |delta bmd| 1.5e-6 g/cm2.
BMD_TOL = 1e-4


@pytest.fixture(scope="module")
def sensitive_models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model with its last head layer scaled x150 (prediction SD ~0.07 g/cm2 on the cohort instead
    of ~0.0004: a model that predicts the mean would hide any image difference), as .pt and .onnx."""
    from tests.helpers.score import export_onnx
    from xbmd_batch.checkpoint import load_model, save_checkpoint

    model, card = load_model(tiny_model)
    with torch.no_grad():
        model.head.net[-1].weight.mul_(150.0)
    d = tmp_path_factory.mktemp("sensitive")
    pt = save_checkpoint(d / "m.pt", model, card.model_config, card.schema, card.preprocess)
    return {"torch": pt, "onnxruntime": export_onnx(pt, d / "m.onnx")}


def _score(cohort: Path, model: Path, out: Path, **kw: object):
    opts = ScoreOptions(quiet=True, workers=kw.pop("workers", 0), batch_size=kw.pop("batch_size", 5), **kw)  # type: ignore[arg-type]
    return score_cohort(cohort / "dicom", cohort / "meta.csv", model, out, opts)


def _on_torch(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Plan every score run as reduced hand-off + batched torch finishing on ``device``."""
    monkeypatch.setattr(
        pipeline_mod,
        "plan_preprocess",
        lambda *a, **k: Placement("cuda", "reduced", f"test: torch on {device}", torch_device=device),
    )


def _bmd(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "scores.parquet").select("relative_path", "bmd_pred").sort("relative_path")


@pytest.mark.parametrize(("backend", "workers"), [("torch", 2), ("onnxruntime", 0)])
def test_reduced_handoff_with_torch_finishing_scores_like_the_cpu_path(
    cohort_session: Path,
    sensitive_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    workers: int,
) -> None:
    pytest.importorskip("onnxruntime")
    model = sensitive_models[backend]
    ref = _score(cohort_session, model, tmp_path / "cpu", backend=backend, workers=workers)
    _on_torch(monkeypatch, "cpu")
    dev = _score(cohort_session, model, tmp_path / "dev", backend=backend, workers=workers, batch_size=4)
    assert ref.preprocess_device == "cpu" and dev.preprocess_device == "cpu"
    assert ref.exit_code == dev.exit_code == 0, (ref.counts, dev.counts)
    a, b = _bmd(tmp_path / "cpu"), _bmd(tmp_path / "dev")
    assert a["relative_path"].to_list() == b["relative_path"].to_list() and a.height > 10
    diff = np.abs(a["bmd_pred"].to_numpy() - b["bmd_pred"].to_numpy())
    assert diff.max() <= BMD_TOL, diff.max()
    assert a["bmd_pred"].std() > 0.03  # image-sensitive predictions: a preprocessing error would show
    print(f"{backend}: max |delta bmd| {diff.max():.2e}, prediction SD {a['bmd_pred'].std():.3f}")
    run = pl.read_json(tmp_path / "dev" / "run.json").to_dicts()[0]
    assert run["preprocess"]["where"].startswith("batched on the device")
    assert run["timings_s"]["preprocess_device"] > 0
    ref_run = pl.read_json(tmp_path / "cpu" / "run.json").to_dicts()[0]
    assert ref_run["preprocess"]["where"] == "decode workers"


@pytest.mark.gpu
def test_preprocess_device_cuda_scores_like_the_cpu_path(
    cohort_session: Path, sensitive_models: dict[str, Path], tmp_path: Path
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    kw = {"backend": "torch", "device": "cuda", "precision": "fp32"}
    m = sensitive_models["torch"]
    ref = _score(cohort_session, m, tmp_path / "cpu", preprocess_device="cpu", **kw)
    dev = _score(cohort_session, m, tmp_path / "dev", preprocess_device="cuda", **kw)
    assert ref.preprocess_device == "cpu" and dev.preprocess_device == "cuda:0"
    diff = np.abs(
        _bmd(tmp_path / "cpu")["bmd_pred"].to_numpy() - _bmd(tmp_path / "dev")["bmd_pred"].to_numpy()
    )
    assert diff.max() <= BMD_TOL, diff.max()
    upload = pl.read_json(tmp_path / "dev" / "run.json").to_dicts()[0]["preprocess"]["upload"]
    assert upload["failure"] is None and upload["pinned"] and upload["bytes"] > 0, upload  # page-locked slots


def test_plan_preprocess_cpu_auto_and_refusals(tiny_model: Path, tiny_onnx: Path) -> None:
    card = open_model(tiny_model).card
    p = plan_preprocess("cpu", card, "checkpoint", "auto", "auto")
    assert (p.handoff, p.finish_device(None)) == ("image", None)
    p = plan_preprocess("auto", card, "onnx", "auto", "cpu")  # the runner is on the CPU: workers finish
    assert p.handoff == "image" and "CPU" in p.reason
    want = "--device cuda or --preprocess-device cpu" if torch.cuda.is_available() else "no CUDA device"
    with pytest.raises(InputError, match=want):
        plan_preprocess("cuda", card, "checkpoint", "torch", "cpu")
    with pytest.raises(InputError, match="unknown"):
        plan_preprocess("gpu", card, "checkpoint", "auto", "auto")
    assert plan_preprocess("auto", card, "onnx", "auto", "auto", engine="ray").handoff == "image"
    with pytest.raises(InputError, match="local engine"):
        plan_preprocess("cuda", card, "onnx", "auto", "auto", engine="ray")
    legacy = _with_version(card, 2)
    assert plan_preprocess("auto", legacy, "checkpoint", "auto", "auto").handoff == "image"
    with pytest.raises(InputError, match="version 2"):
        plan_preprocess("cuda", legacy, "checkpoint", "auto", "auto")


def _with_version(card, version: int):
    import dataclasses

    class _Card:
        preprocess = dataclasses.replace(card.preprocess, version=version)

    return _Card()


def test_finish_device_follows_the_runner() -> None:
    class R:
        device = "cuda:1"

    assert Placement("auto", "reduced", "").finish_device(R()) == "cuda:1"
    R.device = "cpu"  # auto planned CUDA, the GPU backends failed: torch finishes on the CPU
    assert Placement("auto", "reduced", "").finish_device(R()) == "cpu"
    assert Placement("cuda", "reduced", "", gpu_index=2).finish_device(R()) == "cuda:2"
    assert Placement("cuda", "reduced", "", torch_device="cpu").finish_device(R()) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_preprocess_device_cuda_without_gpu_exits_2_before_out(
    cohort_session: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from xbmd_batch.cli import app

    out = tmp_path / "out"
    args = ["score", str(cohort_session / "dicom"), str(cohort_session / "meta.csv"), "-m", str(tiny_model)]
    r = CliRunner().invoke(app, [*args, "-o", str(out), "--preprocess-device", "cuda", "-q"])
    assert r.exit_code == 2, r.output
    assert "no CUDA device" in r.output and "--preprocess-device" in r.output
    assert not out.exists()
    r = CliRunner().invoke(app, [*args, "-o", str(out), "--preprocess-device", "gpu"])
    assert r.exit_code == 2 and not out.exists()


def test_auto_keeps_cpu_finishing_on_a_gpu_runner_and_says_why(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one GPU measurement found the device path slower: auto plans CPU finishing even when the runner
    will be on CUDA (reason and console line cite it); cuda stays available; a case ``_auto_device``
    vouches for goes to the device."""
    from xbmd_batch.infer import select
    from xbmd_batch.score import placement

    card = open_model(tiny_model).card
    monkeypatch.setattr(select, "resolve_device", lambda device, kind: ("cuda", 1, ""))
    monkeypatch.setattr(placement, "_torch_cuda", lambda: True)
    p = plan_preprocess("auto", card, "checkpoint", "torch", "auto")
    assert p.handoff == "image" and p.finish_device(None) is None
    for fact in ("261", "738", "H200", "2026-11-29", "cuda:1", "faster"):
        assert fact in p.reason, (fact, p.reason)
    assert p.describe(None)["where"] == "decode workers" and p.describe(None)["reason"] == p.reason
    line = p.console_line(None)
    assert line is not None and "decode workers" in line and "261" in line
    cuda = plan_preprocess("cuda", card, "checkpoint", "torch", "auto")
    assert (cuda.handoff, cuda.gpu_index, cuda.console_line("cuda:1")) == (
        "reduced",
        1,
        "preprocessing finished on cuda:1 (--preprocess-device cuda)",
    )
    monkeypatch.setattr(placement, "_auto_device", lambda card, where: f"measured faster on {where}")
    p = plan_preprocess("auto", card, "checkpoint", "torch", "auto")
    assert (p.handoff, p.reason) == ("reduced", "auto: measured faster on cuda:1")
    # a CPU runner: nothing to say on the console (the reason is in run.json)
    monkeypatch.setattr(select, "resolve_device", lambda device, kind: ("cpu", 0, "no CUDA"))
    p = plan_preprocess("auto", card, "checkpoint", "torch", "auto")
    assert p.handoff == "image" and p.console_line(None) is None
