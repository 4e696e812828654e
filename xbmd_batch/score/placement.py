"""Where preprocessing finishes (``score --preprocess-device auto|cpu|cuda``), decided in two steps.

1. ``plan_preprocess`` (setup, before ``--out`` is created; no runner yet, because the decode pool starts
   while the model loads): ``cpu`` -> decode workers preprocess completely (the default path, unchanged);
   ``cuda`` -> workers hand over reduced integer images (``DecodePool(handoff="reduced")``) and batches are
   finished on the runner's CUDA device; ``auto`` -> ``cpu`` finishing for now, also when the runner will
   be on a CUDA device (the same device resolution ``infer.select.open_runner`` uses; for an ONNX file
   without a CUDA backend this imports no torch), because the one GPU measurement found the device path
   slower (``MEASURED``). ``_auto_device`` is where auto decides for the device on grounds known before the
   header pass: a clause per case that a GPU run has measured faster. A version <= 2 preprocessing
   definition has no on-device path.
2. ``plan_j2k`` (after the header pass, when the transfer syntaxes are known; still before ``--out``):
   which decoder takes JPEG 2000. With the reduced hand-off and ``gpu_j2k.status()`` active it is
   nvImageCodec on the GPU (``score/j2k_device.py``; the workers hand over codestreams); ``auto`` also picks
   the device path for that reason alone when the runner will be on CUDA, nvImageCodec is active and the plan
   holds JPEG 2000 files. The GPU decoder is built (and self-tested) here, so a broken install is known
   before the run starts (the JPEG 2000 files then stay on the workers' CPU decode, with the reason).
3. ``finish_device`` (once the runner is open): the torch device that finishes the batches -- the runner's
   own device (``cuda:N``), so its image feed is already where the model reads it.

``Placement.torch_device`` pins the finishing device regardless of the runner: an internal hook, used by the
tests to run the reduced hand-off + batched torch finishing on CPU torch (no GPU in CI); not a CLI option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
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
    j2k: str = "cpu"  # "cpu": workers decode JPEG 2000 | "nvimgcodec": decoded on the GPU in the loop
    j2k_reason: str = ""
    # the GPU decoder plan_j2k built; internal/test hook: a decoder set here (a CPU stand-in) is kept
    j2k_decoder: Any = field(default=None, compare=False, repr=False)

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
            "j2k": {"decoder": self.j2k_decoder_name(), "reason": self.j2k_reason},
        }

    def j2k_decoder_name(self) -> str:
        if self.j2k == "nvimgcodec":
            return str(getattr(self.j2k_decoder, "name", type(self.j2k_decoder).__name__))
        return "cpu-reduced (pillow-openjpeg in the decode workers)"


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


def plan_j2k(
    p: Placement,
    n_j2k: int,
    card: Any,
    model_kind: str,
    backend: str,
    device: str,
    engine: str = "local",
    make_decoder: Any = None,
) -> Placement:
    """Step 2 (module docstring): ``p`` with its JPEG 2000 decoder decided; ``n_j2k`` = JPEG 2000 files in
    the plan. ``make_decoder(device)`` builds the GPU decoder (default ``gpu_j2k.GpuJ2KDecoder``)."""
    if p.j2k_decoder is not None:  # pinned by the caller (tests: a CPU stand-in with the decoder's interface)
        if p.handoff != "reduced":
            raise ValueError("a JPEG 2000 decoder needs the reduced hand-off")
        return dataclasses.replace(p, j2k="nvimgcodec", j2k_reason=p.j2k_reason or "decoder given")
    if n_j2k == 0:
        return dataclasses.replace(p, j2k="cpu", j2k_reason="no JPEG 2000 file in the plan")
    if p.handoff == "image" and not _auto_may_use_device(p, card, engine):
        return dataclasses.replace(
            p, j2k="cpu", j2k_reason=f"preprocessing in the decode workers ({p.reason})"
        )
    from xbmd_batch.gpu_j2k import status

    active, why = status()
    if not active:
        return dataclasses.replace(p, j2k="cpu", j2k_reason=why)
    index = p.gpu_index
    if p.handoff == "image":  # auto chose the workers; JPEG 2000 on the GPU is worth the device path
        from xbmd_batch.infer.select import resolve_device

        runner_dev, index, why_cpu = resolve_device(device, model_kind)
        if backend == "tensorrt":
            runner_dev = "cuda"
        if runner_dev != "cuda":
            return dataclasses.replace(p, j2k="cpu", j2k_reason=f"the runner's device is the CPU ({why_cpu})")
    if make_decoder is None:
        from xbmd_batch.gpu_j2k import GpuJ2KDecoder as make_decoder
    try:
        decoder = make_decoder(f"cuda:{index}")
    except Exception as e:  # noqa: BLE001 - any failure of the GPU decoder: the CPU decode, with the reason
        return dataclasses.replace(
            p,
            j2k="cpu",
            j2k_reason=f"nvImageCodec failed its self-test ({type(e).__name__}: {e}); CPU decode",
        )
    where = f"{n_j2k} JPEG 2000 file(s) decoded on cuda:{index} by {getattr(decoder, 'name', 'nvImageCodec')}"
    if p.handoff == "image":
        return dataclasses.replace(
            p,
            handoff="reduced",
            reason=f"auto: the runner is on cuda:{index} and {where}",
            gpu_index=index,
            j2k="nvimgcodec",
            j2k_reason=why,
            j2k_decoder=decoder,
        )
    return dataclasses.replace(p, j2k="nvimgcodec", j2k_reason=f"{where}; {why}", j2k_decoder=decoder)


def _auto_may_use_device(p: Placement, card: Any, engine: str) -> bool:
    """An ``auto`` placement that left preprocessing to the workers, where the device path is possible (local
    engine, a version >= 3 definition): the JPEG 2000 clause may still pick the device path."""
    from xbmd_batch.preprocess import LEGACY_VERSIONS

    return p.requested == "auto" and engine == "local" and card.preprocess.version not in LEGACY_VERSIONS
