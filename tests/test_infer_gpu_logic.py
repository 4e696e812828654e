"""GPU-path logic that runs on CPU with fakes (issue 12): D4 (no onnxruntime-TensorRT provider), D6 (--device
cuda:N honoured), D7 (a cached engine with a covering profile is reused; wide builds), the engine-cache lock,
parity batches inside the profile (--min-batch), padding, `auto` falling back on any GPU failure, the sticky
CUDA error classifier, "fp32" meaning IEEE fp32 everywhere, and onnxruntime IOBinding (CPU provider)."""

from __future__ import annotations

import dataclasses
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
from xbmd_batch.errors import DeviceError, InputError, ModelFileError, is_device_error
from xbmd_batch.infer import select
from xbmd_batch.infer.base import pad_batch
from xbmd_batch.infer.tensorrt.builder import build_spec, parity_batches
from xbmd_batch.infer.tensorrt.device import DeviceInfo
from xbmd_batch.infer.tensorrt.engine_cache import EngineCache, EngineSpec, profile_covers
from xbmd_batch.modelcard import ModelCard

H200 = DeviceInfo("NVIDIA H200", "9.0", "11.4.0.106")
SHA = "cd" * 32


def _card() -> ModelCard:
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=64, d_model=32)
    return ModelCard(model_config=cfg, schema=DEFAULT_SCHEMA, preprocess=PreprocessConfig(image_size=64))


def _spec(mn: int = 1, opt: int = 32, mx: int = 64, precision: str = "fp16") -> EngineSpec:
    return EngineSpec.for_card(SHA, _card(), precision, opt_batch=opt, max_batch=mx, min_batch=mn)


# ------------------------------------------------------------------------------ D4: no ORT TensorRT provider


def test_onnxruntime_tensorrt_provider_is_refused_up_front(tiny_onnx: Path) -> None:
    """onnxruntime-gpu 1.31.1's TensorRT provider links libnvinfer.so.10 while the tensorrt extra installs 11:
    it could never load. The option is gone (refused with the reason) rather than dead code."""
    from xbmd_batch.defaults import ORT_PROVIDERS
    from xbmd_batch.infer.ort_runner import OrtRunner, ort_provider_chain

    assert "tensorrt" not in ORT_PROVIDERS
    with pytest.raises(InputError, match="TensorRT 10.*--backend tensorrt"):
        OrtRunner(tiny_onnx, provider="tensorrt")
    with pytest.raises(InputError, match="libnvinfer.so.10"):
        ort_provider_chain("tensorrt")
    names = [p[0] if isinstance(p, tuple) else p for p in ort_provider_chain("cuda")]
    assert names == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# ------------------------------------------------------------------------------ D6: --device cuda:N


