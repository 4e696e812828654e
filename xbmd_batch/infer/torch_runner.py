"""The torch runner: the reference implementation, the nn.Module itself."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from xbmd_batch.defaults import TORCH_PRECISIONS
from xbmd_batch.errors import InputError
from xbmd_batch.infer.base import BaseRunner
from xbmd_batch.infer.model_file import ModelFile, open_model

if TYPE_CHECKING:
    from torch import nn

    from xbmd_batch.modelcard import ModelCard


@contextlib.contextmanager
def ieee_fp32(torch: Any) -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions while inside (restored after), so torch's "fp32" is IEEE
    fp32 like TensorRT's (TF32 flag cleared) and onnxruntime-CUDA's (``use_tf32=0``). torch 2.14 defaults:
    matmul "none" (no TF32), cuDNN conv "tf32"."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


class TorchRunner(BaseRunner):
    """The reference implementation: the nn.Module itself.

    CPU: fp32 under ``inference_mode``. CUDA: fp16/bf16 autocast (fp32 on request). channels_last weights
    and image layout on both (faster convs on tensor cores, and in oneDNN on CPU), optional
    ``torch.compile``, inputs staged through reusable pinned host buffers and copied with
    ``non_blocking=True`` on a private stream. A feed that is already a torch tensor on this device
    (on-device preprocessing) is used where it lies: no host copy, no staging.
    """

    backend = "torch"

    def __init__(
        self,
        model: str | os.PathLike[str] | ModelFile | nn.Module,
        card: ModelCard | None = None,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        channels_last: bool | None = None,
        compile: bool = False,
        max_batch: int | None = None,
    ) -> None:
        if isinstance(model, str | os.PathLike | ModelFile):
            mf: ModelFile | None = open_model(model)
            if mf.kind != "checkpoint":
                raise InputError(
                    f"{mf.path}: the torch backend needs the training checkpoint (.pt), not an ONNX file"
                )
            self._module: Any = None
        else:
            mf, self._module = None, model
            if card is None:
                raise InputError("TorchRunner(model_module) needs the model's card")
        device = "cuda:0" if device == "cuda" else device
        if device == "cpu" and precision != "fp32":
            raise InputError(f"torch on CPU runs fp32 only (asked for {precision})")
        if precision not in TORCH_PRECISIONS:
            raise InputError(f"unknown precision {precision!r} ({', '.join(TORCH_PRECISIONS)})")
        super().__init__(card, device, precision, mf, max_batch)
        # channels_last (NHWC) weights: tensor-core convs on CUDA, and oneDNN's NHWC kernels on CPU: 1.26x the
        # NCHW model time at batch 16 on the 2-core VM (interleaved, 8 x 3 runs each, issue 11; outputs equal
        # within 7e-6 g/cm^2). The 1-channel input is the same memory in either layout. Default (None): on for
        # a module this runner builds, and on CUDA; a caller's own CPU module is not converted in place.
        self.channels_last = (
            (device.startswith("cuda") or mf is not None) if channels_last is None else channels_last
        )
        self.compile = compile
        self._fwd: Any = None
        self._pinned: dict[str, Any] = {}
        self._stream: Any = None
        self._dev: Any = None

    def _load(self) -> None:
        import torch

        from xbmd_batch.model import ExportWrapper

        if self._module is None:
            assert self.model is not None
            self._card = self.model.card
            self._module = self.model.build_module()
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

    def takes_tensor(self, t: Any) -> bool:
        import torch

        return bool(t.device == torch.device(self.device))

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
                bmd, attn = self._fwd(*(_as_tensor(torch, feeds[n]) for n in names))
                return {out_names[0]: bmd.numpy(), out_names[1]: attn.numpy()}
            if any(torch.is_tensor(feeds[n]) for n in names):  # made on the current stream: wait for it
                self._stream.wait_stream(torch.cuda.current_stream(self._dev))
            with torch.cuda.stream(self._stream):
                xs = [
                    feeds[n]
                    if torch.is_tensor(feeds[n])
                    else self._host(n, feeds[n]).to(self._dev, non_blocking=True)
                    for n in names
                ]
                if self.channels_last:
                    xs[0] = xs[0].contiguous(memory_format=torch.channels_last)
                if self.precision == "fp32":
                    with ieee_fp32(torch):  # "fp32" means fp32 here too (cuDNN convs default to TF32)
                        bmd, attn = self._fwd(*xs)
                else:
                    dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
                    with torch.autocast("cuda", dtype=dtype):
                        bmd, attn = self._fwd(*xs)
                host = [t.float().to("cpu", non_blocking=True) for t in (bmd, attn)]
            self._stream.synchronize()
            return {out_names[0]: host[0].numpy(), out_names[1]: host[1].numpy()}


def _as_tensor(torch: Any, x: Any) -> Any:
    return x if torch.is_tensor(x) else torch.from_numpy(x)
