"""xbmd_batch.infer.tensorrt: engine cache keys, profiles, hit/miss/refusal with fake sidecars (no TensorRT
needed), and (GPU only) a real build + parity + runner. The fp16 graph conversion: test_onnx_fp16.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
from xbmd_batch.errors import InputError, StaleEngineError
from xbmd_batch.infer.tensorrt.device import DeviceInfo
from xbmd_batch.infer.tensorrt.engine_cache import (
    EngineCache,
    EngineSpec,
    engine_cache_key,
    verify_engine_file,
)
from xbmd_batch.modelcard import ModelCard

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")
SHA = "ab" * 32


def _card(image_size: int = 64) -> ModelCard:
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=image_size, d_model=32)
    return ModelCard(
        model_config=cfg, schema=DEFAULT_SCHEMA, preprocess=PreprocessConfig(image_size=image_size)
    )


def _spec(**kw) -> EngineSpec:
    return dataclasses.replace(EngineSpec.for_card(SHA, _card(), "fp16", opt_batch=32, max_batch=64), **kw)


# ------------------------------------------------------------------------------------------ keys, profiles


def test_key_is_stable_and_readable() -> None:
    args = (H100.gpu_name, "9.0", "10.13.0.35", SHA, "fp16", (1, 32, 64))
    key = engine_cache_key(*args)
    assert key == engine_cache_key(*args)
    assert key.startswith("nvidia-h100-80gb-hbm3-sm90-trt10-13-0-35-fp16-b1-32-64-abababab-")
    assert "/" not in key and " " not in key


@pytest.mark.parametrize(
    "i, other",
    [
        (0, "NVIDIA A100-SXM4-80GB"),
        (1, "8.0"),
        (2, "11.4.0.106"),
        (3, "cd" * 32),
        (4, "fp32"),
        (5, (1, 16, 64)),
    ],
)
def test_key_changes_when_any_field_changes(i: int, other: object) -> None:
    base = [H100.gpu_name, "9.0", "10.13.0.35", SHA, "fp16", (1, 32, 64)]
    changed = list(base)
    changed[i] = other
    assert engine_cache_key(*base) != engine_cache_key(*changed)


def test_key_sees_full_profile_shapes() -> None:
    """Two profiles with the same batches but another image size must not share an engine."""
    a = _spec().profile()
    b = dataclasses.replace(_spec(), image_size=128).profile()
    ka = engine_cache_key(H100.gpu_name, "9.0", "10.13", SHA, "fp16", a)
    kb = engine_cache_key(H100.gpu_name, "9.0", "10.13", SHA, "fp16", b)
    assert ka != kb and ka.split("-b1-32-64-")[0] == kb.split("-b1-32-64-")[0]


def test_profile_shapes() -> None:
    p = _spec().profile()
    assert p == {
        "image": ((1, 1, 64, 64), (32, 1, 64, 64), (64, 1, 64, 64)),
        "meta": ((1, 10), (32, 10), (64, 10)),
        "meta_mask": ((1, 10), (32, 10), (64, 10)),
    }
    spec = EngineSpec.for_card(SHA, _card(224), opt_batch=16)
    assert spec.max_batch == 16 and spec.profile()["image"][2] == (16, 1, 224, 224)


@pytest.mark.parametrize("mn, opt, mx", [(0, 1, 1), (1, 8, 4), (4, 2, 8)])
def test_bad_profiles_are_refused(mn: int, opt: int, mx: int) -> None:
    with pytest.raises(InputError, match="batch profile"):
        EngineSpec(SHA, min_batch=mn, opt_batch=opt, max_batch=mx)
    with pytest.raises(InputError, match="precision"):
        EngineSpec(SHA, precision="int8")


# ------------------------------------------------------------------------------------------ cache


def test_cache_miss_store_hit(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    spec = _spec()
    assert cache.lookup(spec, H100) is None
    rec = cache.store(spec, H100, b"fake engine bytes", {"parity": {"max_abs_bmd": 1e-3}})
    assert rec.built and rec.engine_path.read_bytes() == b"fake engine bytes"
    side = json.loads(rec.sidecar_path.read_text())
    assert side["gpu_name"] == H100.gpu_name and side["trt_version"] == "10.13.0.35"
    assert side["onnx_sha256"] == SHA and side["opt_batch"] == 32 and side["parity"]["max_abs_bmd"] == 1e-3
    hit = cache.lookup(spec, H100)
    assert hit is not None and not hit.built and hit.engine_path == rec.engine_path
    # another GPU or TRT version is a miss (a different key), never a wrong hit; so is a profile the engine
    # cannot run (max above its max); another opt batch within its profile is a hit (D7, test below)
    assert cache.lookup(spec, dataclasses.replace(H100, trt_version="11.4.0.106")) is None
    assert cache.lookup(dataclasses.replace(spec, max_batch=128), H100) is None
    assert cache.lookup(dataclasses.replace(spec, opt_batch=16), H100, exact=True) is None


def test_cache_refuses_mismatched_sidecar(tmp_path: Path) -> None:
    """An engine at the right key whose sidecar names another TensorRT (copied or tampered) is refused."""
    cache = EngineCache(tmp_path, onnx_path=Path("model.onnx"))
    spec = _spec()
    rec = cache.store(spec, H100, b"engine")
    side = json.loads(rec.sidecar_path.read_text())
    side["trt_version"] = "10.0.1"
    rec.sidecar_path.write_text(json.dumps(side))
    with pytest.raises(StaleEngineError, match="trt_version") as e:
        cache.lookup(spec, H100)
    assert "python -m export tensorrt model.onnx" in str(e.value) and "--cache-dir" in str(e.value)


def test_cache_refuses_corrupt_or_orphan_engine(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    spec = _spec()
    rec = cache.store(spec, H100, b"engine")
    rec.engine_path.write_bytes(b"engine, truncated")
    with pytest.raises(StaleEngineError, match="sha256"):
        cache.lookup(spec, H100)
    rec.sidecar_path.unlink()
    with pytest.raises(StaleEngineError, match="no sidecar"):
        cache.lookup(spec, H100)


def test_verify_explicit_engine_for_other_gpu(tmp_path: Path) -> None:
    rec = EngineCache(tmp_path).store(_spec(), H100, b"engine")
    a100 = DeviceInfo("NVIDIA A100-SXM4-80GB", "8.0", H100.trt_version)
    with pytest.raises(StaleEngineError, match="gpu_name.*compute_capability"):
        verify_engine_file(rec.engine_path, _spec(), a100)
    assert verify_engine_file(rec.engine_path, _spec(), H100)["key"] == rec.key


# ------------------------------------------------------------------------------------------ fp16 graph


def _carded_onnx(tmp_path: Path) -> Path:
    """A one-node ONNX file with the card embedded (enough for cache keys; TensorRT never parses it here)."""
    from xbmd_batch.onnx_card import embed_card

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "t", [x], [y])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)  # D5
    embed_card(m, _card())
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    return path


def test_cli_without_tensorrt_exits_3(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    from export.__main__ import main

    path = _carded_onnx(tmp_path)
    assert main(["tensorrt", str(path), "--cache-dir", str(tmp_path / "c")]) == 3


def test_get_or_build_takes_parity_feeds_from_the_caller(tmp_path: Path, monkeypatch) -> None:
    """A cache hit needs no parity inputs (a feeds callable is not even called); a miss without them is
    refused instead of rendering a synthetic cohort inside the inference layer. No TensorRT needed: the
    device is faked and nothing is built."""
    from xbmd_batch.infer.model_file import open_model
    from xbmd_batch.infer.tensorrt.builder import get_or_build_engine

    monkeypatch.setattr(DeviceInfo, "current", classmethod(lambda cls, device_id=0: H100))
    model = open_model(_carded_onnx(tmp_path))
    cache = tmp_path / "engines"
    spec = EngineSpec.for_card(model.sha256, model.card, "fp16", opt_batch=8, max_batch=16)
    stored = EngineCache(cache).store(spec, H100, b"engine bytes")

    def never(card: ModelCard, n: int) -> dict:
        raise AssertionError("parity feeds made on a cache hit")

    hit = get_or_build_engine(model, opt_batch=8, max_batch=16, cache_dir=cache, parity_feeds=never)
    assert not hit.built and hit.engine_path == stored.engine_path
    # (1, 4, 16) would be served by the 1/8/16 engine (D7: its profile covers it); 32 is beyond it: a miss
    with pytest.raises(InputError, match="no parity inputs"):
        get_or_build_engine(model, opt_batch=4, max_batch=32, cache_dir=cache)


# ------------------------------------------------------------------------------------------ real GPU


@pytest.mark.gpu
def test_real_engine_build_parity_and_runner(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (xbmd-batch[tensorrt])")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from export.onnx_export import export_onnx
    from xbmd_batch.checkpoint import save_checkpoint
    from xbmd_batch.infer.compare import compare_runners
    from xbmd_batch.infer.model_file import open_model
    from xbmd_batch.infer.ort_runner import OrtRunner
    from xbmd_batch.infer.tensorrt.builder import get_or_build_engine
    from xbmd_batch.infer.trt_runner import TensorRTRunner
    from xbmd_batch.model import build_model
    from xbmd_batch.parity_feeds import make_reference_feeds

    torch.manual_seed(0)
    card = _card()
    ckpt = save_checkpoint(
        tmp_path / "m.pt", build_model(card.model_config), card.model_config, card.schema, card.preprocess
    )
    onnx_path = export_onnx(ckpt, tmp_path / "m.onnx").path
    cache = tmp_path / "engines"
    with pytest.raises(InputError, match="no parity inputs"):
        get_or_build_engine(onnx_path, opt_batch=8, max_batch=16, cache_dir=cache)
    rec = get_or_build_engine(
        onnx_path, opt_batch=8, max_batch=16, cache_dir=cache, parity_feeds=make_reference_feeds
    )
    assert rec.built and rec.meta["parity"]["max_abs_bmd"] <= 5e-3
    assert any(p.name.startswith("timing-") for p in cache.iterdir())
    again = get_or_build_engine(onnx_path, opt_batch=8, max_batch=16, cache_dir=cache)
    assert not again.built and again.engine_path == rec.engine_path
    feeds = make_reference_feeds(open_model(onnx_path).card, n=37)
    with (
        OrtRunner(onnx_path) as ref,
        TensorRTRunner(onnx_path, batch_size=8, max_batch=16, engine_cache_dir=cache) as t,
    ):
        res = compare_runners(ref, t, feeds, (1, 5, 16, 37))  # 37 > max batch: split into 16 + 16 + 5
        assert res.worst("bmd") <= 5e-3
        assert t.engine_sha256 == rec.meta["engine_sha256"]