class _Fake:
    """Stands in for a runner class: records its arguments, loads without a GPU."""

    made: list[tuple[str, tuple, dict]] = []

    def __init__(self, *args: Any, **kw: Any) -> None:
        type(self).made.append((type(self).__name__, args, kw))
        self.backend, self.precision, self.reason = type(self).__name__, "fp32", ""
        self.name = type(self).__name__

    def activate(self) -> None:
        pass


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, n: int = 2) -> None:
    monkeypatch.setattr(select, "_cuda_available", lambda: True)
    monkeypatch.setattr(select, "_cuda_device_count", lambda: n)
    monkeypatch.setattr(select, "_cuda_name", lambda i=0: f"Fake GPU {i}")
    monkeypatch.setattr(select, "_tensorrt_version", lambda: "11.4.0.106")
    monkeypatch.setattr(select, "_ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _Fake.made.clear()
    for name in ("TorchRunner", "OrtRunner", "TensorRTRunner"):
        monkeypatch.setattr(select, name, type(name, (_Fake,), {}))


def test_device_cuda_n_reaches_every_backend(monkeypatch, tiny_model: Path, tiny_onnx: Path) -> None:
    _fake_gpus(monkeypatch)
    select.open_runner(tiny_model, backend="torch", device="cuda:1")
    select.open_runner(tiny_onnx, backend="onnxruntime", device="cuda:1")
    select.open_runner(tiny_onnx, backend="tensorrt", device="cuda:1")
    r = select.open_runner(tiny_onnx, backend="auto", device="cuda:1")
    made = {(n, i): kw for i, (n, _a, kw) in enumerate(_Fake.made)}
    assert made[("TorchRunner", 0)]["device"] == "cuda:1"
    assert made[("OrtRunner", 1)]["device_id"] == 1 and made[("OrtRunner", 1)]["provider"] == "cuda"
    assert made[("TensorRTRunner", 2)]["device_id"] == 1
    assert made[("TensorRTRunner", 3)]["device_id"] == 1 and "Fake GPU 1 (cuda:1)" in r.reason


def test_device_cuda_n_is_checked(monkeypatch, tiny_onnx: Path) -> None:
    _fake_gpus(monkeypatch, n=2)
    with pytest.raises(InputError, match="has 2 CUDA device"):
        select.open_runner(tiny_onnx, device="cuda:2")
    with pytest.raises(InputError, match="cuda:N"):
        select.open_runner(tiny_onnx, device="gpu1")
    assert select.parse_device("cuda:3") == ("cuda", 3) and select.parse_device("cpu") == ("cpu", 0)


# ---------------------------------------------------------------------- auto falls back on GPU failure


@pytest.mark.parametrize(
    "error",
    [
        ModelFileError("model.onnx: TensorRT cannot parse the ONNX graph: duplicate tensor name"),
        TypeError("set_timing_cache(): incompatible function arguments"),
        PermissionError("[Errno 13] Permission denied: '/root/.cache/xbmd_batch/engines'"),
    ],
)
def test_auto_falls_back_from_tensorrt_on_any_failure(monkeypatch, tiny_onnx: Path, error: Exception) -> None:
    """A TensorRT parse/IO error (a ModelFileError), or an exception type the old code did not catch, must
    move `auto` on to onnxruntime-CUDA with the reason, not end the run."""
    _fake_gpus(monkeypatch)

    class BrokenTRT(_Fake):
        def activate(self) -> None:
            raise error

    monkeypatch.setattr(select, "TensorRTRunner", BrokenTRT)
    r = select.open_runner(tiny_onnx, backend="auto", device="auto")
    assert r.backend == "OrtRunner"
    assert "onnxruntime CUDA provider" in r.reason and type(error).__name__ in r.reason


def test_auto_still_raises_for_a_bad_file_on_cpu(monkeypatch, tiny_onnx: Path) -> None:
    monkeypatch.setattr(select, "_cuda_available", lambda: False)

    class BadFile(_Fake):
        def activate(self) -> None:
            raise ModelFileError("m.onnx: onnxruntime cannot load it")

    monkeypatch.setattr(select, "OrtRunner", BadFile)
    with pytest.raises(ModelFileError):
        select.open_runner(tiny_onnx, backend="auto", device="cpu")


# ------------------------------------------------------------------------------ D7: engine reuse


def test_documented_export_engine_serves_score(tmp_path: Path) -> None:
    """`python -m export tensorrt --opt-batch 32 --max-batch 64` then `score -b 32` (need 1..32), `-b 64`,
    `-b 16`: one engine; `-b 128` needs more than it covers."""
    cache = EngineCache(tmp_path)
    built = cache.store(_spec(1, 32, 64), H200, b"engine 1/32/64")
    for b in (32, 64, 16):
        need, _ = build_spec(_card(), SHA, "fp16", b, None, 1)
        hit = cache.lookup(need, H200)
        assert hit is not None and hit.engine_path == built.engine_path and not hit.built
    need, _ = build_spec(_card(), SHA, "fp16", 128, None, 1)
    assert cache.lookup(need, H200) is None
    assert cache.lookup(_spec(1, 32, 64, precision="fp32"), H200) is None  # precision is part of identity
    assert cache.lookup(_spec(), dataclasses.replace(H200, gpu_name="NVIDIA H100")) is None


def test_lookup_prefers_same_opt_then_smallest_max_and_skips_broken(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    wide = cache.store(_spec(1, 128, 256), H200, b"wide")
    same_opt = cache.store(_spec(1, 32, 256), H200, b"same opt")
    assert cache.lookup(_spec(1, 32, 32), H200).engine_path == same_opt.engine_path
    same_opt.engine_path.write_bytes(b"truncated")  # fails its sha256: skipped, the other one serves
    assert cache.lookup(_spec(1, 32, 32), H200).engine_path == wide.engine_path


def test_wide_profile_for_builds_and_explicit_max_kept() -> None:
    from xbmd_batch.defaults import TRT_WIDE_MAX_BATCH

    need, build = build_spec(_card(), SHA, "fp16", 32, None, 1)
    assert (need.min_batch, need.opt_batch, need.max_batch) == (1, 32, 32)
    assert (build.opt_batch, build.max_batch) == (32, TRT_WIDE_MAX_BATCH) == (32, 256)
    _, explicit = build_spec(_card(), SHA, "fp16", 32, 64, 1)
    assert explicit.max_batch == 64
    _, big = build_spec(_card(), SHA, "fp16", 512, None, 1)
    assert big.max_batch == 512


def test_profile_covers() -> None:
    p = _spec(1, 32, 64).profile()

    def norm(s: EngineSpec) -> dict:
        return {k: [list(x) for x in v] for k, v in s.profile().items()}

    assert profile_covers(norm(_spec(1, 32, 64)), norm(_spec(1, 8, 8)))
    assert not profile_covers(norm(_spec(4, 32, 64)), norm(_spec(1, 8, 8)))  # min too high
    assert not profile_covers(norm(_spec(1, 32, 64)), norm(_spec(1, 32, 65)))
    assert not profile_covers(None, norm(_spec()))
    assert set(p) == set(norm(_spec()))


# ------------------------------------------------------------------------------ lock: build once


def _waiting_lookup(root: str, q: Any) -> None:
    cache = EngineCache(Path(root))
    rec = cache.lookup(_spec(1, 32, 64), H200)  # blocks while the parent holds the build lock
    q.put(None if rec is None else (rec.built, rec.meta["engine_sha256"]))


def test_lookup_waits_for_a_build_in_progress(tmp_path: Path) -> None:
    """While one process holds the build lock (lookup -> build -> store), another process's lookup waits and
    then sees the finished pair, never an engine beside another engine's sidecar."""
    import hashlib

    builder = EngineCache(tmp_path)
    spec = _spec(1, 32, 64)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with builder.lock(spec, H200):
        p = ctx.Process(target=_waiting_lookup, args=(str(tmp_path), q))
        p.start()
        builder.store(spec, H200, b"engine built while the other process waited")
    p.join(timeout=120)
    got = q.get(timeout=5)
    assert got == (False, hashlib.sha256(b"engine built while the other process waited").hexdigest())


# ------------------------------------------------------------------------------ --min-batch, padding


def test_parity_batches_stay_inside_the_profile() -> None:
    assert parity_batches(_spec(1, 32, 64), 64) == (1, 3, 32, 64)
    assert parity_batches(_spec(8, 32, 64), 64) == (8, 32, 64)  # was (1, 3, ...): set_input_shape failed
    assert parity_batches(_spec(8, 8, 8), 100) == (8,)
    assert parity_batches(_spec(1, 32, 64), 20) == (1, 3)
    with pytest.raises(InputError, match="min-batch"):
        parity_batches(_spec(8, 32, 64), 5)


def test_pad_batch_repeats_last_row() -> None:
    x = {"a": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.ones((3,), np.float32)}
    p = pad_batch(x, 5)
    assert p["a"].shape == (5, 2) and (p["a"][3:] == x["a"][2]).all() and p["b"].shape == (5,)
    assert pad_batch(x, 3)["a"] is x["a"]
    with pytest.raises(ValueError):
        pad_batch(x, 2)


# ------------------------------------------------------------------------------ sticky CUDA errors


@pytest.mark.parametrize(
    ("message", "sticky"),
    [
        ("CUDA error: an illegal memory access was encountered", True),
        ("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was encountered", True),
        ("CUDA error: unspecified launch failure", True),
        ("CUDA error: device-side assert triggered", True),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
        ("image has shape [1, 1, 32, 32], expected [B, 1, 64, 64]", False),
    ],
)
def test_is_device_error(message: str, sticky: bool) -> None:
    assert is_device_error(RuntimeError(message)) is sticky
    assert is_device_error(DeviceError("x"))


def test_sticky_cuda_error_stops_score_with_exit_5(
    monkeypatch, tmp_path: Path, cohort_session, tiny_model
) -> None:
    """After an illegal-address error every retry fails too: score must stop (exit 5, clear message, rows
    already scored kept) instead of writing the rest of the cohort as inference_error rows and exiting 3."""
    import polars as pl
    from typer.testing import CliRunner

    from xbmd_batch.cli import app
    from xbmd_batch.infer.torch_runner import TorchRunner

    calls = {"n": 0}
    real = TorchRunner._infer

    def flaky(self, feeds):  # first batch fine, then the GPU "fails"
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, feeds)

    monkeypatch.setattr(TorchRunner, "_infer", flaky)
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        ["score", str(cohort_session / "dicom"), str(cohort_session / "meta.csv"), "-m", str(tiny_model),
         "-o", str(out), "--backend", "torch", "--device", "cpu", "-b", "2", "--workers", "0",
         "--chunk-size", "2", "-q"],
    )  # fmt: skip
    assert r.exit_code == 5, r.output
    assert "the GPU failed" in r.output and "rerun the same command to resume" in r.output
    parts = sorted((out / "parts").glob("*.parquet"))
    assert parts, "the first batch's rows are kept"
    rows = pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")
    assert calls["n"] == 2  # no per-image retries after a sticky error
    assert rows.height >= 2


