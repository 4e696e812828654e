"""JPEG 2000 decode on the GPU through nvImageCodec (``nvidia-nvimgcodec-cu13``), when it imports.

Lazy: nothing here is imported unless a CUDA run asks for it; ``status()`` says which JPEG 2000 decoder is
active (``xbmd-batch doctor`` lists it). The CPU fallback is the resolution-aware Pillow/openjpeg decode in
``dicom_io`` (decode only the wavelet levels the model needs).

Resolution: nvImageCodec's Python API as documented (docs.nvidia.com/cuda/nvimagecodec, py_api and samples,
read for issue 11: ``Decoder.decode(CodeStream | list, params=DecodeParams)``, ROI decode through a region)
exposes no wavelet resolution level, so the
codestream is decoded at full resolution on the GPU and step 1 of preprocessing (the padding value, and
for a version-3 card block means with the CPU path's factor: ``preprocess.reduce_factor``) runs there too
(``reduce_on_device``); the result is a ``preprocess.Reduced`` for ``preprocess_torch.finish_batch``. This is
the definition for a full-resolution decode exactly (version 3: up to OpenCV's integer rounding of the CPU
path's block means, <= 0.5 stored units).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.preprocess import Reduced, reduce_factor

__all__ = ["status", "GpuJ2KDecoder", "reduce_on_device"]


def status() -> tuple[bool, str]:
    """(active, why): nvImageCodec importable, a CUDA device present."""
    try:
        from nvidia import nvimgcodec
    except ImportError as e:
        return False, f"nvImageCodec not installed ({e}); JPEG 2000 uses the CPU reduced decode"
    version = getattr(nvimgcodec, "__version__", "?")
    try:
        import torch

        if not torch.cuda.is_available():
            return False, f"nvImageCodec {version} installed but no CUDA device; CPU reduced decode"
    except ImportError:
        return False, f"nvImageCodec {version} installed but torch is missing; CPU reduced decode"
    return True, f"nvImageCodec {version} (GPU decode at full resolution, block means on the GPU)"


class GpuJ2KDecoder:
    """Batched JPEG 2000 codestreams -> integer (H, W) torch tensors on ``device``."""

    def __init__(self, device: Any = "cuda") -> None:
        from nvidia import nvimgcodec

        self._nv = nvimgcodec
        self.device = device
        self._decoder = nvimgcodec.Decoder()
        # Stored values unchanged: no colour conversion, native bit depth (12/16-bit samples stay uint16).
        self._params = nvimgcodec.DecodeParams(
            allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED
        )

    def decode(self, frames: list[bytes]) -> list[Any]:
        import torch

        streams = [self._nv.CodeStream(bytes(f)) for f in frames]
        images = self._decoder.decode(streams, params=self._params)
        out = []
        for img in images:
            if img is None:
                raise ValueError("nvImageCodec could not decode a JPEG 2000 codestream")
            t = torch.as_tensor(img, device=self.device)  # __cuda_array_interface__: (H, W, C)
            out.append(t[..., 0] if t.ndim == 3 else t)
        return out


def _edge_value_torch(x: Any, band: int) -> float:
    """``preprocess._edge_value`` in torch: median (numpy's: mean of the two middle values) of the border."""
    import torch

    b = max(1, min(band, x.shape[0] // 2, x.shape[1] // 2))
    border = torch.cat(
        [x[:b, :].reshape(-1), x[-b:, :].reshape(-1), x[:, :b].reshape(-1), x[:, -b:].reshape(-1)]
    )
    step = max(1, border.numel() // 20000)
    return float(torch.quantile(border[::step].to(torch.float64), 0.5))


def reduce_on_device(
    pixels: Any, cfg: PreprocessConfig, scale: float, offset: float, signed_bits: int | None = None
) -> Reduced:
    """Step 1 of preprocessing on a full-resolution decode already on the device: the padding value and, for
    a version-3 card, block means (partial last blocks = mean of what they hold, as
    ``preprocess.block_reduce``)."""
    import torch

    x = pixels.to(torch.float32)
    if signed_bits:  # codestream unsigned, dataset signed: two's complement as pydicom does
        x = torch.where(x >= 2 ** (signed_bits - 1), x - 2**signed_bits, x)
    h, w = x.shape
    fill = _edge_value_torch(x, max(1, round(0.01 * min(h, w))))
    k = reduce_factor((h, w), cfg)
    if k > 1:  # ceil_mode without padding divides a partial window by the pixels it holds
        x = torch.nn.functional.avg_pool2d(x[None, None], k, stride=k, ceil_mode=True)[0, 0]
    return Reduced(x, fill, scale, offset, k, 0.0, (int(h), int(w)))


def block_means_reference(x: np.ndarray, k: int) -> np.ndarray:
    """Plain numpy block means (used by the test to pin ``reduce_on_device`` without a GPU)."""
    h, w = x.shape
    out = np.zeros((-(-h // k), -(-w // k)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i * k : (i + 1) * k, j * k : (j + 1) * k].mean()
    return out
