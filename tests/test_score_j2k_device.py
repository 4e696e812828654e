"""GPU JPEG 2000 decode in the scoring loop (score/j2k_device.py, DecodePool(j2k="device"), plan_j2k).

No GPU in CI: the GPU decoder is replaced by a CPU stand-in with its interface (tests/helpers/j2k_standin.py,
a full decode through pylibjpeg-openjpeg) and batches are finished by torch on the CPU, so everything but the
nvImageCodec call itself runs here. On the 64-px test model the cohort's JPEG 2000 files (216-270 px) are
decoded at full resolution by the CPU path too (no wavelet level keeps >= 2 x 64 px), so the stand-in path and
the CPU path share one definition there and must agree to float rounding.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.dicom_io import Codestream, read_stored
from xbmd_batch.preprocess import finish, preprocess_stored, reduce_stored
from xbmd_batch.score.decode import DecodePool
from xbmd_batch.score.j2k_device import J2KDeviceStage
from xbmd_batch.score.placement import Placement, plan_j2k

torch = pytest.importorskip("torch")
pytest.importorskip("openjpeg")  # the stand-in's decoder (the jpeg extra)

from tests.helpers.j2k_standin import NAME, CpuJ2KStandIn  # noqa: E402

J2K = "1.2.840.10008.1.2.4.90"
CFG = PreprocessConfig(image_size=64)


def _files(dicom: Path) -> list[Path]:
    return sorted(p for p in dicom.rglob("*") if p.is_file() and not p.name.startswith("."))


def _ts(p: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def truncate_j2k(path: Path) -> Path:
    """Cut a JPEG 2000 file's codestream 20 bytes into its first tile (main header intact, so it passes every
    check before decoding; every CPU decoder then fails on it)."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: frame.find(b"\xff\x90") + 20]])
    ds.save_as(path)
    return path


@pytest.fixture()
def j2k_cohort(cohort_session: Path, tmp_path: Path) -> dict[str, object]:
    """A copy of the test cohort with one JPEG 2000 file truncated and a junk-header file added."""
    d = tmp_path / "c"
    shutil.copytree(cohort_session, d)
    files = _files(d / "dicom")
    j2k = [p for p in files if _ts(p) == J2K]
    assert len(j2k) >= 4
    truncate_j2k(j2k[-1])
    (d / "dicom" / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    return {"root": d, "files": _files(d / "dicom"), "j2k": j2k, "bad": j2k[-1]}


def _pool(root: Path, files: list[Path], j2k: str, workers: int = 0) -> DecodePool:
    rel = [str(p.relative_to(root)) for p in files]
    return DecodePool(
        root, pa.array(rel, pa.large_string()), CFG, workers, task_size=3, handoff="reduced", j2k=j2k
    )


def _collect(pool: DecodePool, n: int) -> tuple[dict[int, object], dict[int, tuple[int, str, str]]]:
    items: dict[int, object] = {}
    failures: dict[int, tuple[int, str, str]] = {}
    for t in pool.run(np.arange(n)):
        for i, r in zip(t.idx, t.reduced or [], strict=True):
            if r is not None:  # a view of the slot: copy what the test keeps
                px = getattr(r, "pixels", None)
                items[int(i)] = r if px is None else dataclasses.replace(r, pixels=np.array(px))
        failures.update({f[0]: f for f in t.failures})
    return items, failures


def test_workers_hand_over_checked_codestreams_with_the_cpu_paths_affine(j2k_cohort: dict) -> None:
    root, files = j2k_cohort["root"], j2k_cohort["files"]
    d = root / "dicom"
    with _pool(d, files, "device") as pool:
        dev, dev_fail = _collect(pool, len(files))
    with _pool(d, files, "cpu") as pool:
        cpu, cpu_fail = _collect(pool, len(files))
    bad = files.index(j2k_cohort["bad"])
    junk = files.index(d / "junk.dcm")
    assert set(dev_fail) == {junk} and dev_fail[junk] == cpu_fail[junk]  # header failures: the same row
    assert set(cpu_fail) == {junk, bad}  # the truncated file fails only when decoded (main process, on GPU)
    n_cs = 0
    for i, p in enumerate(files):
        if i == junk:
            continue
        if p in j2k_cohort["j2k"]:
            cs = dev[i]
            assert isinstance(cs, Codestream), p
            n_cs += 1
            assert cs.data[:4] == b"\xff\x4f\xff\x51" and cs.transfer_syntax_uid == J2K
            if i != bad:
                st, _ = read_stored(p, target_size=64)
                assert (cs.scale, cs.offset, cs.full_shape) == (st.scale, st.offset, st.full_shape)
                assert cs.cpu_level == 0 and cs.signed_bits is None
        else:
            np.testing.assert_array_equal(dev[i].pixels, cpu[i].pixels)  # unchanged for other syntaxes
            assert dev[i] == dataclasses.replace(cpu[i], pixels=dev[i].pixels)
    assert n_cs == len(j2k_cohort["j2k"])


def test_stage_decodes_a_batch_and_falls_back_to_the_cpu_path(j2k_cohort: dict) -> None:
    root, files = j2k_cohort["root"], j2k_cohort["files"]
    d = root / "dicom"
    j2k, bad = j2k_cohort["j2k"], j2k_cohort["bad"]
    refused = j2k[0]  # the stand-in refuses this one: the CPU path decodes it
    refused_frame = _frame(refused)
    standin = CpuJ2KStandIn(reject=lambda f: f == refused_frame)
    with _pool(d, files, "device") as pool:
        items, _ = _collect(pool, len(files))
        stage = J2KDeviceStage(standin, CFG, pool.decode_now, "test")
        idx = np.array(sorted(items), dtype=np.int64)
        out_idx, out, failures = stage.resolve(idx, [items[int(i)] for i in idx])
        with _pool(d, files, "cpu") as ref_pool:
            _, cpu_fail = _collect(ref_pool, len(files))
    ib = files.index(bad)
    assert failures == [cpu_fail[ib]]  # the CPU path's very failure row (reason and message)
    assert ib not in out_idx and len(out_idx) == len(idx) - 1
    assert standin.calls == [len(j2k)]  # one batch for all codestreams
    assert (stage.n_gpu, stage.n_fallback, stage.n_failed) == (len(j2k) - 2, 1, 1)
    desc = stage.describe()
    assert desc["decoder"] == NAME and desc["cpu_fallback"] == 1 and desc["failed_after_fallback"] == 1
    for i, red in zip(out_idx, out, strict=True):
        p = files[int(i)]
        assert not isinstance(red, Codestream)
        px = red.pixels.numpy() if torch.is_tensor(red.pixels) else np.asarray(red.pixels)
        assert torch.is_tensor(red.pixels) == (p in j2k and p != refused)  # decoded by the stand-in
        st, _ = read_stored(p, target_size=64)
        want = preprocess_stored(st, CFG)
        got = finish(dataclasses.replace(red, pixels=px), CFG)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(p))
        if p == refused:
            ref = reduce_stored(st, CFG)
            assert (red.fill, red.scale, red.offset) == (ref.fill, ref.scale, ref.offset)


