"""Where preprocessing finishes (``score --preprocess-device auto|cpu|cuda``), decided in two steps.

1. ``plan_preprocess`` (setup, before ``--out`` is created; no runner yet, because the decode pool starts
   while the model loads): ``cpu`` -> decode workers preprocess completely (the default path, unchanged);
   ``cuda`` -> workers hand over reduced integer images (``DecodePool(handoff="reduced")``) and batches are
   finished on the runner's CUDA device; ``auto`` -> ``cpu`` finishing for now, also when the runner will
   be on a CUDA device (the same device resolution ``infer.select.open_runner`` uses; for an ONNX file
   without a CUDA backend this imports no torch), because the one GPU measurement found the device path
   slower (``MEASURED``). ``_auto_device`` is where auto decides for the device: a clause per case that a
   GPU run has measured faster (e.g. a JPEG 2000 cohort with GPU decode). A version <= 2 preprocessing
   definition has no on-device path.
2. ``finish_device`` (once the runner is open): the torch device that finishes the batches -- the runner's
   own device (``cuda:N``), so its image feed is already where the model reads it.

``Placement.torch_device`` pins the finishing device regardless of the runner: an internal hook, used by the
tests to run the reduced hand-off + batched torch finishing on CPU torch (no GPU in CI); not a CLI option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xbmd_batch.defaults import PREPROCESS_DEVICES
from xbmd_batch.errors import InputError

# Why auto does not finish on the GPU: the one end-to-end GPU measurement of both paths (SYNTHETIC 256-image
# cohort of ~2000-px uncompressed images, torch fp16, batch 128; benchmarks/results/gpu_first_light_h200).
# Replace it (and let _auto_device choose the device) once a GPU run measures the device path faster.
MEASURED = (
    "--preprocess-device cuda measured slower than CPU finishing (261 vs 738 images/s end to end, "
    "one H200, 2026-11-29, torch fp16 batch 128, SYNTHETIC uncompressed 2000-px cohort)"
)


@dataclass(frozen=True)
class Placement:
    requested: str  # auto | cpu | cuda
    handoff: str  # "image": workers finish (CPU) | "reduced": batches are finished by torch on a device
    reason: str
    gpu_index: int = 0
    torch_device: str | None = None  # internal/test hook: finish here whatever the runner's device

    def finish_device(self, runner: Any) -> str | None:
        """The torch device that finishes batches (None: the decode workers did)."""
        if self.handoff == "image":
            return None
        if self.torch_device is not None:
            return self.torch_device
        if str(runner.device).startswith("cuda"):
            return str(runner.device)
        # auto planned for a CUDA runner, but every GPU backend failed to start: finish with torch on CPU;
        # an explicit --preprocess-device cuda keeps its promise (the CPU runner gets a host copy)
        return f"cuda:{self.gpu_index}" if self.requested == "cuda" else "cpu"

    def console_line(self, finish: str | None) -> str | None:
        """What the console says about it: where batches are finished, or why auto kept the decode workers
        although the runner is on a GPU (None: nothing worth a line)."""
        if finish is not None:
            return f"preprocessing finished on {finish} ({self.reason})"
        if self.requested == "auto" and self.reason.startswith("auto:"):
            return f"preprocessing in the decode workers ({self.reason})"
        return None

    def describe(self, finish: str | None) -> dict[str, Any]:
        """run.json's ``preprocess`` entry."""
        return {
            "requested": self.requested,
            "device": finish or "cpu",
            "where": "decode workers" if finish is None else "batched on the device (reduced hand-off)",
            "reason": self.reason,
        }


def plan_preprocess(
    requested: str, card: Any, model_kind: str, backend: str, device: str, engine: str = "local"
) -> Placement:
    """Step 1 (module docstring). InputError for a request this machine or model cannot honour."""
    from xbmd_batch.preprocess import LEGACY_VERSIONS

    if requested not in PREPROCESS_DEVICES:
        raise InputError(
            f"--preprocess-device {requested!r} is unknown; choose one of {list(PREPROCESS_DEVICES)}"
        )
    if requested == "cpu":
        return Placement("cpu", "image", "--preprocess-device cpu")
    if engine != "local":  # score/ray_engine.py: its decode tasks preprocess completely
        if requested == "cuda":
            raise InputError(
                "--preprocess-device cuda needs the local engine (the Ray engine's decode tasks preprocess "
                "on the CPU); use --preprocess-device cpu or auto with --engine ray"
            )
        return Placement("auto", "image", f"--engine {engine}: its decode tasks preprocess")
    version = card.preprocess.version
    if version in LEGACY_VERSIONS:
        why = f"this model's preprocessing (version {version}) has no on-device path"
        if requested == "cuda":
            raise InputError(f"--preprocess-device cuda: {why}; use --preprocess-device cpu")
        return Placement("auto", "image", f"{why}: decode workers preprocess")
    from xbmd_batch.infer.select import parse_device, resolve_device

    if requested == "cuda":
        if not _torch_cuda():
            raise InputError(
                "--preprocess-device cuda: no CUDA device is visible to torch on this machine "
                "(use --preprocess-device cpu or auto)"
            )
        if parse_device(device)[0] == "cpu":
            raise InputError(
                "--preprocess-device cuda finishes batches on the runner's CUDA device, but the runner "
                f"runs on the CPU here (--device {device}); use --device cuda or --preprocess-device cpu"
            )
    runner_dev, index, why_cpu = resolve_device(device, model_kind)  # what open_runner will resolve
    if backend == "tensorrt":
        runner_dev = "cuda"  # (open_runner refuses tensorrt without CUDA)
    if runner_dev != "cuda":
        if requested == "cuda":
            raise InputError(
                f"--preprocess-device cuda: the runner would not run on a CUDA device ({why_cpu}); "
                "install a CUDA backend for this model (docs/gpu.md) or use --preprocess-device cpu"
            )
        return Placement(
            "auto", "image", f"the runner's device is the CPU ({why_cpu}): decode workers preprocess"
        )
    where = f"cuda:{index}"
    if requested == "cuda":
        return Placement("cuda", "reduced", "--preprocess-device cuda", gpu_index=index)
    why_device = _auto_device(card, where)
    if why_device is not None:
        return Placement("auto", "reduced", f"auto: {why_device}", gpu_index=index)
    return Placement(
        "auto",
        "image",
        f"auto: decode workers preprocess although the runner is on {where}: {MEASURED}; auto will prefer "
        f"the device once a GPU run measures it faster (--preprocess-device cuda forces it)",
        gpu_index=index,
    )


def _auto_device(card: Any, where: str) -> str | None:
    """Why ``auto`` should finish on the runner's CUDA device ``where`` (None: it should not). One clause per
    case a GPU run has measured faster than CPU finishing; none yet (``MEASURED``)."""
    return None


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return bool(torch.cuda.is_available())
