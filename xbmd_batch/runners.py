"""One inference protocol over torch, onnxruntime and TensorRT (Polygraphy-style runners).

Every runner is a context manager with ``infer(feeds) -> outputs``: dicts of numpy arrays keyed by
``config.INPUT_NAMES`` / ``config.OUTPUT_NAMES`` (``image`` [B,C,S,S], ``meta`` [B,F], ``meta_mask`` [B,F] ->
``bmd`` [B], ``field_attention`` [B,F], all float32). Any B >= 0 is accepted: runners with a maximum batch
(TensorRT's profile) split larger feeds, and a last partial batch is just a smaller dynamic shape. So scoring,
parity checks and benchmarks compare backends with a loop, not special cases.

``open_runner`` loads the model card first (checkpoint -> ``checkpoint.load_model``; ONNX ->
``onnx_card.read_onnx_card``), picks a backend, and sets ``runner.reason`` to a sentence saying which and why.
Heavy packages (torch, onnxruntime, tensorrt) are imported inside functions.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from xbmd_batch.defaults import (
    BACKENDS,
    DEFAULT_BATCH_SIZE,
    DEVICES,
    ORT_PROVIDERS,
    PRECISIONS,
    TORCH_PRECISIONS,
    TRT_PRECISIONS,
)
from xbmd_batch.errors import InputError, ModelFileError, XbmdError

if TYPE_CHECKING:
    from torch import nn

    from xbmd_batch.modelcard import ModelCard


Feeds = Mapping[str, np.ndarray]


@runtime_checkable
class Runner(Protocol):
    """What scoring and benchmarks rely on; every backend implements it."""

    name: str  # e.g. "onnxruntime-cpu-fp32"
    backend: str  # "torch" | "onnxruntime" | "tensorrt"
    device: str  # "cpu" | "cuda:0"
    precision: str  # "fp32" | "fp16" | "bf16"
    card: ModelCard
    has_attention: bool
    reason: str  # why open_runner picked this backend ("" when constructed directly)

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]: ...


# ----------------------------------------------------------------------------------------------- helpers


def detect_model_kind(path: str | os.PathLike[str]) -> str:
    """ "checkpoint" (torch zip) or "onnx", by content, not extension; ModelFileError for anything else."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: model file not found")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read model file ({e.strerror or e})") from e
    if zipfile.is_zipfile(p) or head == b"PK\x03\x04":  # a torch zip, possibly truncated
        return "checkpoint"
    from xbmd_batch.onnx_card import load_onnx_proto

    try:
        load_onnx_proto(p)
    except ModelFileError as e:
        if p.suffix.lower() in (".pt", ".pth", ".ckpt") or head[:1] == b"\x80":  # named / pickled as torch
            raise ModelFileError(
                f"{p}: not a readable xbmd-batch checkpoint (a .pt must be a torch zip archive written by "
                "`python -m train`; this file is truncated, corrupt or a legacy pickle)"
            ) from e
        raise ModelFileError(
            f"{p}: neither an xbmd-batch checkpoint (.pt) nor an exported ONNX model ({e})"
        ) from e
    return "onnx"


def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """The model card of a checkpoint or ONNX file (cheap for ONNX; a checkpoint is read whole)."""
    if detect_model_kind(path) == "onnx":
        from xbmd_batch.onnx_card import read_onnx_card

        return read_onnx_card(path)
    from xbmd_batch.checkpoint import load_checkpoint, sha256_file
    from xbmd_batch.modelcard import card_from_checkpoint

    return card_from_checkpoint(load_checkpoint(path), sha256_file(path))


def validate_feeds(feeds: Feeds, card: ModelCard, source: str = "runner") -> dict[str, np.ndarray]:
    """Contiguous float32 arrays with the card's names and shapes; InputError naming the first problem."""
    from xbmd_batch.onnx_card import expected_io

    exp_in, _ = expected_io(card)
    missing = [n for n in exp_in if n not in feeds]
    extra = [n for n in feeds if n not in exp_in]
    if missing or extra:
        raise InputError(
            f"{source}: feeds must be exactly {list(exp_in)} (missing {missing}, unexpected {extra})"
        )
    out: dict[str, np.ndarray] = {}
    batch: int | None = None
    for name, want in exp_in.items():
        arr = np.asarray(feeds[name])
        if arr.dtype.kind not in "fiub":
            raise InputError(f"{source}: {name} has dtype {arr.dtype}, expected float32")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim != len(want) or tuple(arr.shape[1:]) != tuple(want[1:]):
            shape = "[B, " + ", ".join(map(str, want[1:])) + "]"
            raise InputError(f"{source}: {name} has shape {list(arr.shape)}, expected {shape}")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise InputError(
                f"{source}: batch sizes differ between inputs ({batch} vs {arr.shape[0]} for {name})"
            )
        out[name] = arr
    return out


