"""Running one TensorRT engine: ``TrtExecutor`` (buffers, shapes, ``execute_async_v3``) and ``EngineRunner``,
the runner protocol over an engine file that already exists (the builder's parity candidate; the base of
``TensorRTRunner``, which first gets the engine from the cache)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xbmd_batch.errors import InputError, StaleEngineError, XbmdError
from xbmd_batch.infer.base import BaseRunner
from xbmd_batch.infer.tensorrt.device import import_tensorrt, import_torch_cuda

if TYPE_CHECKING:
    import numpy as np

    from xbmd_batch.infer.model_file import ModelFile
    from xbmd_batch.modelcard import ModelCard


class TrtExecutor:
    """Runs one engine: torch CUDA tensors as device buffers (allocated once at max batch), pinned host
    staging buffers, ``set_input_shape`` per call (so the last partial batch needs no padding), and
    ``execute_async_v3`` on a private torch CUDA stream."""

    def __init__(self, engine_path: str | os.PathLike[str], device_id: int = 0) -> None:
        import numpy as np

        trt = import_tensorrt()
        torch = import_torch_cuda()
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


class EngineRunner(BaseRunner):
    """The runner protocol over an existing engine file (no cache lookup, no build)."""

    backend = "tensorrt"

    def __init__(
        self,
        engine_path: str | os.PathLike[str] | None,
        card: ModelCard,
        *,
        precision: str,
        model: ModelFile | None = None,
        device_id: int = 0,
        max_batch: int | None = None,
    ) -> None:
        super().__init__(card, f"cuda:{device_id}", precision, model, max_batch)
        self.engine_path = Path(engine_path) if engine_path is not None else None
        self.device_id = device_id
        self._exec: Any = None

    def _load(self) -> None:
        from xbmd_batch.onnx_card import check_io_shapes

        assert self.engine_path is not None
        ex = TrtExecutor(self.engine_path, self.device_id)
        try:
            ins, outs = ex.io_shapes()
            check_io_shapes(ins, outs, self.card, source=str(self.engine_path))
        except BaseException:
            ex.close()
            raise
        self._exec = ex
        self.max_batch = ex.max_batch

    def _unload(self) -> None:
        if self._exec is not None:
            self._exec.close()
        self._exec = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._exec.infer(feeds)