def _frame(p: Path) -> bytes:
    import pydicom
    from pydicom.encaps import generate_frames

    return bytes(next(generate_frames(pydicom.dcmread(p).PixelData, number_of_frames=1)))


def test_fallback_in_worker_processes(j2k_cohort: dict) -> None:
    """decode_now with workers: the CPU path in a worker process, result by value."""
    files, bad = j2k_cohort["files"], j2k_cohort["bad"]
    d = j2k_cohort["root"] / "dicom"
    good = j2k_cohort["j2k"][0]
    with _pool(d, files, "device", workers=1) as pool:
        pool.start(np.arange(0))
        task = pool.decode_now(np.array([files.index(good), files.index(bad)]))
    st, _ = read_stored(good, target_size=64)
    np.testing.assert_array_equal(task.reduced[0].pixels, reduce_stored(st, CFG).pixels)
    assert task.reduced[1] is None and len(task.failures) == 1
    assert "every decoder failed" in task.failures[0][2]
    assert task.failures[0][1] == "undecodable_pixel_data"  # the file's data, not a missing plugin


class _Stub:
    name = "stub decoder"

    def __init__(self, device: str) -> None:
        self.device = device


def _card(version: int = 4):
    class _C:
        preprocess = PreprocessConfig(image_size=64, version=version)

    return _C()