# ------------------------------------------------------------------------------ fp32 means fp32


def test_fp32_is_ieee_on_every_backend() -> None:
    """TensorRT clears TF32 for fp32 engines; onnxruntime-CUDA gets use_tf32=0; torch switches cuDNN/matmul to
    "ieee" during fp32 inference and restores the previous setting."""
    import torch

    from xbmd_batch.infer.ort_runner import ort_provider_chain
    from xbmd_batch.infer.torch_runner import ieee_fp32

    cuda_opts = dict(ort_provider_chain("cuda")[0][1])
    assert cuda_opts["use_tf32"] == "0"
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    with ieee_fp32(torch):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before


# ------------------------------------------------------------------------------ onnxruntime IOBinding


def test_ort_iobinding_path_matches_plain_run(tiny_onnx: Path) -> None:
    """The CUDA provider's IOBinding path (preallocated fixed-shape in/out values, batches padded to the
    batch size) exercised with the CPU provider: same numbers as session.run at full, partial and split
    batches."""
    from xbmd_batch.infer.ort_runner import OrtRunner
    from xbmd_batch.parity_feeds import make_reference_feeds

    with OrtRunner(tiny_onnx) as plain, OrtRunner(tiny_onnx, batch_size=4, use_iobinding=True) as bound:
        feeds = make_reference_feeds(plain.card, n=11)
        assert bound.max_batch == 4 and bound._binding is not None
        for b in (4, 3, 1, 11):  # 11 = 4 + 4 + 3 (split, last one padded)
            sub = {k: v[:b] for k, v in feeds.items()}
            ref, got = plain.infer(sub), bound.infer(sub)
            for k in ref:
                assert got[k].shape == ref[k].shape
                np.testing.assert_allclose(got[k], ref[k], atol=1e-5)


