"""xbmd_batch.infer: torch and onnxruntime agree through the one protocol (base, torch_runner, ort_runner,
compare); partial batches; open_runner's choice (select)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import torch_to_onnx
from xbmd_batch.checkpoint import load_model, save_checkpoint
from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
from xbmd_batch.errors import InputError, ModelFileError
from xbmd_batch.infer.base import Runner, validate_feeds
from xbmd_batch.infer.compare import compare_runners
from xbmd_batch.infer.model_file import open_model
from xbmd_batch.infer.ort_runner import OrtRunner
from xbmd_batch.infer.select import open_runner
from xbmd_batch.infer.torch_runner import TorchRunner
from xbmd_batch.model import build_model
from xbmd_batch.onnx_card import embed_card
from xbmd_batch.parity_feeds import make_reference_feeds

pytest.importorskip("onnxruntime", reason="onnxruntime (CPU) is needed for the ONNX runner")

SIZE = 64


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random XAttn-BMD checkpoint and its ONNX export (card embedded; parity is test_export's job)."""
    d = tmp_path_factory.mktemp("runners")
    torch.manual_seed(0)
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=SIZE, d_model=32)
    ckpt = save_checkpoint(
        d / "m.pt", build_model(cfg), cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=SIZE)
    )
    model, card = load_model(ckpt)
    proto, _, _ = torch_to_onnx(model, card)
    embed_card(proto, card)
    onnx.save(proto, str(d / "m.onnx"))
    return ckpt, d / "m.onnx"


@pytest.fixture(scope="module")
def feeds(model_files) -> dict[str, np.ndarray]:
    _, card = load_model(model_files[0])
    return make_reference_feeds(card, n=32)


def test_torch_and_ort_agree_at_full_and_partial_batches(model_files, feeds) -> None:
    ckpt, onnx_path = model_files
    with TorchRunner(ckpt) as t, OrtRunner(onnx_path) as o:
        assert isinstance(t, Runner) and isinstance(o, Runner)
        assert (t.backend, t.device, t.precision) == ("torch", "cpu", "fp32")
        assert (o.backend, o.device, o.precision) == ("onnxruntime", "cpu", "fp32")
        assert t.has_attention and o.has_attention and t.card == o.card
        res = compare_runners(t, o, feeds, (1, 7, 32))
        assert (res.reference, res.candidate) == ("torch-cpu-fp32", "onnxruntime-cpu-fp32")
        for b, d in res.batches.items():
            assert d["max_abs_bmd"] <= 1e-4, (b, d)
            assert d["max_abs_field_attention"] <= 1e-4, (b, d)
        out = o.infer({k: v[:7] for k, v in feeds.items()})
        assert out["bmd"].shape == (7,) and out["field_attention"].shape == (7, 10)
        assert out["bmd"].dtype == np.float32
        np.testing.assert_allclose(out["field_attention"].sum(1), 1.0, atol=1e-5)
    assert o.session is None  # the context manager released the session


def test_chunking_and_empty_batch(model_files, feeds) -> None:
    ckpt, _ = model_files
    model, card = load_model(ckpt)
    with TorchRunner(model, card, max_batch=4) as chunked, TorchRunner(model, card) as whole:
        a, b = (
            chunked.infer({k: v[:10] for k, v in feeds.items()}),
            whole.infer({k: v[:10] for k, v in feeds.items()}),
        )
        np.testing.assert_allclose(a["bmd"], b["bmd"], atol=1e-6)
        empty = chunked.infer({k: v[:0] for k, v in feeds.items()})
        assert empty["bmd"].shape == (0,) and empty["field_attention"].shape == (0, 10)


def test_feed_validation(model_files, feeds) -> None:
    _, card = load_model(model_files[0])
    with pytest.raises(InputError, match="missing"):
        validate_feeds({"image": feeds["image"]}, card)
    with pytest.raises(InputError, match="shape"):
        validate_feeds({**feeds, "image": feeds["image"][:, :, :32]}, card)
    with pytest.raises(InputError, match="batch sizes differ"):
        validate_feeds({**feeds, "meta": feeds["meta"][:3]}, card)
    ok = validate_feeds({k: v.astype(np.float64) for k, v in feeds.items()}, card)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in ok.values())


def test_open_runner_auto_picks_ort_cpu_with_reason(model_files) -> None:
    ckpt, onnx_path = model_files
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only choice")
    with open_runner(onnx_path) as r:
        assert r.name == "onnxruntime-cpu-fp32"
        assert "onnxruntime on CPU" in r.reason and "no CUDA" in r.reason
    with open_runner(ckpt) as r:
        assert r.name == "torch-cpu-fp32" and "torch on CPU" in r.reason
    with open_runner(onnx_path, backend="onnxruntime", device="cpu") as r:
        assert "requested" in r.reason


def test_open_runner_refusals(tmp_path: Path, model_files) -> None:
    ckpt, onnx_path = model_files
    with pytest.raises(InputError, match="export onnx"):
        open_runner(ckpt, backend="onnxruntime")
    with pytest.raises(InputError, match="checkpoint"):
        open_runner(onnx_path, backend="torch")
    with pytest.raises(InputError, match="unknown backend"):
        open_runner(onnx_path, backend="openvino")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            open_runner(onnx_path, device="cuda")
        with pytest.raises(InputError, match="CUDA"):
            open_runner(onnx_path, backend="tensorrt", device="cpu")
    junk = tmp_path / "model.onnx"
    junk.write_text("definitely not protobuf")
    with pytest.raises(ModelFileError, match="model.onnx"):
        open_runner(junk)
    assert open_model(ckpt).kind == "checkpoint" and open_model(onnx_path).kind == "onnx"


def test_ort_runner_refuses_missing_provider(model_files) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    with pytest.raises(InputError, match="CUDAExecutionProvider"):
        OrtRunner(model_files[1], provider="cuda").activate()
    with pytest.raises(InputError, match="fp16"):
        OrtRunner(model_files[1], precision="fp16")


@pytest.mark.gpu
def test_cuda_runners_agree(model_files, feeds) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ckpt, onnx_path = model_files
    img = torch.from_numpy(feeds["image"]).to("cuda")  # on-device preprocessing's feed
    with TorchRunner(ckpt) as ref, TorchRunner(ckpt, device="cuda", precision="fp16") as gpu:
        res = compare_runners(ref, gpu, feeds, (1, 7, 32))
        assert res.worst("bmd") <= 5e-3
        assert gpu.takes_tensor(img)
        want = gpu.infer(feeds)
        got = gpu.infer({**feeds, "image": img})
        np.testing.assert_allclose(got["bmd"], want["bmd"], atol=1e-5)
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        with TorchRunner(ckpt) as ref, OrtRunner(onnx_path, provider="cuda") as o:
            res = compare_runners(ref, o, feeds, (1, 7, 32))
            assert res.worst("bmd") <= 1e-3
            assert o.takes_tensor(img)  # bound by pointer (IOBinding)
            for b in (7, 32):
                sub = {k: v[:b] for k, v in feeds.items()}
                want, got = o.infer(sub), o.infer({**sub, "image": img[:b]})
                np.testing.assert_allclose(got["bmd"], want["bmd"], atol=1e-5)