def _empty_outputs(card: ModelCard) -> dict[str, np.ndarray]:
    f = card.model_config.n_fields
    bmd, attn = card.output_names
    return {bmd: np.zeros((0,), np.float32), attn: np.zeros((0, f), np.float32)}


def _check_outputs(
    out: dict[str, np.ndarray], card: ModelCard, batch: int, source: str
) -> dict[str, np.ndarray]:
    bmd, attn = card.output_names
    f = card.model_config.n_fields
    res = {bmd: np.asarray(out[bmd], np.float32).reshape(-1), attn: np.asarray(out[attn], np.float32)}
    if res[bmd].shape != (batch,) or res[attn].shape != (batch, f):
        raise XbmdError(
            f"{source}: backend returned shapes {res[bmd].shape} / {res[attn].shape}, expected ({batch},) / "
            f"({batch}, {f})"
        )
    return res


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return bool(torch.cuda.is_available())


def _cuda_name(device_id: int = 0) -> str:
    import torch

    return str(torch.cuda.get_device_name(device_id))


# ----------------------------------------------------------------------------------------------- runners


class BaseRunner:
    """Shared plumbing: lazy load on activate/first infer, feed validation, chunking, output checks."""

    backend = ""

    def __init__(
        self,
        card: ModelCard | None,
        device: str,
        precision: str,
        model_path: Path | None,
        max_batch: int | None = None,
    ) -> None:
        self._card = card
        self.device = device
        self.precision = precision
        self.model_path = model_path
        self.max_batch = max_batch
        self.reason = ""
        self.engine_sha256: str | None = None
        self._active = False
        self._model_sha256: str | None = None

    # the card may only be known after loading (checkpoint runners)
    @property
    def card(self) -> ModelCard:
        if self._card is None:
            self.activate()
        assert self._card is not None
        return self._card

    @property
    def has_attention(self) -> bool:
        return bool(self.card.has_attention)

    @property
    def name(self) -> str:
        kind = "cuda" if self.device.startswith("cuda") else self.device
        return f"{self.backend}-{kind}-{self.precision}"

    @property
    def model_sha256(self) -> str | None:
        if self._model_sha256 is None and self.model_path is not None:
            from xbmd_batch.checkpoint import sha256_file

            self._model_sha256 = sha256_file(self.model_path)
        return self._model_sha256

    def provenance(self) -> dict[str, Any]:
        """Flat facts for run manifests and benchmark tables."""
        return {
            "runner": self.name,
            "backend": self.backend,
            "device": self.device,
            "precision": self.precision,
            "model_path": os.fspath(self.model_path) if self.model_path else None,
            "model_sha256": self.model_sha256,
            "engine_sha256": self.engine_sha256,
            "reason": self.reason,
        }

    def activate(self) -> None:
        if not self._active:
            self._load()
            self._active = True

    def deactivate(self) -> None:
        if self._active:
            self._unload()
            self._active = False

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Validated float32 feeds of any batch size -> float32 outputs of the same batch size."""
        self.activate()
        card = self.card
        x = validate_feeds(feeds, card, self.name)
        b = next(iter(x.values())).shape[0]
        if b == 0:
            return _empty_outputs(card)
        step = self.max_batch or b
        parts = []
        for s in range(0, b, step):
            chunk = {k: v[s : s + step] for k, v in x.items()} if step < b else x
            n = min(step, b - s)
            parts.append(_check_outputs(self._infer(chunk), card, n, self.name))
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _load(self) -> None:
        raise NotImplementedError

    def _unload(self) -> None:
        raise NotImplementedError

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.model_path or ''}>"


class TorchRunner(BaseRunner):
    """The reference implementation: the nn.Module itself.

    CPU: fp32 under ``inference_mode``. CUDA: fp16/bf16 autocast (fp32 on request), channels_last image
    layout (faster convs on tensor cores), optional ``torch.compile``, inputs staged through reusable pinned
    host buffers and copied with ``non_blocking=True`` on a private stream.
    """

    backend = "torch"

    def __init__(
        self,
        model: str | os.PathLike[str] | nn.Module,
        card: ModelCard | None = None,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        channels_last: bool | None = None,
        compile: bool = False,
        max_batch: int | None = None,
    ) -> None:
        if isinstance(model, str | os.PathLike):
            path: Path | None = Path(model)
            self._module: Any = None
        else:
            path, self._module = None, model
            if card is None:
                raise InputError("TorchRunner(model_module) needs the model's card")
        device = "cuda:0" if device == "cuda" else device
        if device == "cpu" and precision != "fp32":
            raise InputError(f"torch on CPU runs fp32 only (asked for {precision})")
        if precision not in TORCH_PRECISIONS:
            raise InputError(f"unknown precision {precision!r} ({', '.join(TORCH_PRECISIONS)})")
        super().__init__(card, device, precision, path, max_batch)
        self.channels_last = device.startswith("cuda") if channels_last is None else channels_last
        self.compile = compile
        self._fwd: Any = None
        self._pinned: dict[str, Any] = {}
        self._stream: Any = None

    def _load(self) -> None:
        import torch

        from xbmd_batch.model import ExportWrapper

        if self._module is None:
            from xbmd_batch.checkpoint import load_model

            assert self.model_path is not None
            self._module, self._card = load_model(self.model_path)
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError("torch runner asked for CUDA, but torch sees no CUDA device")
        module = self._module.eval().to(dev)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        fwd: Any = ExportWrapper(module).eval()
        if self.compile:
            fwd = torch.compile(fwd, dynamic=True)  # dynamic: the last partial batch must not recompile
        self._fwd = fwd
        self._dev = dev
        if dev.type == "cuda":
            self._stream = torch.cuda.Stream(device=dev)

    def _unload(self) -> None:
        self._fwd = None
        self._pinned.clear()
        self._stream = None

    def _host(self, name: str, arr: np.ndarray) -> Any:
        """A pinned staging tensor holding ``arr`` (grown, never shrunk: steady state allocates nothing)."""
        import torch

        buf = self._pinned.get(name)
        if buf is None or buf.shape[0] < arr.shape[0] or tuple(buf.shape[1:]) != arr.shape[1:]:
            buf = torch.empty(arr.shape, dtype=torch.float32, pin_memory=True)
            self._pinned[name] = buf
        view = buf[: arr.shape[0]]
        view.numpy()[...] = arr
        return view

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        names = list(self.card.input_names)
        out_names = list(self.card.output_names)
        with torch.inference_mode():
            if self._dev.type == "cpu":
                bmd, attn = self._fwd(*(torch.from_numpy(feeds[n]) for n in names))
                return {out_names[0]: bmd.numpy(), out_names[1]: attn.numpy()}
            with torch.cuda.stream(self._stream):
                xs = [self._host(n, feeds[n]).to(self._dev, non_blocking=True) for n in names]
                if self.channels_last:
                    xs[0] = xs[0].contiguous(memory_format=torch.channels_last)
                if self.precision == "fp32":
                    bmd, attn = self._fwd(*xs)
                else:
                    dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
                    with torch.autocast("cuda", dtype=dtype):
                        bmd, attn = self._fwd(*xs)
                host = [t.float().to("cpu", non_blocking=True) for t in (bmd, attn)]
            self._stream.synchronize()
            return {out_names[0]: host[0].numpy(), out_names[1]: host[1].numpy()}


def ort_provider_chain(
    provider: str,
    *,
    device_id: int = 0,
    precision: str = "fp32",
    card: ModelCard | None = None,
    opt_batch: int = DEFAULT_BATCH_SIZE,
    max_batch: int | None = None,
    trt_cache_dir: str | os.PathLike[str] | None = None,
) -> list[Any]:
    """The onnxruntime providers list (with options) for "cpu", "cuda" or "tensorrt", fallbacks included."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    cuda_opts = {
        "device_id": device_id,
        "arena_extend_strategy": "kSameAsRequested",  # dynamic batches: don't double the arena per new shape
        "cudnn_conv_algo_search": "EXHAUSTIVE",  # few distinct shapes (full + last partial batch)
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": True,
    }
    if provider == "cuda":
        return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
    if provider == "tensorrt":
        from xbmd_batch.trt_engine import default_cache_dir

        cache = os.fspath(Path(trt_cache_dir) if trt_cache_dir else default_cache_dir() / "ort-trt-ep")
        trt_opts: dict[str, Any] = {
            "device_id": device_id,
            "trt_fp16_enable": precision == "fp16",  # TensorRT 11 is strongly typed: ignored there
            "trt_layer_norm_fp32_fallback": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
            "trt_builder_optimization_level": 3,
            "trt_max_workspace_size": 4 << 30,
        }
        if card is not None:  # explicit profile so the engine is not rebuilt for each new batch size
            c, s, f = card.model_config.in_chans, card.model_config.image_size, card.model_config.n_fields
            image, meta, mask = card.input_names

            def shapes(b: int) -> str:
                return f"{image}:{b}x{c}x{s}x{s},{meta}:{b}x{f},{mask}:{b}x{f}"

            trt_opts["trt_profile_min_shapes"] = shapes(1)
            trt_opts["trt_profile_opt_shapes"] = shapes(opt_batch)
            trt_opts["trt_profile_max_shapes"] = shapes(max_batch or opt_batch)
        return [
            ("TensorrtExecutionProvider", trt_opts),
            ("CUDAExecutionProvider", cuda_opts),
            "CPUExecutionProvider",
        ]
    raise InputError(f"unknown onnxruntime provider {provider!r} ({', '.join(ORT_PROVIDERS)})")