def test_runners_take_torch_tensor_feeds_where_they_lie(tiny_model: Path, tiny_onnx: Path) -> None:
    """On-device preprocessing hands runners a torch tensor: torch and onnxruntime IOBinding read it where it
    lies (bound by pointer for IOBinding; exercised here on the CPU provider and CPU torch), a plain
    onnxruntime session gets a host copy; the numbers equal the numpy feeds'. A numpy call after a tensor
    call rebinds the preallocated input (no stale pointer)."""
    import torch

    from xbmd_batch.infer.ort_runner import OrtRunner
    from xbmd_batch.infer.torch_runner import TorchRunner
    from xbmd_batch.parity_feeds import make_reference_feeds

    with (
        TorchRunner(tiny_model) as t,
        OrtRunner(tiny_onnx) as plain,
        OrtRunner(tiny_onnx, batch_size=4, use_iobinding=True) as bound,
    ):
        feeds = make_reference_feeds(plain.card, n=7)
        img = torch.from_numpy(feeds["image"].copy())
        assert t.takes_tensor(img) and bound.takes_tensor(img) and not plain.takes_tensor(img)
        for r in (t, plain, bound):
            for b in (3, 7):  # bound: 3 is padded on the tensor, 7 = 4 + 3 (split)
                sub = {k: v[:b] for k, v in feeds.items()}
                ref = r.infer(sub)
                got = r.infer({**sub, "image": img[:b]})
                again = r.infer(sub)
                for k in ref:
                    np.testing.assert_allclose(got[k], ref[k], atol=1e-5, err_msg=f"{r.name} b={b} {k}")
                    np.testing.assert_allclose(again[k], ref[k], atol=1e-6)
        assert not bound.takes_tensor(img.to(torch.float64).to("meta"))


