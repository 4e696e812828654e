"""A CPU stand-in with ``gpu_j2k.GpuJ2KDecoder``'s interface, so the GPU JPEG 2000 plumbing runs on CPU torch.

``decode(frames)`` -> per codestream a (H, W) integer torch tensor with the codestream's native sample type
(unsigned 16-bit for a 9-16-bit unsigned codestream, int16 for a signed one: what nvImageCodec returns with
``allow_any_depth``), or None (reason in ``errors``) when the decode fails or ``reject`` says so. The decode
is a full-resolution one through pylibjpeg-openjpeg (``openjpeg.decode``, the library pydicom's pylibjpeg
plugin calls for JPEG 2000).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

NAME = "cpu stand-in for nvImageCodec (tests)"


class CpuJ2KStandIn:
    name = NAME

    def __init__(self, reject: Callable[[bytes], bool] | None = None) -> None:
        self.reject = reject
        self.errors: list[str | None] = []
        self.calls: list[int] = []  # batch sizes seen (the loop decodes a batch's codestreams together)

    def decode(self, frames: list[Any]) -> list[Any]:
        import openjpeg
        import torch

        self.calls.append(len(frames))
        out: list[Any] = []
        self.errors = []
        for f in frames:
            if self.reject is not None and self.reject(bytes(f)):
                out.append(None)
                self.errors.append("rejected by the stand-in")
                continue
            try:
                a = openjpeg.decode(bytes(f))
            except Exception as e:  # noqa: BLE001 - nvImageCodec answers None for what it cannot decode
                out.append(None)
                self.errors.append(f"{type(e).__name__}: {e}")
                continue
            out.append(torch.from_numpy(a.copy()))
            self.errors.append(None)
        return out