def test_plan_j2k(monkeypatch: pytest.MonkeyPatch) -> None:
    import xbmd_batch.gpu_j2k as gj
    import xbmd_batch.infer.select as sel

    card = _card()
    red = Placement("cuda", "reduced", "--preprocess-device cuda", gpu_index=1)
    p = plan_j2k(red, 0, card, "checkpoint", "torch", "cuda")
    assert p.j2k == "cpu" and "no JPEG 2000" in p.j2k_reason
    monkeypatch.setattr(gj, "status", lambda: (False, "nvImageCodec not installed"))
    p = plan_j2k(red, 3, card, "checkpoint", "torch", "cuda")
    assert (p.j2k, p.j2k_reason, p.handoff) == ("cpu", "nvImageCodec not installed", "reduced")
    monkeypatch.setattr(gj, "status", lambda: (True, "active"))
    p = plan_j2k(red, 3, card, "checkpoint", "torch", "cuda", make_decoder=_Stub)
    assert p.j2k == "nvimgcodec" and p.j2k_decoder.device == "cuda:1" and "3 JPEG 2000" in p.j2k_reason
    assert p.describe("cuda:1")["j2k"]["decoder"] == "stub decoder"

    def broken(device: str) -> None:
        raise RuntimeError("no libnvjpeg2k")

    p = plan_j2k(red, 3, card, "checkpoint", "torch", "cuda", make_decoder=broken)
    assert p.j2k == "cpu" and "self-test" in p.j2k_reason and "no libnvjpeg2k" in p.j2k_reason
    # auto that left preprocessing to the workers: JPEG 2000 on the GPU picks the device path...
    auto = Placement("auto", "image", "auto: workers")
    monkeypatch.setattr(sel, "resolve_device", lambda device, kind: ("cuda", 2, ""))
    p = plan_j2k(auto, 3, card, "onnx", "auto", "auto", make_decoder=_Stub)
    assert (p.handoff, p.gpu_index, p.j2k, p.j2k_decoder.device) == ("reduced", 2, "nvimgcodec", "cuda:2")
    assert "auto" in p.reason and "JPEG 2000" in p.reason
    # ...but not without JPEG 2000 files, with a CPU runner, a version-2 card, the Ray engine, or cpu asked
    assert plan_j2k(auto, 0, card, "onnx", "auto", "auto", make_decoder=_Stub).handoff == "image"
    assert plan_j2k(auto, 3, _card(2), "onnx", "auto", "auto", make_decoder=_Stub).handoff == "image"
    assert plan_j2k(auto, 3, card, "onnx", "auto", "auto", "ray", make_decoder=_Stub).handoff == "image"
    cpu = Placement("cpu", "image", "--preprocess-device cpu")
    p = plan_j2k(cpu, 3, card, "onnx", "auto", "auto", make_decoder=_Stub)
    assert (p.handoff, p.j2k) == ("image", "cpu") and "decode workers" in p.j2k_reason
    monkeypatch.setattr(sel, "resolve_device", lambda device, kind: ("cpu", 0, "no CUDA device"))
    p = plan_j2k(auto, 3, card, "onnx", "auto", "auto", make_decoder=_Stub)
    assert (p.handoff, p.j2k) == ("image", "cpu") and "no CUDA device" in p.j2k_reason
    # a decoder given by the caller (the tests' stand-in) is kept
    pinned = Placement("cuda", "reduced", "test", torch_device="cpu", j2k_decoder=CpuJ2KStandIn())
    p = plan_j2k(pinned, 0, card, "onnx", "auto", "auto")
    assert p.j2k == "nvimgcodec" and p.describe("cpu")["j2k"]["decoder"] == NAME


