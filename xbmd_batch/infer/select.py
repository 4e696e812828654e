"""Runner selection: ``open_runner`` picks the backend for a model file and says why in ``runner.reason``."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xbmd_batch.defaults import BACKENDS, DEFAULT_BATCH_SIZE, DEVICES, PRECISIONS
from xbmd_batch.errors import InputError, ModelFileError, StaleEngineError, XbmdError
from xbmd_batch.infer.base import BaseRunner
from xbmd_batch.infer.model_file import ModelFile, open_model
from xbmd_batch.infer.ort_runner import OrtRunner
from xbmd_batch.infer.torch_runner import TorchRunner
from xbmd_batch.infer.trt_runner import TensorRTRunner

if TYPE_CHECKING:
    from xbmd_batch.infer.base import Feeds
    from xbmd_batch.infer.tensorrt.builder import FeedsFactory


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return bool(torch.cuda.is_available())


def _cuda_name(device_id: int = 0) -> str:
    import torch

    return str(torch.cuda.get_device_name(device_id))


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


def _gpu_backend_installed(kind: str) -> bool:
    """Could any CUDA candidate run this kind of file here? (Answered without importing torch for ONNX.)"""
    if kind != "onnx":
        return True  # torch-CUDA
    return importlib.util.find_spec("tensorrt") is not None or "CUDAExecutionProvider" in _ort_providers()


def _cuda_device_count() -> int:
    import torch

    return int(torch.cuda.device_count())


def parse_device(device: str) -> tuple[str, int]:
    """``auto | cpu | cuda | cuda:N`` -> (kind, index); InputError naming the accepted forms otherwise."""
    if device in DEVICES:
        return device, 0
    kind, _, index = device.partition(":")
    if kind == "cuda" and index.isdigit():
        return "cuda", int(index)
    raise InputError(f"unknown device {device!r}; choose one of {DEVICES} or cuda:N (N = GPU index)")


def resolve_device(device: str, kind: str) -> tuple[str, int, str]:
    """(cpu | cuda, GPU index, why not cuda). With ``auto``, torch is asked about CUDA only when a CUDA
    backend for this kind of model file is installed, so the onnxruntime-CPU path never imports torch."""
    want, index = parse_device(device)
    if want == "auto":
        if not _gpu_backend_installed(kind):
            return "cpu", 0, "no CUDA backend for ONNX installed (no tensorrt, no onnxruntime CUDA provider)"
        return ("cuda", 0, "") if _cuda_available() else ("cpu", 0, "no CUDA device")
    if want == "cuda":
        if not _cuda_available():
            raise InputError(f"--device {device}: no CUDA device is visible to torch on this machine")
        n = _cuda_device_count()
        if index >= n:
            raise InputError(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return want, index, "--device cpu" if want == "cpu" else ""


def open_runner(
    model: str | os.PathLike[str] | ModelFile,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    engine_cache_dir: str | os.PathLike[str] | None = None,
    *,
    max_batch: int | None = None,
    intra_op_threads: int | None = None,
    compile: bool = False,
    parity_feeds: Feeds | FeedsFactory | None = None,
    log: Any = None,
    channels_last: bool | None = None,
) -> BaseRunner:
    """Open (and load) the runner for a checkpoint or exported ONNX file; ``runner.reason`` says why.

    ``backend="auto"`` takes the fastest one that works here, in the order TensorRT (tensorrt + CUDA + an
    ONNX file) > onnxruntime-CUDA > torch-CUDA (checkpoint) > onnxruntime-CPU > torch-CPU. A GPU candidate
    that fails to start (missing provider, no driver, a stale engine) is skipped and the failure is named in
    the reason. ``parity_feeds`` lets TensorRT build an engine on a cache miss. ``channels_last`` (torch
    only): None = the runner's default (on). The returned runner is
    already loaded; use it as a context manager to release it.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    mf = open_model(model)  # ModelFileError names the file if it is neither checkpoint nor ONNX
    kind, path = mf.kind, mf.path
    dev, gpu_index, no_cuda = resolve_device(device, kind)
    prec = None if precision == "auto" else precision

    def torch_runner(on: str) -> BaseRunner:
        p = prec or ("fp16" if on == "cuda" else "fp32")
        where = f"cuda:{gpu_index}" if on == "cuda" else on
        return TorchRunner(
            mf, device=where, precision=p, compile=compile, max_batch=max_batch, channels_last=channels_last
        )

    def ort_runner(provider: str) -> BaseRunner:
        return OrtRunner(
            mf,
            provider=provider,
            device_id=gpu_index,
            precision=prec,
            intra_op_threads=intra_op_threads,
            batch_size=batch_size,
            max_batch=max_batch,
        )

    def trt_runner() -> BaseRunner:
        return TensorRTRunner(
            mf,
            precision=prec or "fp16",
            batch_size=batch_size,
            max_batch=max_batch,
            engine_cache_dir=engine_cache_dir,
            device_id=gpu_index,
            parity_feeds=parity_feeds,
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
    candidates: list[tuple[str, Callable[[], BaseRunner]]] = []  # GPU ones first, then CPU ones
    if dev == "cuda":
        gpu = f"{_cuda_name(gpu_index)} (cuda:{gpu_index})"
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
        skipped.append(no_cuda)
    n_gpu = len(candidates)
    if dev != "cuda" or device == "auto":  # an explicit --device cuda[:N] never falls back to the CPU
        if kind == "onnx":
            candidates.append(("onnxruntime on CPU", lambda: ort_runner("cpu")))
        else:
            if dev == "cpu":
                skipped.append("onnxruntime-CPU needs an exported ONNX file")
            candidates.append(("torch on CPU", lambda: torch_runner("cpu")))

    for i, (label, make) in enumerate(candidates):
        on_gpu = i < n_gpu
        try:
            runner = make()
            runner.activate()
        except Exception as e:  # noqa: BLE001 - a GPU candidate may fail in any library's own way
            if not on_gpu and not isinstance(e, (InputError, XbmdError, ImportError, RuntimeError)):
                raise  # a CPU backend failing in an unexpected way is a bug: show it
            if not on_gpu and isinstance(e, ModelFileError) and not isinstance(e, StaleEngineError):
                raise  # the file itself is bad: no other backend will do better
            # on a GPU, a TensorRT parse/IO error, an engine that will not load, a provider that will not
            # start or an unexpected exception type all mean "try the next backend", with the reason kept
            skipped.append(f"{label}: {type(e).__name__}: {e}")
            continue
        why = f"fastest available: {label}"
        if skipped:
            why += " (skipped: " + "; ".join(skipped) + ")"
        runner.reason = why
        return runner
    raise InputError(f"{path}: no backend could run this model: " + "; ".join(skipped))
