"""Building TensorRT engines: one explicit profile, a parity-gated fp16 retry, and ``get_or_build_engine``.

Precision. TensorRT 10 builds "weakly typed" networks: ``BuilderFlag.FP16`` lets it pick fp16 kernels per
layer, and ``OBEY_PRECISION_CONSTRAINTS`` + ``layer.precision = float32`` pins LayerNorm / Softmax / Reduce
layers to fp32. TensorRT 11 removed weak typing (every network is strongly typed; the FP16 flag is gone), so
there the ONNX graph itself must be fp16: we convert it with ``xbmd_batch.onnx_fp16`` (I/O stay fp32),
leaving the same op types in fp32 on the retry. Either way the first build is plain fp16 and the retry with
fp32 normalisation layers happens only when parity against onnxruntime exceeds the tolerance.

Parity inputs come from the caller (``score`` and ``python -m export tensorrt`` pass
``xbmd_batch.parity_feeds``); nothing here renders data. ``python -m export tensorrt`` and ``score`` call
the same ``get_or_build_engine``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xbmd_batch.defaults import DEFAULT_BATCH_SIZE, TRT_WIDE_MAX_BATCH
from xbmd_batch.errors import InputError, ModelFileError, XbmdError
from xbmd_batch.fsutil import atomic_write_bytes
from xbmd_batch.infer.base import Feeds
from xbmd_batch.infer.compare import compare_runners
from xbmd_batch.infer.model_file import ModelFile, open_model
from xbmd_batch.infer.ort_runner import OrtRunner
from xbmd_batch.infer.tensorrt.device import (
    DeviceInfo,
    import_tensorrt,
    import_torch_cuda,
    is_strongly_typed_only,
)
from xbmd_batch.infer.tensorrt.engine_cache import (
    EngineCache,
    EngineRecord,
    EngineSpec,
    Log,
    default_cache_dir,
)
from xbmd_batch.infer.tensorrt.executor import EngineRunner

if TYPE_CHECKING:
    from xbmd_batch.modelcard import ModelCard

DEFAULT_TOLERANCE = 5e-3  # g/cm^2, max |delta BMD| of the engine against onnxruntime fp32
# ONNX op types kept in fp32 on the retry (strongly typed path) and the matching TensorRT layer types.
FP32_ONNX_OPS = ("LayerNormalization", "Softmax", "ReduceMean")
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")

FeedsFactory = Callable[["ModelCard", int], Feeds]


def build_engine(
    model: ModelFile | str | os.PathLike[str],
    spec: EngineSpec,
    timing_cache_path: str | os.PathLike[str] | None = None,
    *,
    keep_fp32_layers: bool = False,
    workspace_gib: float = 4.0,
    log: Log | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Build a serialized engine with one explicit profile; return (engine bytes, sidecar build notes).

    The timing cache (per GPU + TensorRT version) is loaded before and saved after the build, so rebuilding
    for another profile or precision reuses the kernel timings.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    trt = import_tensorrt()
    import_torch_cuda()
    model = open_model(model)
    onnx_path = model.path
    log = log or (lambda _m: None)
    strongly_typed = is_strongly_typed_only(trt)
    t0 = time.perf_counter()

    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)  # the converter below must not touch the opened file's graph
    load_external_data_for_model(proto, os.fspath(onnx_path.parent))  # no-op for a single-file model
    if spec.precision == "fp16" and strongly_typed:
        from xbmd_batch.onnx_fp16 import to_fp16_onnx

        proto = to_fp16_onnx(proto, FP32_ONNX_OPS if keep_fp32_layers else ())
    model_bytes = proto.SerializeToString()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # ignored (always on) in TRT 11
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ModelFileError(f"{onnx_path}: TensorRT cannot parse the ONNX graph: {'; '.join(errors)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    shapes = spec.profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise ModelFileError(f"{onnx_path}: unexpected network input {name!r} (expected {list(shapes)})")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)

    fp32_layers: list[str] = []
    if spec.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # "fp32" means fp32: TF32 matmuls drift by ~1e-3 relative
    elif not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        if keep_fp32_layers:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            wanted = {getattr(trt.LayerType, t) for t in FP32_LAYER_TYPES if hasattr(trt.LayerType, t)}
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if layer.type in wanted:
                    layer.precision = trt.float32
                    for j in range(layer.num_outputs):
                        layer.set_output_type(j, trt.float32)
                    fp32_layers.append(layer.name)
    elif keep_fp32_layers:
        fp32_layers = [n.name for n in proto.graph.node if n.op_type in FP32_ONNX_OPS]

    cache_bytes = b""
    if timing_cache_path and Path(timing_cache_path).is_file():
        cache_bytes = Path(timing_cache_path).read_bytes()
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    log(
        f"building TensorRT {trt.__version__} engine ({spec.precision}, "
        f"{'strongly' if strongly_typed else 'weakly'} typed, batch {spec.min_batch}/{spec.opt_batch}/"
        f"{spec.max_batch}{', LayerNorm/Softmax/Reduce in fp32' if keep_fp32_layers else ''})"
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise XbmdError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    if timing_cache_path:
        Path(timing_cache_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(timing_cache_path), bytes(config.get_timing_cache().serialize()))
    notes = {
        "typing": "strongly" if strongly_typed else "weakly",
        "fp32_layers": len(fp32_layers),
        "keep_fp32_layers": keep_fp32_layers,
        "build_time_s": round(time.perf_counter() - t0, 2),
    }
    return bytes(serialized), notes


def _engine_parity(
    model: ModelFile,
    engine_path: Path,
    precision: str,
    feeds: Feeds,
    batches: tuple[int, ...],
    device_id: int,
) -> dict[str, Any]:
    """The candidate engine vs onnxruntime-CPU running the ONNX graph, on the same feeds, per batch size."""
    card = model.card
    with (
        OrtRunner(model, provider="cpu") as ref,
        EngineRunner(engine_path, card, precision=precision, model=model, device_id=device_id) as cand,
    ):
        cmp = compare_runners(ref, cand, feeds, batches)
    worst = cmp.worst(card.output_names[0])
    return {"reference": cmp.reference, "batches": cmp.batches, "max_abs_bmd": worst}


def parity_batches(spec: EngineSpec, n_avail: int) -> tuple[int, ...]:
    """Batch sizes the parity check runs: 1, 3, opt and max, clamped into the profile's [min, max] (a
    ``--min-batch 8`` engine cannot run batch 1) and to the rows available."""
    want = {max(spec.min_batch, min(b, spec.max_batch)) for b in (1, 3, spec.opt_batch, spec.max_batch)}
    got = tuple(sorted(b for b in want if b <= n_avail))
    if got:
        return got
    if n_avail < spec.min_batch:
        raise InputError(f"parity needs at least {spec.min_batch} input rows (--min-batch), got {n_avail}")
    return (n_avail,)


def build_spec(
    card: ModelCard,
    onnx_sha256: str,
    precision: str,
    opt_batch: int,
    max_batch: int | None,
    min_batch: int,
) -> tuple[EngineSpec, EngineSpec]:
    """(what the caller needs, what a build makes). The need is min..max (``max_batch`` or the batch size);
    a build without an explicit ``max_batch`` gets the wide profile up to ``TRT_WIDE_MAX_BATCH`` (opt = the
    batch size), so one engine per GPU x ONNX x precision serves every batch size up to it."""
    need = EngineSpec.for_card(onnx_sha256, card, precision, opt_batch, max_batch or opt_batch, min_batch)
    wide = max_batch if max_batch is not None else max(TRT_WIDE_MAX_BATCH, opt_batch)
    return need, dataclasses.replace(need, max_batch=wide)


def get_or_build_engine(
    model: ModelFile | str | os.PathLike[str],
    *,
    precision: str = "fp16",
    opt_batch: int = DEFAULT_BATCH_SIZE,
    max_batch: int | None = None,
    min_batch: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    timing_cache_path: str | os.PathLike[str] | None = None,
    parity_feeds: Feeds | FeedsFactory | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    rebuild: bool = False,
    device_id: int = 0,
    log: Log | None = None,
) -> EngineRecord:
    """An engine for this ONNX file on this GPU that runs batches ``min_batch..(max_batch or opt_batch)``:
    a cached one whose profile covers that (``EngineCache.lookup``), or a new build (wide profile, see
    ``build_spec``), parity-checked, stored.

    Build order for fp16: plain fp16 first; if max |delta BMD| vs onnxruntime exceeds ``tolerance``, rebuild
    with LayerNorm/Softmax/Reduce in fp32; if that still fails, raise (nothing is cached). The parity figures
    go into the sidecar. The whole lookup-build-store runs under the cache's file lock: a second process
    asking for the same engine waits, then finds it (it is told so through ``log``).

    ``parity_feeds`` are real preprocessed inputs (``xbmd_batch.parity_feeds``), or a ``(card, n) -> feeds``
    callable so they are only made on a miss; a miss without them is an error, since an engine is never
    cached unchecked.
    """
    log = log or (lambda _m: None)
    model = open_model(model)
    onnx_path, card = model.path, model.card
    need, spec = build_spec(card, model.sha256, precision, opt_batch, max_batch, min_batch)
    device = DeviceInfo.current(device_id)
    cache = EngineCache(Path(cache_dir) if cache_dir else default_cache_dir(), onnx_path=onnx_path, log=log)
    from filelock import Timeout

    lock = cache.lock(spec, device)
    try:
        lock.acquire(timeout=0)
    except Timeout:  # another process holds it, most likely building this very engine
        log(f"waiting for another process building a TensorRT engine in {cache.root} ...")
        lock.acquire()
    try:
        if not rebuild:
            hit = cache.lookup(need, device)
            if hit is not None:
                log(f"engine cache hit: {hit.engine_path}")
                return hit
        return _build_and_store(
            model, spec, cache, device, timing_cache_path, parity_feeds, tolerance, device_id, log
        )
    finally:
        lock.release()


def _build_and_store(
    model: ModelFile,
    spec: EngineSpec,
    cache: EngineCache,
    device: DeviceInfo,
    timing_cache_path: str | os.PathLike[str] | None,
    parity_feeds: Feeds | FeedsFactory | None,
    tolerance: float,
    device_id: int,
    log: Log,
) -> EngineRecord:
    onnx_path, card = model.path, model.card
    if timing_cache_path is None:
        timing_cache_path = cache.timing_cache_path(device)
    if parity_feeds is None:
        raise InputError(
            f"{onnx_path}: no cached engine for this GPU and profile, and no parity inputs to check a new "
            f"build; build it with `python -m export tensorrt {onnx_path}`"
        )
    log(
        f"no cached TensorRT engine for {device.gpu_name} (TensorRT {device.trt_version}, {spec.precision}, "
        f"batch {spec.min_batch}/{spec.opt_batch}/{spec.max_batch}): building one, typically 1-3 min per "
        f"attempt; it is cached in {cache.root} for later runs"
    )
    if callable(parity_feeds):
        parity_feeds = parity_feeds(card, spec.max_batch)
    n_avail = min(len(v) for v in parity_feeds.values())
    batches = parity_batches(spec, n_avail)

    attempts = [False, True] if spec.precision == "fp16" else [False]
    history: list[dict[str, Any]] = []
    for keep_fp32 in attempts:
        engine_bytes, notes = build_engine(
            model, spec, timing_cache_path, keep_fp32_layers=keep_fp32, log=log, workspace_gib=4.0
        )
        log(f"engine built in {notes['build_time_s']:.0f} s; parity at batch {', '.join(map(str, batches))}")
        with tempfile.TemporaryDirectory() as tmp:
            tmp_engine = Path(tmp) / "candidate.engine"
            tmp_engine.write_bytes(engine_bytes)
            parity = _engine_parity(model, tmp_engine, spec.precision, parity_feeds, batches, device_id)
        parity["tolerance"] = tolerance
        parity["passed"] = parity["max_abs_bmd"] <= tolerance
        history.append({**notes, "max_abs_bmd": parity["max_abs_bmd"]})
        log(
            f"parity vs onnxruntime: max |dBMD| = {parity['max_abs_bmd']:.2e} g/cm^2 "
            f"(tolerance {tolerance:g}) -> {'ok' if parity['passed'] else 'FAIL'}"
        )
        if parity["passed"]:
            return cache.store(
                spec,
                device,
                engine_bytes,
                {"parity": parity, "build": notes, "attempts": history, "onnx_path": os.fspath(onnx_path)},
            )
    raise XbmdError(
        f"{onnx_path}: TensorRT {spec.precision} engine exceeds the parity tolerance {tolerance:g} g/cm^2 "
        f"even with LayerNorm/Softmax/Reduce in fp32 (attempts: {history}); try --precision fp32"
    )