@pytest.fixture(scope="module")
def sensitive_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its last head layer scaled x150: predictions spread (SD ~0.07 g/cm2 on the cohort),
    so any difference in the model input shows in bmd_pred."""
    from xbmd_batch.checkpoint import load_model, save_checkpoint

    model, card = load_model(tiny_model)
    with torch.no_grad():
        model.head.net[-1].weight.mul_(150.0)
    d = tmp_path_factory.mktemp("sensitive_j2k")
    return save_checkpoint(d / "m.pt", model, card.model_config, card.schema, card.preprocess)


def _score(root: Path, model: Path, out: Path, **kw: object):
    from xbmd_batch.score import ScoreOptions, score_cohort

    opts = ScoreOptions(quiet=True, backend="torch", **kw)  # type: ignore[arg-type]
    return score_cohort(root / "dicom", root / "meta.csv", model, out, opts)


def _rows(out: Path, name: str, cols: list[str]) -> list[tuple]:
    import polars as pl

    return sorted(pl.read_parquet(out / name).select(cols).rows())


def test_scoring_with_gpu_j2k_plumbing_equals_the_cpu_path(
    j2k_cohort: dict, sensitive_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cohort (JPEG 2000 + uncompressed, MONOCHROME1/2, rescaled, one truncated J2K, one junk header)
    scored by the CPU path and by the GPU-J2K plumbing (stand-in decoder, reduced hand-off, torch finishing on
    the CPU, 2 decode workers, one codestream refused by the decoder -> CPU fallback): same rows, bmd within
    1e-4 g/cm2 (one definition here, see the module docstring), the same failure rows, provenance in
    run.json."""
    import polars as pl

    from xbmd_batch.score import pipeline as pipeline_mod

    root = j2k_cohort["root"]
    ref = _score(root, sensitive_model, tmp_path / "cpu", workers=0, preprocess_device="cpu")
    refused = _frame(j2k_cohort["j2k"][0])
    standin = CpuJ2KStandIn(reject=lambda f: f == refused)
    pinned = Placement("cuda", "reduced", "test: torch on cpu", torch_device="cpu", j2k_decoder=standin)
    monkeypatch.setattr(pipeline_mod, "plan_preprocess", lambda *a, **k: pinned)
    dev = _score(root, sensitive_model, tmp_path / "dev", workers=2, batch_size=4)
    assert ref.exit_code == dev.exit_code == 3  # failures: the truncated J2K and the junk header
    a = pl.read_parquet(tmp_path / "cpu" / "scores.parquet").sort("relative_path")
    b = pl.read_parquet(tmp_path / "dev" / "scores.parquet").sort("relative_path")
    assert a["relative_path"].to_list() == b["relative_path"].to_list() and a.height >= 20
    diff = np.abs(a["bmd_pred"].to_numpy() - b["bmd_pred"].to_numpy())
    assert diff.max() <= 1e-4, diff.max()
    assert a["bmd_pred"].std() > 0.03  # image-sensitive predictions: a preprocessing error would show
    cols = ["relative_path", "stage", "reason", "message"]
    assert _rows(tmp_path / "cpu", "failures.parquet", cols) == _rows(
        tmp_path / "dev", "failures.parquet", cols
    )
    n_j2k = len(j2k_cohort["j2k"])
    assert sum(standin.calls) == n_j2k and max(standin.calls) <= 4  # codestreams decoded batch by batch
    run = pl.read_json(tmp_path / "dev" / "run.json").to_dicts()[0]
    j = run["preprocess"]["j2k"]
    assert j["decoder"] == NAME
    assert (j["decoded_on_device"], j["cpu_fallback"], j["failed_after_fallback"]) == (n_j2k - 2, 1, 1)
    ref_run = pl.read_json(tmp_path / "cpu" / "run.json").to_dicts()[0]
    assert ref_run["preprocess"]["j2k"]["decoder"].startswith("cpu-reduced")
    print(f"max |delta bmd| {diff.max():.2e}, prediction SD {a['bmd_pred'].std():.3f}")


@pytest.mark.gpu
def test_scoring_with_nvimgcodec_on_cuda_equals_the_cpu_path(
    j2k_cohort: dict, sensitive_model: Path, tmp_path: Path
) -> None:
    """The same comparison with the real decoder: ``--preprocess-device cuda`` plans nvImageCodec (after the
    header pass), the truncated file fails exactly as on the CPU path, bmd within 1e-4 g/cm2."""
    import polars as pl

    from xbmd_batch.gpu_j2k import status

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    active, why = status()
    if not active:
        pytest.skip(why)
    root = j2k_cohort["root"]
    kw = {"device": "cuda", "precision": "fp32", "workers": 2}
    _score(root, sensitive_model, tmp_path / "cpu", preprocess_device="cpu", **kw)
    _score(root, sensitive_model, tmp_path / "dev", preprocess_device="cuda", batch_size=4, **kw)
    a = pl.read_parquet(tmp_path / "cpu" / "scores.parquet").sort("relative_path")
    b = pl.read_parquet(tmp_path / "dev" / "scores.parquet").sort("relative_path")
    assert a["relative_path"].to_list() == b["relative_path"].to_list()
    assert np.abs(a["bmd_pred"].to_numpy() - b["bmd_pred"].to_numpy()).max() <= 1e-4
    cols = ["relative_path", "stage", "reason", "message"]
    assert _rows(tmp_path / "cpu", "failures.parquet", cols) == _rows(
        tmp_path / "dev", "failures.parquet", cols
    )
    j = pl.read_json(tmp_path / "dev" / "run.json").to_dicts()[0]["preprocess"]["j2k"]
    assert j["decoder"].startswith("nvimgcodec") and j["decoded_on_device"] == len(j2k_cohort["j2k"]) - 1, j


class _AllFail:
    """A stage whose every codestream fails (its CPU fallback too)."""

    def resolve(self, idx, items):
        return idx[:0], [], [(int(i), "decode_error:X", "broken") for i in idx]


def test_device_batcher_books_a_batch_whose_every_codestream_failed(j2k_cohort: dict) -> None:
    from xbmd_batch.dicom_io import read_for_device
    from xbmd_batch.score.batcher import DeviceBatcher

    cs, _ = read_for_device(j2k_cohort["j2k"][0], target_size=64)
    b = DeviceBatcher(2, CFG, "cpu", j2k=_AllFail())
    (batch,) = list(b.add(np.array([7, 9]), [cs, cs]))
    assert len(batch.idx) == 0 and batch.images.shape[0] == 0  # the loop sends nothing to the runner
    assert [f[0] for f in batch.failures] == [7, 9] and b.flush() is None
