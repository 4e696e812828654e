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
    """Runs one engine with two buffer slots so copies overlap compute.

    Per slot: pinned host input slabs and device input buffers (torch tensors, allocated once at the
    profile's max batch), device and pinned host outputs. ``submit`` writes a batch into slot k's pinned slab,
    copies it to the device on the copy stream (``h2d_done[k]``), and enqueues ``execute_async_v3`` plus the
    D2H copies on the compute stream after waiting for that event; ``collect`` waits only for that slot's
    ``d2h_done`` event. So batch i+1's host write and H2D run while batch i computes (``infer_many`` keeps
    two in flight), and no call synchronizes the whole device. Every CUDA call runs under
    ``torch.cuda.device(device_id)``: ``--device cuda:N`` is honoured for allocation, streams and execution,
    not only while deserialising.
    A batch smaller than the profile's min is padded (repeat of its last row) and the outputs are sliced.

    An input that is already a CUDA tensor on this device (on-device preprocessing: ``score
    --preprocess-device cuda``) is bound by its own address (``set_tensor_address``): no host slab, no copy.
    The compute stream waits for the stream that wrote it, and the tensor is held until its slot is
    collected so the caching allocator cannot hand its memory out while the engine reads it.
    """

    SLOTS = 2

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
                    f"{self.engine_path}: TensorRT {trt.__version__} cannot load this engine (built by "
                    f"another TensorRT version or for another GPU?); rebuild it with "
                    f"`python -m export tensorrt MODEL.onnx --rebuild`"
                )
            self.engine = engine
            self.context = engine.create_execution_context()
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            lo, _opt, hi = engine.get_tensor_profile_shape(self.input_names[0], 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
            self.shapes = {n: tuple(int(d) for d in engine.get_tensor_shape(n)) for n in names}  # -1 = batch
            self.copy_stream = torch.cuda.Stream(device=self.device)
            self.compute_stream = torch.cuda.Stream(device=self.device)
            self._dev: list[dict[str, Any]] = []
            self._host: list[dict[str, Any]] = []
            for _ in range(self.SLOTS):
                dev, host = {}, {}
                for n in names:
                    np_dtype = trt.nptype(engine.get_tensor_dtype(n))
                    t_dtype = torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype
                    full = (self.max_batch, *self.shapes[n][1:])
                    dev[n] = torch.empty(full, dtype=t_dtype, device=self.device)
                    host[n] = torch.empty(full, dtype=t_dtype, pin_memory=True)
                self._dev.append(dev)
                self._host.append(host)
            self._h2d_done = [torch.cuda.Event() for _ in range(self.SLOTS)]
            self._d2h_done = [torch.cuda.Event() for _ in range(self.SLOTS)]
        self._next = 0
        self._pending: dict[int, int] = {}  # slot -> rows of the batch in flight there
        self._held: dict[int, dict[str, Any]] = {}  # slot -> device tensors bound in place (kept alive)

    def io_shapes(self) -> tuple[dict[str, tuple[int | None, ...]], dict[str, tuple[int | None, ...]]]:
        def dyn(s: tuple[int, ...]) -> tuple[int | None, ...]:
            return tuple(None if d < 0 else d for d in s)

        return (
            {n: dyn(self.shapes[n]) for n in self.input_names},
            {n: dyn(self.shapes[n]) for n in self.output_names},
        )

    def submit(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Enqueue one batch (1..max_batch rows); returns the slot to ``collect``. At most SLOTS in flight."""
        from xbmd_batch.infer.base import pad_batch

        torch = self._torch
        b = int(next(iter(feeds.values())).shape[0])
        if not 1 <= b <= self.max_batch:
            raise InputError(f"batch of {b} is outside this engine's profile (1..{self.max_batch})")
        k = self._next
        if k in self._pending:
            raise XbmdError("TrtExecutor: both slots are in flight; collect one before submitting")
        run = max(b, self.min_batch)
        host, dev = self._host[k], self._dev[k]
        with torch.cuda.device(self.device):
            feeds = pad_batch(feeds, run) if run > b else feeds  # (a device tensor is padded on the device)
            bound = {  # device tensors bound where they lie (converted on the device if dtype/place differ)
                n: feeds[n].to(self.device, dev[n].dtype).contiguous()
                for n in self.input_names
                if torch.is_tensor(feeds[n])
            }
            producer = torch.cuda.current_stream(self.device)  # the stream that wrote them
            self._d2h_done[k].synchronize()  # this slot's previous outputs were read and its H2D is done
            for n in self.input_names:
                if n not in bound:
                    host[n][:run].numpy()[...] = feeds[n]
            with torch.cuda.stream(self.copy_stream):
                for n in self.input_names:
                    if n not in bound:
                        dev[n][:run].copy_(host[n][:run], non_blocking=True)
                self._h2d_done[k].record(self.copy_stream)
            with torch.cuda.stream(self.compute_stream):
                self.compute_stream.wait_event(self._h2d_done[k])
                if bound:
                    self.compute_stream.wait_stream(producer)
                for n in (*self.input_names, *self.output_names):
                    t = bound.get(n, dev[n])
                    self.context.set_tensor_address(n, t.data_ptr())
                for n in self.input_names:
                    if not self.context.set_input_shape(n, (run, *self.shapes[n][1:])):
                        raise InputError(
                            f"TensorRT rejected input shape {(run, *self.shapes[n][1:])} for {n}"
                        )
                if not self.context.execute_async_v3(self.compute_stream.cuda_stream):
                    raise XbmdError(f"{self.engine_path}: TensorRT execution failed")
                for n in self.output_names:
                    host[n][:run].copy_(dev[n][:run], non_blocking=True)
                self._d2h_done[k].record(self.compute_stream)
        self._pending[k] = b
        self._held[k] = bound
        self._next = (k + 1) % self.SLOTS
        return k

    def collect(self, slot: int) -> dict[str, np.ndarray]:
        """Wait for one submitted batch; float32 numpy copies of its outputs (padding rows dropped)."""
        import numpy as np

        b = self._pending.pop(slot)
        self._d2h_done[slot].synchronize()
        self._held.pop(slot, None)  # the engine is done reading them
        host = self._host[slot]
        return {n: np.array(host[n][:b].numpy(), dtype=np.float32, copy=True) for n in self.output_names}

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch of at most ``max_batch`` rows, synchronously."""
        return self.collect(self.submit(feeds))

    def infer_many(self, batches: list[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Several batches with two in flight: batch i+1's copy overlaps batch i's compute."""
        out: list[dict[str, np.ndarray]] = []
        inflight: list[int] = []
        for feeds in batches:
            if len(inflight) == self.SLOTS:
                out.append(self.collect(inflight.pop(0)))
            inflight.append(self.submit(feeds))
        out.extend(self.collect(s) for s in inflight)
        return out

    def close(self) -> None:
        for s in list(self._pending):
            self._d2h_done[s].synchronize()
        self._pending.clear()
        self._held.clear()
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

    def takes_tensor(self, t: Any) -> bool:
        return t.device.type == "cuda" and (t.device.index or 0) == self.device_id

    def _unload(self) -> None:
        if self._exec is not None:
            self._exec.close()
        self._exec = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._exec.infer(feeds)

    def _infer_many(self, chunks: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return self._exec.infer_many(chunks)  # two batches in flight: copies overlap compute
