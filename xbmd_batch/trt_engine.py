"""TensorRT engines for the exported ONNX model: build, parity-check, cache, and run.

Engines do not move between GPU models or TensorRT versions, so `score` builds one on demand on the machine
that runs it and caches it under a key made of everything that makes an engine valid: GPU name, compute
capability, TensorRT version, ONNX sha256, precision and the optimization profile. A sidecar JSON beside each
engine repeats those fields (plus parity figures); an engine whose sidecar disagrees with the current machine
is refused with the command that rebuilds it. ``python -m export tensorrt`` calls the same
``get_or_build_engine``.

Precision. TensorRT 10 builds "weakly typed" networks: ``BuilderFlag.FP16`` lets it pick fp16 kernels per
layer, and ``OBEY_PRECISION_CONSTRAINTS`` + ``layer.precision = float32`` pins LayerNorm / Softmax / Reduce
layers to fp32. TensorRT 11 removed weak typing (every network is strongly typed; the FP16 flag is gone), so
there the ONNX graph itself must be fp16: we convert it with onnxruntime's float16 converter (I/O stay fp32),
leaving the same op types in fp32 on the retry. Either way the first build is plain fp16 and the retry with
fp32 normalisation layers happens only when parity against onnxruntime exceeds the tolerance.

``tensorrt``, ``torch``, ``onnx`` and ``onnxruntime`` are imported inside functions: this module is imported
by CPU-only code paths (cache-key computation, tests) that must not need them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xbmd_batch.checkpoint import sha256_file
from xbmd_batch.config import INPUT_NAMES
from xbmd_batch.defaults import DEFAULT_BATCH_SIZE, TRT_PRECISIONS
from xbmd_batch.errors import InputError, ModelFileError, XbmdError

if TYPE_CHECKING:
    import numpy as np

    from xbmd_batch.modelcard import ModelCard

PRECISIONS = TRT_PRECISIONS
DEFAULT_TOLERANCE = 5e-3  # g/cm^2, max |delta BMD| of the engine against onnxruntime fp32
# ONNX op types kept in fp32 on the retry (strongly typed path) and the matching TensorRT layer types.
FP32_ONNX_OPS = ("LayerNormalization", "Softmax", "ReduceMean")
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")
SIDECAR_SUFFIX = ".json"
ENGINE_SUFFIX = ".engine"

Profile = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
Log = Callable[[str], None]


class StaleEngineError(ModelFileError):
    """An engine built for another GPU / TensorRT / ONNX file / precision / profile, or corrupt."""


class TensorRTUnavailableError(XbmdError):
    """tensorrt (or CUDA) is not installed / visible on this machine."""


def default_cache_dir() -> Path:
    """``$XBMD_ENGINE_CACHE`` or ``~/.cache/xbmd_batch/engines`` (engines are per machine)."""
    env = os.environ.get("XBMD_ENGINE_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "xbmd_batch" / "engines"


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built from and for (everything except the machine)."""

    onnx_sha256: str
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = DEFAULT_BATCH_SIZE
    max_batch: int = DEFAULT_BATCH_SIZE
    image_size: int = 224
    in_chans: int = 1
    n_fields: int = 10
    input_names: tuple[str, ...] = INPUT_NAMES

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"TensorRT precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise InputError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got "
                f"min={self.min_batch} opt={self.opt_batch} max={self.max_batch}"
            )

    @classmethod
    def for_card(
        cls,
        onnx_sha256: str,
        card: ModelCard,
        precision: str = "fp16",
        opt_batch: int = DEFAULT_BATCH_SIZE,
        max_batch: int | None = None,
        min_batch: int = 1,
    ) -> EngineSpec:
        cfg = card.model_config
        return cls(
            onnx_sha256=onnx_sha256,
            precision=precision,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch if max_batch is not None else opt_batch,
            image_size=cfg.image_size,
            in_chans=cfg.in_chans,
            n_fields=cfg.n_fields,
            input_names=tuple(card.input_names),
        )

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shape per input: only dim 0 (batch) varies; kernels are tuned for ``opt_batch``."""
        image, meta, mask = self.input_names
        rest = {
            image: (self.in_chans, self.image_size, self.image_size),
            meta: (self.n_fields,),
            mask: (self.n_fields,),
        }
        return {
            name: ((self.min_batch, *r), (self.opt_batch, *r), (self.max_batch, *r))
            for name, r in rest.items()
        }


@dataclass(frozen=True)
class DeviceInfo:
    """The machine half of an engine's identity."""

    gpu_name: str
    compute_capability: str  # "9.0"
    trt_version: str

    @classmethod
    def current(cls, device_id: int = 0) -> DeviceInfo:
        trt = import_tensorrt()
        torch = _import_torch_cuda()
        major, minor = torch.cuda.get_device_capability(device_id)
        return cls(torch.cuda.get_device_name(device_id), f"{major}.{minor}", str(trt.__version__))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def _normalize_profile(profile: Profile | tuple[int, int, int]) -> dict[str, list[list[int]]] | list[int]:
    if isinstance(profile, tuple | list) and len(profile) == 3 and all(isinstance(x, int) for x in profile):
        return [int(x) for x in profile]
    if isinstance(profile, Mapping):
        return {str(k): [list(map(int, s)) for s in v] for k, v in sorted(profile.items())}
    raise TypeError(
        f"profile must be (min, opt, max) batch sizes or name -> (min, opt, max) shapes: {profile!r}"
    )