# ------------------------------------------------------------------------------ on a GPU (skip here)


def _n_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# skipif (not a skip inside the test): the fixtures (an ONNX export) are not built on a CPU box
needs_gpu = pytest.mark.skipif(_n_gpus() < 1, reason="no CUDA device")


@pytest.mark.gpu
@needs_gpu
def test_trt_min_batch_padding_and_overlapped_batches(tmp_path: Path, tiny_onnx: Path) -> None:
    """--min-batch 2 engine: batch 1 is padded, 21 rows run as 8+8+5 with two batches in flight; all agree
    with onnxruntime-CPU on the fp32 graph."""
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (xbmd-batch[tensorrt])")
    from xbmd_batch.infer.compare import compare_runners
    from xbmd_batch.infer.ort_runner import OrtRunner
    from xbmd_batch.infer.trt_runner import TensorRTRunner
    from xbmd_batch.parity_feeds import make_reference_feeds

    with (
        OrtRunner(tiny_onnx) as ref,
        TensorRTRunner(
            tiny_onnx,
            precision="fp32",
            batch_size=4,
            max_batch=8,
            min_batch=2,
            engine_cache_dir=tmp_path,
            parity_feeds=make_reference_feeds,
        ) as t,
    ):
        feeds = make_reference_feeds(ref.card, n=21)
        res = compare_runners(ref, t, feeds, (1, 5, 8, 21))
        assert max(v["max_abs_bmd"] for v in res.batches.values()) <= 5e-3
        assert t.max_batch == 8
        # a CUDA tensor image (on-device preprocessing) is bound by its own address, also when padded to
        # the profile's min (1 row) and split with two batches in flight (21 rows)
        import torch

        img = torch.from_numpy(feeds["image"]).to("cuda")
        assert t.takes_tensor(img)
        for b in (1, 21):
            sub = {k: v[:b] for k, v in feeds.items()}
            want, got = t.infer(sub), t.infer({**sub, "image": img[:b]})
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_torch_fp32_runs_without_tf32() -> None:
    import torch

    from xbmd_batch.infer.torch_runner import ieee_fp32

    seen = []
    conv = torch.nn.Conv2d(1, 1, 3).cuda()
    conv.register_forward_hook(lambda *_: seen.append(torch.backends.cudnn.conv.fp32_precision))
    with ieee_fp32(torch):
        conv(torch.randn(1, 1, 8, 8, device="cuda"))
    assert seen == ["ieee"]


@pytest.mark.gpu
@pytest.mark.skipif(_n_gpus() < 2, reason="needs two CUDA devices")
def test_device_index_is_honoured_on_a_second_gpu(tiny_model: Path) -> None:
    import torch

    r = select.open_runner(tiny_model, backend="torch", device="cuda:1", precision="fp32")
    with r:
        assert next(r._fwd.parameters()).device == torch.device("cuda", 1)
