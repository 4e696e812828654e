"""The machine half of an engine's identity, and imports of tensorrt / CUDA torch with actionable errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xbmd_batch.errors import TensorRTUnavailableError


def import_tensorrt() -> Any:
    """``import tensorrt`` with an actionable message when it is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailableError(
            f"the tensorrt package is not importable ({e}); install the tensorrt extra: "
            f"pip install 'xbmd-batch[tensorrt]' --extra-index-url https://pypi.nvidia.com (or from a "
            f"wheelhouse, docs/gpu.md)"
        ) from e
    return trt


def import_torch_cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("TensorRT needs a CUDA GPU, and torch sees none on this machine")
    return torch


def is_strongly_typed_only(trt: Any) -> bool:
    """TensorRT >= 11 has no weak typing: precision comes from the ONNX graph's types."""
    return not hasattr(trt.BuilderFlag, "FP16")


@dataclass(frozen=True)
class DeviceInfo:
    """The machine half of an engine's identity."""

    gpu_name: str
    compute_capability: str  # "9.0"
    trt_version: str

    @classmethod
    def current(cls, device_id: int = 0) -> DeviceInfo:
        trt = import_tensorrt()
        torch = import_torch_cuda()
        major, minor = torch.cuda.get_device_capability(device_id)
        return cls(torch.cuda.get_device_name(device_id), f"{major}.{minor}", str(trt.__version__))