def _batch_triplet(profile: Profile | tuple[int, int, int]) -> tuple[int, int, int]:
    p = _normalize_profile(profile)
    if isinstance(p, list):
        return p[0], p[1], p[2]
    first = next(iter(p.values()))
    return first[0][0], first[1][0], first[2][0]


def engine_cache_key(
    gpu_name: str,
    compute_capability: str,
    trt_version: str,
    onnx_sha256: str,
    precision: str,
    profile: Profile | tuple[int, int, int],
) -> str:
    """A file-name-safe key: a readable prefix (GPU, sm, TRT, precision, batches) + a hash of all fields.

    The readable part lets a person see in ``ls`` which engine is which; the hash makes the key change when
    any field changes, including full profile shapes that the prefix abbreviates.
    """
    fields = {
        "gpu_name": gpu_name,
        "compute_capability": str(compute_capability),
        "trt_version": str(trt_version),
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profile": _normalize_profile(profile),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    b_min, b_opt, b_max = _batch_triplet(profile)
    cc = str(compute_capability).replace(".", "")
    prefix = f"{_slug(gpu_name)}-sm{cc}-trt{_slug(str(trt_version))}-{precision}-b{b_min}-{b_opt}-{b_max}"
    return f"{prefix}-{onnx_sha256[:8]}-{digest}"


def _identity(spec: EngineSpec, device: DeviceInfo) -> dict[str, Any]:
    """The sidecar fields that must equal the current machine + request for an engine to be usable."""
    return {
        "gpu_name": device.gpu_name,
        "compute_capability": device.compute_capability,
        "trt_version": device.trt_version,
        "onnx_sha256": spec.onnx_sha256,
        "precision": spec.precision,
        "profile": _normalize_profile(spec.profile()),
    }


def rebuild_hint(onnx_path: str | os.PathLike[str] | None, spec: EngineSpec, cache_dir: Path | None) -> str:
    onnx_arg = os.fspath(onnx_path) if onnx_path else "model.onnx"
    cache = f" --cache-dir {cache_dir}" if cache_dir else ""
    return (
        f"rebuild it with `python -m export tensorrt {onnx_arg} --precision {spec.precision} "
        f"--opt-batch {spec.opt_batch} --max-batch {spec.max_batch}{cache} --rebuild` (or delete the engine "
        f"file and let `xbmd-batch score` rebuild it)"
    )


@dataclass
class EngineRecord:
    """A usable engine on disk and its sidecar contents; ``built`` says whether this call built it."""

    engine_path: Path
    sidecar_path: Path
    meta: dict[str, Any]
    built: bool = False

    @property
    def key(self) -> str:
        return str(self.meta.get("key", self.engine_path.stem))


@dataclass
class EngineCache:
    """A directory of ``<key>.engine`` + ``<key>.json`` pairs, written atomically."""

    root: Path
    onnx_path: Path | None = None  # only for the rebuild hint in messages
    log: Log | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def key_for(self, spec: EngineSpec, device: DeviceInfo) -> str:
        return engine_cache_key(
            device.gpu_name,
            device.compute_capability,
            device.trt_version,
            spec.onnx_sha256,
            spec.precision,
            spec.profile(),
        )

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}{ENGINE_SUFFIX}", self.root / f"{key}{SIDECAR_SUFFIX}"

    def lookup(self, spec: EngineSpec, device: DeviceInfo) -> EngineRecord | None:
        """The cached engine for (spec, device); None on a miss; StaleEngineError if untrustworthy."""
        key = self.key_for(spec, device)
        engine, sidecar = self.paths(key)
        if not engine.exists():
            return None
        meta = verify_engine_file(engine, spec, device, cache_dir=self.root, onnx_path=self.onnx_path)
        return EngineRecord(engine, sidecar, meta, built=False)

    def store(
        self,
        spec: EngineSpec,
        device: DeviceInfo,
        engine_bytes: bytes,
        extra: Mapping[str, Any] | None = None,
    ) -> EngineRecord:
        """Write engine then sidecar (each atomically); a reader never sees an engine with a wrong sidecar."""
        from xbmd_batch import __version__

        key = self.key_for(spec, device)
        engine, sidecar = self.paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "key": key,
            **_identity(spec, device),
            "min_batch": spec.min_batch,
            "opt_batch": spec.opt_batch,
            "max_batch": spec.max_batch,
            "image_size": spec.image_size,
            "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
            "engine_bytes": len(engine_bytes),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "xbmd_batch": __version__,
            **dict(extra or {}),
        }
        sidecar.unlink(missing_ok=True)  # never leave an old sidecar next to a new engine
        _atomic_write(engine, engine_bytes)
        _atomic_write(sidecar, json.dumps(meta, indent=2, sort_keys=True).encode())
        return EngineRecord(engine, sidecar, meta, built=True)