_PROVIDER_NAME = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OrtRunner(BaseRunner):
    """onnxruntime over an exported ONNX file: CPU, CUDA or TensorRT execution provider.

    The session is refused (InputError) when the requested provider is missing or onnxruntime silently fell
    back to CPU (e.g. onnxruntime-gpu not installed, or installed alongside onnxruntime). Intra-op spinning
    is off by default: in ``score`` the decode workers share the cores, and spinning threads steal them.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        card: ModelCard | None = None,
        *,
        provider: str = "cpu",
        device_id: int = 0,
        precision: str | None = None,
        intra_op_threads: int | None = None,
        graph_optimization: str = "all",
        allow_spinning: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch: int | None = None,
        trt_cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if provider not in _PROVIDER_NAME:
            raise InputError(f"unknown onnxruntime provider {provider!r} ({', '.join(ORT_PROVIDERS)})")
        path = Path(onnx_path)
        if card is None:
            from xbmd_batch.onnx_card import read_onnx_card

            card = read_onnx_card(path)
        graph_precision = str(card.extra.get("onnx_precision", "fp32"))
        if precision in (None, "auto"):
            precision = "fp16" if provider == "tensorrt" else graph_precision
        if provider != "tensorrt" and precision != graph_precision:
            raise InputError(
                f"{path}: this ONNX graph is {graph_precision}; onnxruntime-{provider} runs it as stored "
                f"(asked for {precision}: export with --fp16 and use the .fp16.onnx file)"
            )
        device = "cpu" if provider == "cpu" else f"cuda:{device_id}"
        super().__init__(card, device, precision, path, max_batch=None)
        self.provider = provider
        self.device_id = device_id
        self.intra_op_threads = intra_op_threads
        self.graph_optimization = graph_optimization
        self.allow_spinning = allow_spinning
        self.batch_size = batch_size
        self.profile_max_batch = max_batch or batch_size
        self.trt_cache_dir = trt_cache_dir
        self.session: Any = None

    @property
    def name(self) -> str:
        return f"onnxruntime-{self.provider}-{self.precision}"

    def _load(self) -> None:
        import onnxruntime as ort

        from xbmd_batch.onnx_card import check_io_against_card

        wanted = _PROVIDER_NAME[self.provider]
        available = ort.get_available_providers()
        if wanted not in available:
            raise InputError(
                f"onnxruntime {ort.__version__} offers {available}, not {wanted}; install the GPU build "
                f"(pip install 'xbmd-batch[gpu]', never together with the CPU onnxruntime package)"
            )
        so = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so.graph_optimization_level = levels[self.graph_optimization]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.intra_op_threads:
            so.intra_op_num_threads = int(self.intra_op_threads)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        providers = ort_provider_chain(
            self.provider,
            device_id=self.device_id,
            precision=self.precision,
            card=self.card,
            opt_batch=self.batch_size,
            max_batch=self.profile_max_batch,
            trt_cache_dir=self.trt_cache_dir,
        )
        assert self.model_path is not None
        try:
            sess = ort.InferenceSession(os.fspath(self.model_path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelFileError(f"{self.model_path}: onnxruntime cannot load it: {e}") from e
        used = sess.get_providers()
        if not used or used[0] != wanted:
            raise InputError(
                f"onnxruntime fell back to {used} instead of {wanted} (no usable GPU/driver/CUDA?)"
            )
        check_io_against_card(sess, self.card, source=str(self.model_path))
        self.session = sess
        self._out_names = list(self.card.output_names)

    def _unload(self) -> None:
        self.session = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._out_names, feeds)
        return dict(zip(self._out_names, outs, strict=True))


class TensorRTRunner(BaseRunner):
    """A native TensorRT engine from the engine cache (built on demand, see ``trt_engine``)."""

    backend = "tensorrt"

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        card: ModelCard | None = None,
        *,
        precision: str = "fp16",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch: int | None = None,
        min_batch: int = 1,
        engine_cache_dir: str | os.PathLike[str] | None = None,
        device_id: int = 0,
        rebuild: bool = False,
        log: Any = None,
    ) -> None:
        path = Path(onnx_path)
        if card is None:
            from xbmd_batch.onnx_card import read_onnx_card

            card = read_onnx_card(path)
        if precision in ("auto", None):
            precision = TRT_PRECISIONS[0]
        if precision not in TRT_PRECISIONS:
            raise InputError(f"TensorRT runner precision must be one of {TRT_PRECISIONS}, got {precision!r}")
        super().__init__(card, f"cuda:{device_id}", precision, path, max_batch or batch_size)
        self.batch_size, self.min_batch = batch_size, min_batch
        self.engine_cache_dir, self.device_id, self.rebuild, self.log = (
            engine_cache_dir,
            device_id,
            rebuild,
            log,
        )
        self.engine_record: Any = None
        self._exec: Any = None

    def _load(self) -> None:
        from xbmd_batch import trt_engine
        from xbmd_batch.onnx_card import check_io_shapes

        assert self.model_path is not None
        rec = trt_engine.get_or_build_engine(
            self.model_path,
            precision=self.precision,
            opt_batch=self.batch_size,
            max_batch=self.max_batch,
            min_batch=self.min_batch,
            cache_dir=self.engine_cache_dir,
            rebuild=self.rebuild,
            device_id=self.device_id,
            log=self.log,
        )
        ex = trt_engine.TrtExecutor(rec.engine_path, self.device_id)
        ins, outs = ex.io_shapes()
        check_io_shapes(ins, outs, self.card, source=str(rec.engine_path))
        self.engine_record, self._exec = rec, ex
        self.engine_sha256 = rec.meta.get("engine_sha256")
        self.max_batch = ex.max_batch

    def _unload(self) -> None:
        if self._exec is not None:
            self._exec.close()
        self._exec = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._exec.infer(feeds)

    def provenance(self) -> dict[str, Any]:
        d = super().provenance()
        if self.engine_record is not None:
            from xbmd_batch.trt_engine import describe

            d.update(
                {
                    f"engine_{k}" if not k.startswith("engine") else k: v
                    for k, v in describe(self.engine_record).items()
                }
            )
        return d


# ----------------------------------------------------------------------------------------------- open_runner


def _resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose one of {DEVICES}")
    if device == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if device == "cuda" and not _cuda_available():
        raise InputError("--device cuda: no CUDA device is visible to torch on this machine")
    return device


def _tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def open_runner(
    model_path: str | os.PathLike[str],
    backend: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    engine_cache_dir: str | os.PathLike[str] | None = None,
    *,
    max_batch: int | None = None,
    intra_op_threads: int | None = None,
    compile: bool = False,
    log: Any = None,
) -> BaseRunner:
    """Open (and load) the runner for a checkpoint or exported ONNX file; ``runner.reason`` says why.

    ``backend="auto"`` takes the fastest one that works here, in the order TensorRT (tensorrt + CUDA + an
    ONNX file) > onnxruntime-CUDA > torch-CUDA (checkpoint) > onnxruntime-CPU > torch-CPU. A GPU candidate
    that fails to start (missing provider, no driver) is skipped and the failure is named in the reason.
    The returned runner is already loaded; use it as a context manager to release it.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    path = Path(model_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    card: ModelCard | None = None  # a checkpoint's card is loaded with its weights by TorchRunner
    if zipfile.is_zipfile(path):
        kind = "checkpoint"
    else:
        from xbmd_batch.onnx_card import read_onnx_card

        kind, card = "onnx", read_onnx_card(path)  # parses once; ModelFileError names the file if not ONNX
    dev = _resolve_device(device)
    prec = None if precision == "auto" else precision

    def torch_runner(on: str) -> BaseRunner:
        if kind != "checkpoint":
            raise InputError(
                f"{path}: the torch backend needs the training checkpoint (.pt), not an ONNX file"
            )
        p = prec or ("fp16" if on == "cuda" else "fp32")
        return TorchRunner(path, device=on, precision=p, compile=compile, max_batch=max_batch)

    def ort_runner(provider: str) -> BaseRunner:
        if kind != "onnx":
            raise InputError(
                f"{path}: onnxruntime needs an exported ONNX file; run `python -m export onnx {path} "
                f"--out model.onnx`"
            )
        return OrtRunner(
            path,
            card,
            provider=provider,
            precision=prec,
            intra_op_threads=intra_op_threads,
            batch_size=batch_size,
            max_batch=max_batch,
            trt_cache_dir=engine_cache_dir,
        )

    def trt_runner() -> BaseRunner:
        if kind != "onnx":
            raise InputError(
                f"{path}: TensorRT builds from the exported ONNX file; run `python -m export onnx {path} "
                f"--out model.onnx` first"
            )
        return TensorRTRunner(
            path,
            card,
            precision=prec or "fp16",
            batch_size=batch_size,
            max_batch=max_batch,
            engine_cache_dir=engine_cache_dir,
            log=log,
        )

    if backend != "auto":
        if backend == "torch":
            runner = torch_runner(dev)
        elif backend == "onnxruntime":
            runner = ort_runner("cuda" if dev == "cuda" else "cpu")
        else:
            if dev != "cuda":
                raise InputError("the tensorrt backend needs a CUDA device")
            runner = trt_runner()
        runner.activate()
        runner.reason = f"{runner.name}: requested with --backend {backend}"
        return runner

    # auto: candidates in speed order, each with a reason it applies or why it was skipped
    skipped: list[str] = []
    candidates: list[tuple[str, Any]] = []
    if dev == "cuda":
        gpu = _cuda_name()
        trt_ver = _tensorrt_version()
        if kind != "onnx":
            skipped.append("TensorRT/onnxruntime need an exported ONNX file")
        elif trt_ver is None:
            skipped.append("TensorRT: tensorrt is not installed")
        else:
            candidates.append((f"TensorRT {trt_ver} on {gpu}", trt_runner))
        if kind == "onnx":
            if "CUDAExecutionProvider" in _ort_providers():
                candidates.append((f"onnxruntime CUDA provider on {gpu}", lambda: ort_runner("cuda")))
            else:
                skipped.append("onnxruntime-CUDA: this onnxruntime build has no CUDAExecutionProvider")
        else:
            candidates.append((f"torch on {gpu}", lambda: torch_runner("cuda")))
    else:
        skipped.append("no CUDA device" if device == "auto" else "--device cpu")
    if device != "cuda":  # an explicit --device cuda never falls back to the CPU
        if kind == "onnx":
            candidates.append(("onnxruntime on CPU", lambda: ort_runner("cpu")))
        else:
            if dev == "cpu":
                skipped.append("onnxruntime-CPU needs an exported ONNX file")
            candidates.append(("torch on CPU", lambda: torch_runner("cpu")))

    for label, make in candidates:
        try:
            runner = make()
            runner.activate()
        except (InputError, XbmdError, ImportError, RuntimeError) as e:
            if isinstance(e, ModelFileError) and not isinstance(e, _stale_types()):
                raise  # the file itself is bad: no other backend will do better
            skipped.append(f"{label}: {e}")
            continue
        why = f"fastest available: {label}"
        if skipped:
            why += " (skipped: " + "; ".join(skipped) + ")"
        runner.reason = why
        return runner
    raise InputError(f"{path}: no backend could run this model: " + "; ".join(skipped))


def _stale_types() -> tuple[type[BaseException], ...]:
    from xbmd_batch.trt_engine import StaleEngineError

    return (StaleEngineError,)


# ------------------------------------------------------------------------------------------ parity inputs


def make_reference_feeds(
    card: ModelCard,
    n: int = DEFAULT_BATCH_SIZE,
    cohort_dir: str | os.PathLike[str] | None = None,
    *,
    n_subjects: int = 8,
    synth_size: int = 256,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Real preprocessed inputs for parity checks: a synthetic cohort's DICOMs through the card's
    preprocessing and its metadata through the card's schema, repeated to ``n`` rows.

    ``cohort_dir`` is an existing ``xbmd-batch synth`` output; without it a tiny cohort (``n_subjects``
    subjects rendered at ``synth_size`` pixels) is generated in a temporary directory. Parity on random
    noise would test a distribution the model never sees.
    """
    import tempfile

    if cohort_dir is not None:
        return _feeds_from_cohort(Path(cohort_dir), card, n, n_subjects)
    from xbmd_batch.synth import SynthConfig, generate_cohort

    with tempfile.TemporaryDirectory(prefix="xbmd-parity-") as tmp:
        generate_cohort(
            Path(tmp),
            # no JPEG 2000: the check must not depend on the optional decoders being installed
            SynthConfig(n=n_subjects, size=synth_size, seed=seed, workers=1, j2k_fraction=0.0),
            progress=False,
        )
        return _feeds_from_cohort(Path(tmp), card, n, n_subjects)


def _feeds_from_cohort(root: Path, card: ModelCard, n: int, limit: int) -> dict[str, np.ndarray]:
    from xbmd_batch.dicom_io import is_dicom, read_header
    from xbmd_batch.metadata import read_table, validate_and_encode
    from xbmd_batch.preprocess import load_and_preprocess

    meta_path = root / "meta.csv"
    if not meta_path.is_file():
        raise InputError(f"{root}: not a synthetic cohort (no meta.csv)")
    files = sorted(p for p in (root / "dicom").rglob("*") if p.is_file() and is_dicom(p))[: max(limit, 1)]
    if not files:
        raise InputError(f"{root}: no DICOM files under dicom/")
    enc = validate_and_encode(read_table(meta_path, subject_key=card.schema.subject_key), card.schema)
    row_of = {k: i for i, k in enumerate(enc.subject_keys) if k is not None}
    images, metas, masks = [], [], []
    skipped: list[str] = []
    for p in files:
        sid = read_header(p).patient_id
        if sid not in row_of:
            continue
        try:
            arr, _ = load_and_preprocess(p, card.preprocess)
        except (XbmdError, ValueError, RuntimeError) as e:  # e.g. J2K without its optional decoder
            skipped.append(f"{p.name}: {e}")
            continue
        images.append(arr)
        metas.append(enc.values[row_of[sid]])
        masks.append(enc.mask[row_of[sid]])
    if not images:
        raise InputError(f"{root}: no usable DICOM matching a meta.csv row ({'; '.join(skipped) or 'none'})")
    reps = -(-n // len(images))
    idx = np.tile(np.arange(len(images)), reps)[:n]
    image, meta, mask = card.input_names
    return {
        image: np.ascontiguousarray(np.stack(images)[idx], dtype=np.float32),
        meta: np.ascontiguousarray(np.stack(metas)[idx], dtype=np.float32),
        mask: np.ascontiguousarray(np.stack(masks)[idx], dtype=np.float32),
    }


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, float]:
    """max |delta| per output (float64 arithmetic)."""
    return {
        f"max_abs_{k}": float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(ref[k], np.float64))))
        if np.asarray(ref[k]).size
        else 0.0
        for k in ref
    }


def compare_runners(
    reference: BaseRunner,
    candidate: BaseRunner,
    feeds: Feeds,
    batch_sizes: tuple[int, ...] = (1, 3, DEFAULT_BATCH_SIZE),
) -> dict[str, dict[str, float]]:
    """Per batch size: max |delta| of each output, candidate vs reference, on the first B rows of feeds."""
    res: dict[str, dict[str, float]] = {}
    for b in batch_sizes:
        sub = {k: np.ascontiguousarray(v[:b]) for k, v in feeds.items()}
        res[str(b)] = compare_outputs(reference.infer(sub), candidate.infer(sub))
    return res
