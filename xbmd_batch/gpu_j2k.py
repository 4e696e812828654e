"""JPEG 2000 decode on the GPU through nvImageCodec (``nvidia-nvimgcodec-cu13`` + ``nvidia-nvjpeg2k-cu13``).

Lazy: nothing here is imported unless a CUDA run asks for it; ``status()`` says whether the GPU decoder can
run here (``xbmd-batch doctor`` lists it). The CPU path is the resolution-aware Pillow/openjpeg decode in
``dicom_io`` (only the wavelet levels the model needs); it stays the fallback for every codestream the GPU
decoder rejects.

API used (nvImageCodec 0.9.0.20 from PyPI, checked against its Python module's docstrings and the 0.8.0
sources on GitHub, NVIDIA/nvImageCodec ``python/decoder.cpp``, ``python/decode_params.cpp``,
``extensions/nvjpeg2k/cuda_decoder.cpp``; docs.nvidia.com/cuda/nvimagecodec):
- ``Decoder(device_id=, max_num_cpu_threads=, backends=, options=)``; ``backends=[Backend(BackendKind.
  GPU_ONLY)]`` keeps the decode on the GPU (nvjpeg2k registers as GPU_ONLY): without it a codestream the GPU
  cannot take would be decoded by the bundled OpenCV on the CPU of the main process.
- ``Decoder.decode(srcs: list[CodeStream], *, images=None, params=None, cuda_stream=0)`` returns a list with
  ``None`` where a codestream could not be decoded; ``CodeStream(bytes)`` parses a codestream in memory.
- ``DecodeParams(apply_exif_orientation=True, color_spec=SRGB, allow_any_depth=False, sample_format=...)``:
  ``allow_any_depth=True`` keeps the native depth (nvjpeg2k: unsigned <= 8 bit -> uint8, 9-16 -> uint16,
  signed 9-16 -> int16, signed <= 8 refused), ``color_spec=UNCHANGED`` no colour conversion.
- The decoded ``Image`` is (H, W, C) in device memory and exports ``__dlpack__(stream=)`` /
  ``__cuda_array_interface__``; ``torch.from_dlpack`` passes torch's current stream, so the tensor is
  ordered after the decode without a host synchronisation.
- No reduced-resolution decode: ``DecodeParams`` has no resolution level / reduce factor in 0.8 or 0.9 (the
  nvjpeg2k extension calls nvjpeg2kDecodeParamsSetDecodeArea / SetRGBOutput / SetOutputFormat only;
  ``num_resolutions`` exists for encoding only). So the GPU decodes at full resolution, and images decoded
  here follow the full-decode definition of preprocessing: they differ from the CPU path's reduced decode by
  what that reduction costs against a full decode (docs/dicom.md: max 0.0015 g/cm2, mean 0.0005, 2000-px
  files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.preprocess import Reduced, reduce_factor

__all__ = ["status", "GpuJ2KDecoder", "reduce_on_device", "decode_codestreams", "Decoded"]


def _nvjpeg2k_lib() -> str | None:
    """Where libnvjpeg2k (the ``nvidia-nvjpeg2k-cu13`` wheel) is, looked up as nvImageCodec's extension does
    (its RUNPATH: ``site-packages/nvidia/nvjpeg2k/lib``, then /usr/local/cuda/lib64), or None."""
    try:
        import nvidia
    except ImportError:
        return None
    dirs = [os.path.join(p, "nvjpeg2k", "lib") for p in getattr(nvidia, "__path__", [])]
    dirs.append("/usr/local/cuda/lib64")
    for d in dirs:
        for name in ("libnvjpeg2k.so.0", "libnvjpeg2k.so"):
            if os.path.exists(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def status() -> tuple[bool, str]:
    """(active, why): nvImageCodec importable, libnvjpeg2k present, a CUDA device visible to torch. Cheap
    (no CUDA context); ``GpuJ2KDecoder`` then proves it with a real decode before a run relies on it."""
    try:
        from nvidia import nvimgcodec
    except ImportError as e:
        return False, f"nvImageCodec not installed ({e}); JPEG 2000 uses the CPU reduced decode"
    version = getattr(nvimgcodec, "__version__", "?")
    if _nvjpeg2k_lib() is None:
        return False, (
            f"nvImageCodec {version} installed but libnvjpeg2k is missing "
            "(pip install nvidia-nvjpeg2k-cu13); CPU reduced decode"
        )
    try:
        import torch

        if not torch.cuda.is_available():
            return False, f"nvImageCodec {version} installed but no CUDA device; CPU reduced decode"
    except ImportError:
        return False, f"nvImageCodec {version} installed but torch is missing; CPU reduced decode"
    return True, (
        f"nvImageCodec {version} + nvjpeg2k: JPEG 2000 decoded on the GPU at full resolution when "
        "preprocessing finishes on CUDA"
    )


class GpuJ2KDecoder:
    """Batched JPEG 2000 codestreams -> integer (H, W) torch tensors on ``device`` (None where rejected).

    ``probe`` decodes a small synthetic 16-bit codestream (made with Pillow's openjpeg) and compares it with
    what was encoded, so a run learns before it starts whether the GPU decoder really works here
    (RuntimeError otherwise)."""

    def __init__(self, device: Any = "cuda", probe: bool = True) -> None:
        import torch
        from nvidia import nvimgcodec

        self._nv = nvimgcodec
        self.device = torch.device(device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.name = f"nvimgcodec {getattr(nvimgcodec, '__version__', '?')} (nvjpeg2k, GPU)"
        # max_num_cpu_threads: the library's default is one thread per core, next to the decode workers that
        # already own the cores (the oversubscription issue 11 found with BLAS pools); 2: a guess, unmeasured
        self._decoder = nvimgcodec.Decoder(
            device_id=index,
            max_num_cpu_threads=2,
            backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)],
        )
        # Stored values unchanged: no colour conversion, native bit depth (12/16-bit samples stay 16-bit).
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.UNCHANGED, allow_any_depth=True
        )
        self.errors: list[str | None] = []  # why each item of the last decode() was rejected
        if probe:
            self._probe()

    def _probe(self) -> None:
        frame, want = probe_codestream()
        (got,) = self.decode([frame])
        if got is None or not np.array_equal(got.cpu().numpy().astype(np.int64), want.astype(np.int64)):
            raise RuntimeError(f"{self.name}: the self-test decode did not return the encoded values")

    def decode(self, frames: list[Any]) -> list[Any]:
        """One batch: a (H, W) integer tensor per codestream, or None (the reason in ``errors``)."""
        import torch

        out: list[Any] = [None] * len(frames)
        self.errors = [None] * len(frames)
        streams: list[Any] = []
        where: list[int] = []
        for i, f in enumerate(frames):
            try:
                streams.append(self._nv.CodeStream(bytes(f)))
                where.append(i)
            except Exception as e:  # noqa: BLE001 - unparsable here: the CPU path decides
                self.errors[i] = f"CodeStream: {type(e).__name__}: {e}"
        if not streams:
            return out
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            try:
                images = self._decoder.decode(streams, params=self._params, cuda_stream=stream.cuda_stream)
            except Exception as e:  # noqa: BLE001 - a batch-level failure: one by one, to isolate it
                images = []
                for s in streams:
                    try:
                        images.append(
                            self._decoder.decode(s, params=self._params, cuda_stream=stream.cuda_stream)
                        )
                    except Exception as e1:  # noqa: BLE001
                        del e1
                        images.append(None)
                del e
            for i, img in zip(where, images, strict=True):
                if img is None:
                    self.errors[i] = "nvImageCodec could not decode the codestream"
                    continue
                t = torch.from_dlpack(img)  # (H, W, C) on the decoder's device; stream-ordered
                if t.ndim == 3:
                    if t.shape[2] != 1:
                        self.errors[i] = f"decoded {t.shape[2]} components; expected one"
                        continue
                    t = t[..., 0]
                out[i] = t
        return out


def probe_codestream() -> tuple[bytes, np.ndarray]:
    """A lossless 16-bit J2K codestream holding 12-bit values (Pillow's openjpeg, no DICOM) and the values."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    want = rng.integers(0, 4096, size=(24, 40), dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(want).save(buf, format="JPEG2000", irreversible=False, no_jp2=True)  # mode I;16
    return buf.getvalue(), want


def _edge_value_torch(x: Any) -> Any:
    """``preprocess._edge_value`` in torch, as a 0-d device tensor (no host sync): the median (numpy's: mean
    of the two middle values) of the border band 1 % of the short side wide, every n-th value past 20,000."""
    import torch

    h, w = x.shape
    b = max(1, min(max(1, round(0.01 * min(h, w))), h // 2, w // 2))
    border = torch.cat(
        [x[:b, :].reshape(-1), x[-b:, :].reshape(-1), x[:, :b].reshape(-1), x[:, -b:].reshape(-1)]
    )
    step = max(1, border.numel() // 20000)
    return torch.quantile(border[::step].to(torch.float64), 0.5)


def _stored(pixels: Any, signed_bits: int | None) -> Any:
    """The stored values: the decoded integers as they are (finish_batch converts them chunk by chunk, so a
    batch of 2000-px images is not held in float32 here), or, for unsigned samples of a signed dataset, their
    two's complement in float32."""
    import torch

    if not signed_bits:
        return pixels
    x = pixels.to(torch.float32)
    if signed_bits:  # codestream unsigned, dataset signed: two's complement as pydicom does
        x = torch.where(x >= 2 ** (signed_bits - 1), x - 2**signed_bits, x)
    return x


def _step1(x: Any, fill: float, cfg: PreprocessConfig, scale: float, offset: float) -> Reduced:
    import torch

    h, w = x.shape
    k = reduce_factor((h, w), cfg)
    if k > 1:  # ceil_mode without padding divides a partial window by the pixels it holds
        x = torch.nn.functional.avg_pool2d(x.to(torch.float32)[None, None], k, stride=k, ceil_mode=True)[0, 0]
    return Reduced(x, fill, scale, offset, k, 0.0, (int(h), int(w)))


def reduce_on_device(
    pixels: Any, cfg: PreprocessConfig, scale: float, offset: float, signed_bits: int | None = None
) -> Reduced:
    """Step 1 of preprocessing on a full-resolution decode already on the device: the padding value and, for
    a version-3 card, block means (partial last blocks = mean of what they hold, as
    ``preprocess.block_reduce``). ``signed_bits``: unsigned samples of a signed dataset, reinterpreted as
    two's complement of that many bits (as pydicom does). One image; ``decode_codestreams`` does a batch
    with one host synchronisation for all padding values."""
    x = _stored(pixels, signed_bits)
    return _step1(x, float(_edge_value_torch(x)), cfg, scale, offset)


@dataclass
class Decoded:
    """``decode_codestreams``' answer for one codestream: a ``Reduced`` on the device, or why not."""

    reduced: Reduced | None
    error: str | None = None


def decode_codestreams(decoder: Any, items: list[Any], cfg: PreprocessConfig) -> list[Decoded]:
    """``dicom_io.Codestream`` items -> step 1 on the device, in one batch of ``decoder.decode``. A rejected
    codestream, or a decode whose shape or sign does not match the file, gets ``error`` (the caller falls
    back to the CPU path for it)."""
    import torch

    frames = [it.data for it in items]
    tensors = decoder.decode(frames)
    errors = list(getattr(decoder, "errors", None) or [None] * len(items))
    out: list[Decoded] = []
    good: list[tuple[int, Any]] = []  # (position, stored values as float32 on the device)
    for it, t, err in zip(items, tensors, errors, strict=True):
        out.append(Decoded(None))
        if t is None:
            out[-1].error = err or "rejected by the GPU decoder"
        elif tuple(t.shape) != tuple(it.full_shape):
            out[-1].error = f"decoded shape {tuple(t.shape)} != Rows/Columns {it.full_shape}"
        elif it.codestream_signed and not t.is_signed():
            out[-1].error = "signed codestream returned as unsigned samples"
        elif t.dtype not in (torch.uint8, torch.uint16, torch.int16, torch.int32):
            out[-1].error = f"unexpected sample type {t.dtype}"
        else:
            good.append((len(out) - 1, _stored(t, it.signed_bits)))
    if good:  # the padding values of the whole batch reach the host in one synchronisation
        fills = torch.stack([_edge_value_torch(x) for _, x in good]).tolist()
        for (k, x), fill in zip(good, fills, strict=True):
            it = items[k]
            out[k].reduced = _step1(x, float(fill), cfg, it.scale, it.offset)
    return out


def block_means_reference(x: np.ndarray, k: int) -> np.ndarray:
    """Plain numpy block means (used by the test to pin ``reduce_on_device`` without a GPU)."""
    h, w = x.shape
    out = np.zeros((-(-h // k), -(-w // k)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i * k : (i + 1) * k, j * k : (j + 1) * k].mean()
    return out