def verify_engine_file(
    engine_path: str | os.PathLike[str],
    spec: EngineSpec,
    device: DeviceInfo,
    cache_dir: Path | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Check an engine's sidecar against the current machine and request; return the sidecar dict.

    Refuses (StaleEngineError, with the rebuild command) a missing/unreadable sidecar, any identity field
    that differs, or engine bytes whose sha256 differs from the sidecar's (a truncated or replaced file).
    """
    engine_path = Path(engine_path)
    sidecar = engine_path.with_suffix(SIDECAR_SUFFIX)
    hint = rebuild_hint(onnx_path, spec, cache_dir)
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise StaleEngineError(f"{engine_path}: engine has no sidecar {sidecar.name}; {hint}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise StaleEngineError(f"{engine_path}: unreadable sidecar {sidecar.name} ({e}); {hint}") from e
    want = _identity(spec, device)
    diffs = [f"{k}: engine {meta.get(k)!r} vs current {v!r}" for k, v in want.items() if meta.get(k) != v]
    if diffs:
        raise StaleEngineError(
            f"{engine_path}: engine was built for something else ({'; '.join(diffs)}); {hint}"
        )
    expected_sha = meta.get("engine_sha256")
    if not expected_sha or sha256_file(engine_path) != expected_sha:
        raise StaleEngineError(f"{engine_path}: engine file does not match its sidecar sha256; {hint}")
    return meta


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------- TensorRT


def import_tensorrt() -> Any:
    """``import tensorrt`` with an actionable message when it is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailableError(
            f"the tensorrt package is not importable ({e}); install the GPU extra: "
            f"pip install 'xbmd-batch[gpu]' (TensorRT 10.x or 11.x with a matching CUDA)"
        ) from e
    return trt


def _import_torch_cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("TensorRT needs a CUDA GPU, and torch sees none on this machine")
    return torch


def is_strongly_typed_only(trt: Any) -> bool:
    """TensorRT >= 11 has no weak typing: precision comes from the ONNX graph's types."""
    return not hasattr(trt.BuilderFlag, "FP16")


def build_engine(
    onnx_path: str | os.PathLike[str],
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

    trt = import_tensorrt()
    _import_torch_cuda()
    log = log or (lambda _m: None)
    strongly_typed = is_strongly_typed_only(trt)
    t0 = time.perf_counter()

    proto = onnx.load(os.fspath(onnx_path))
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
        _atomic_write(Path(timing_cache_path), bytes(config.get_timing_cache().serialize()))
    notes = {
        "typing": "strongly" if strongly_typed else "weakly",
        "fp32_layers": len(fp32_layers),
        "keep_fp32_layers": keep_fp32_layers,
        "build_time_s": round(time.perf_counter() - t0, 2),
    }
    return bytes(serialized), notes


class TrtExecutor:
    """Runs one engine: torch CUDA tensors as device buffers (allocated once at max batch), pinned host
    staging buffers, ``set_input_shape`` per call (so the last partial batch needs no padding), and
    ``execute_async_v3`` on a private torch CUDA stream."""

    def __init__(self, engine_path: str | os.PathLike[str], device_id: int = 0) -> None:
        import numpy as np

        trt = import_tensorrt()
        torch = _import_torch_cuda()
        self._trt, self._torch = trt, torch
        self.engine_path = Path(engine_path)
        self.device = torch.device("cuda", device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise StaleEngineError(
                f"{self.engine_path}: TensorRT {trt.__version__} cannot load this engine (built by another "
                f"TensorRT version or for another GPU?); rebuild it with "
                f"`python -m export tensorrt MODEL.onnx --rebuild`"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        first = self.input_names[0]
        self.max_batch = int(engine.get_tensor_profile_shape(first, 0)[2][0])
        self.shapes = {n: tuple(int(d) for d in engine.get_tensor_shape(n)) for n in names}  # -1 = batch
        self.stream = torch.cuda.Stream(device=self.device)
        self._dev: dict[str, Any] = {}
        self._host: dict[str, Any] = {}
        for n in names:
            np_dtype = trt.nptype(engine.get_tensor_dtype(n))
            t_dtype = torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype
            full = (self.max_batch, *self.shapes[n][1:])
            self._dev[n] = torch.empty(full, dtype=t_dtype, device=self.device)
            self._host[n] = torch.empty(full, dtype=t_dtype, pin_memory=True)
            self.context.set_tensor_address(n, self._dev[n].data_ptr())

    def io_shapes(self) -> tuple[dict[str, tuple[int | None, ...]], dict[str, tuple[int | None, ...]]]:
        def dyn(s: tuple[int, ...]) -> tuple[int | None, ...]:
            return tuple(None if d < 0 else d for d in s)

        return (
            {n: dyn(self.shapes[n]) for n in self.input_names},
            {n: dyn(self.shapes[n]) for n in self.output_names},
        )

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch of at most ``max_batch`` rows; returns float32 numpy copies."""
        import numpy as np

        torch = self._torch
        b = int(next(iter(feeds.values())).shape[0])
        if not 1 <= b <= self.max_batch:
            raise InputError(f"batch of {b} is outside this engine's profile (1..{self.max_batch})")
        with torch.cuda.stream(self.stream):
            for n in self.input_names:
                host = self._host[n][:b]
                host.numpy()[...] = feeds[n]
                self._dev[n][:b].copy_(host, non_blocking=True)
                if not self.context.set_input_shape(n, (b, *self.shapes[n][1:])):
                    raise InputError(f"TensorRT rejected input shape {(b, *self.shapes[n][1:])} for {n}")
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise XbmdError(f"{self.engine_path}: TensorRT execution failed")
            for n in self.output_names:
                self._host[n][:b].copy_(self._dev[n][:b], non_blocking=True)
        self.stream.synchronize()
        return {
            n: np.array(self._host[n][:b].numpy(), dtype=np.float32, copy=True) for n in self.output_names
        }

    def close(self) -> None:
        self._dev.clear()
        self._host.clear()
        self.context = None
        self.engine = None


def engine_parity(
    engine_path: Path,
    onnx_path: Path,
    feeds: Mapping[str, np.ndarray],
    batch_sizes: tuple[int, ...],
    device_id: int = 0,
    bmd_name: str = "bmd",
) -> dict[str, Any]:
    """Max |delta| of engine vs onnxruntime-CPU (the fp32 graph) on the same feeds, per batch size."""
    import numpy as np
    import onnxruntime as ort

    ref_sess = ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    ex = TrtExecutor(engine_path, device_id)
    try:
        per_batch: dict[str, dict[str, float]] = {}
        for b in batch_sizes:
            sub = {k: np.ascontiguousarray(v[:b]) for k, v in feeds.items()}
            ref = dict(zip(ex.output_names, ref_sess.run(ex.output_names, sub), strict=True))
            got = ex.infer(sub)
            per_batch[str(b)] = {
                f"max_abs_{n}": float(np.max(np.abs(got[n].astype(np.float64) - ref[n])))
                for n in ex.output_names
            }
    finally:
        ex.close()
    worst = max(v[f"max_abs_{bmd_name}"] for v in per_batch.values())
    return {"reference": "onnxruntime-cpu-fp32", "batches": per_batch, "max_abs_bmd": worst}


def get_or_build_engine(
    onnx_path: str | os.PathLike[str],
    *,
    precision: str = "fp16",
    opt_batch: int = DEFAULT_BATCH_SIZE,
    max_batch: int | None = None,
    min_batch: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    timing_cache_path: str | os.PathLike[str] | None = None,
    parity_feeds: Mapping[str, np.ndarray] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    rebuild: bool = False,
    device_id: int = 0,
    log: Log | None = None,
) -> EngineRecord:
    """The cached engine for this ONNX file on this GPU, building (and parity-checking) it on a miss.

    Build order for fp16: plain fp16 first; if max |delta BMD| vs onnxruntime exceeds ``tolerance``, rebuild
    with LayerNorm/Softmax/Reduce in fp32; if that still fails, raise (nothing is cached). The parity figures
    go into the sidecar.
    """
    from xbmd_batch.onnx_card import read_onnx_card

    log = log or (lambda _m: None)
    onnx_path = Path(onnx_path)
    card = read_onnx_card(onnx_path)
    spec = EngineSpec.for_card(sha256_file(onnx_path), card, precision, opt_batch, max_batch, min_batch)
    device = DeviceInfo.current(device_id)
    cache = EngineCache(Path(cache_dir) if cache_dir else default_cache_dir(), onnx_path=onnx_path, log=log)
    if not rebuild:
        hit = cache.lookup(spec, device)
        if hit is not None:
            log(f"engine cache hit: {hit.engine_path}")
            return hit
    if timing_cache_path is None:
        tc = f"timing-{_slug(device.gpu_name)}-sm{device.compute_capability.replace('.', '')}"
        timing_cache_path = cache.root / f"{tc}-trt{_slug(device.trt_version)}.cache"

    if parity_feeds is None:
        from xbmd_batch.runners import make_reference_feeds

        parity_feeds = make_reference_feeds(card, n=spec.max_batch)
    batches = tuple(sorted({b for b in (1, 3, spec.opt_batch, spec.max_batch) if b <= spec.max_batch}))
    n_avail = min(len(v) for v in parity_feeds.values())
    batches = tuple(b for b in batches if b <= n_avail) or (n_avail,)

    attempts = [False, True] if spec.precision == "fp16" else [False]
    history: list[dict[str, Any]] = []
    for keep_fp32 in attempts:
        engine_bytes, notes = build_engine(
            onnx_path, spec, timing_cache_path, keep_fp32_layers=keep_fp32, log=log, workspace_gib=4.0
        )
        with tempfile.TemporaryDirectory() as tmp:
            tmp_engine = Path(tmp) / "candidate.engine"
            tmp_engine.write_bytes(engine_bytes)
            parity = engine_parity(
                tmp_engine, onnx_path, parity_feeds, batches, device_id, bmd_name=card.output_names[0]
            )
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


def spec_for(
    onnx_path: str | os.PathLike[str],
    precision: str = "fp16",
    opt_batch: int = DEFAULT_BATCH_SIZE,
    max_batch: int | None = None,
    min_batch: int = 1,
) -> EngineSpec:
    """The EngineSpec for an exported ONNX file (reads its card and hashes it)."""
    from xbmd_batch.onnx_card import read_onnx_card

    card = read_onnx_card(onnx_path)
    return EngineSpec.for_card(sha256_file(onnx_path), card, precision, opt_batch, max_batch, min_batch)


def describe(record: EngineRecord) -> dict[str, Any]:
    """Flat provenance for run manifests."""
    keep = (
        "key",
        "gpu_name",
        "compute_capability",
        "trt_version",
        "precision",
        "engine_sha256",
        "onnx_sha256",
    )
    d = {k: record.meta.get(k) for k in keep}
    d["engine_path"] = os.fspath(record.engine_path)
    d["parity_max_abs_bmd"] = (record.meta.get("parity") or {}).get("max_abs_bmd")
    return d


__all__ = [
    "DEFAULT_TOLERANCE",
    "DeviceInfo",
    "EngineCache",
    "EngineRecord",
    "EngineSpec",
    "StaleEngineError",
    "TensorRTUnavailableError",
    "TrtExecutor",
    "build_engine",
    "default_cache_dir",
    "engine_cache_key",
    "engine_parity",
    "get_or_build_engine",
    "spec_for",
    "verify_engine_file",
]
