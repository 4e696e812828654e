"""Stage 6: gather decoded images (arriving in any order) into fixed-size model batches.

A preallocated [B, 1, S, S] buffer is reused, so batching costs one copy per image. The last, partial batch
is flushed at the end; runners accept any batch size up to their maximum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Batch:
    idx: np.ndarray  # int64 [b] plan indices
    images: np.ndarray  # float32 [b, 1, S, S] (a view; consumed before the next add); DeviceBatcher: a tensor
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (plan index, reason, message)


class Batcher:
    def __init__(self, batch_size: int, image_size: int) -> None:
        if batch_size < 1:
            raise ValueError("batch size must be >= 1")
        self.batch_size = batch_size
        self._buf = np.empty((batch_size, 1, image_size, image_size), dtype=np.float32)
        self._idx = np.empty(batch_size, dtype=np.int64)
        self._n = 0

    def add(self, idx: np.ndarray, images: np.ndarray) -> Iterator[Batch]:
        """Add images (and their plan indices); yield every batch that fills up."""
        k = 0
        while k < len(idx):
            take = min(self.batch_size - self._n, len(idx) - k)
            self._buf[self._n : self._n + take] = images[k : k + take]
            self._idx[self._n : self._n + take] = idx[k : k + take]
            self._n += take
            k += take
            if self._n == self.batch_size:
                self._n = 0
                yield Batch(self._idx.copy(), self._buf)

    def flush(self) -> Batch | None:
        """The last partial batch, if any."""
        if self._n == 0:
            return None
        n, self._n = self._n, 0
        return Batch(self._idx[:n].copy(), self._buf[:n])


class DeviceBatcher:
    """On-device preprocessing (``--preprocess-device cuda``): gathers ``preprocess.Reduced`` items, uploads
    each one's pixels to ``device`` as it arrives (straight from the decode pool's shared memory: no other
    host copy), and finishes a full batch on the device (``preprocess_torch.finish_batch``). ``Batch.images``
    is then a torch tensor [b, 1, S, S] on ``device``.

    On CUDA (``attach(pool)``): the slots an image comes from are page-locked once (``score/hostpin.py``), the
    uploads are ``non_blocking`` copies on the batcher's own stream, and after a task's copies an event is
    recorded and handed to the pool (``DecodePool.hold``): the slot group goes back to the workers only when
    that event has completed, not when the loop asks for the next task. Finishing runs on the same stream;
    the stream the runners take their feeds on (the current stream, which ``TorchRunner`` and TensorRT wait
    for, and onnxruntime synchronises) waits for the finished batch on the device, not on the host. So the
    host never waits per image: each upload runs while the loop goes on to the next decode task. (The
    runners still synchronise once per batch when they read their outputs back, so batch k+1's uploads are
    issued after batch k's compute returned.) On a CPU device the copy is made at once (a clone) and the
    group is free at once, as before; ``fence`` lets a test stand in for the CUDA event.
    """

    def __init__(
        self, batch_size: int, cfg: object, device: object = "cpu", fence: Any = None, j2k: Any = None
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch size must be >= 1")
        self.batch_size, self.cfg, self.device = batch_size, cfg, device
        # score/j2k_device.J2KDeviceStage: the batch's JPEG 2000 codestreams are decoded on the device when
        # the batch is finished (None: the workers decoded every image)
        self.j2k = j2k
        self._items: list[object] = []
        self._idx: list[int] = []
        self._fence = fence  # () -> object with query()/synchronize(), recorded after a task's copies
        self._pool: Any = None
        self._pinner: Any = None
        self._pin_off: str | None = None  # why the slots are not page-locked (XBMD_PIN_SLOTS=0)
        self._stream: Any = None
        self._cuda = str(device).startswith("cuda")
        if self._cuda:
            import torch

            self._stream = torch.cuda.Stream(device=torch.device(str(device)))
            if fence is None:
                self._fence = self._cuda_event

    def _cuda_event(self) -> Any:
        import torch

        ev = torch.cuda.Event()
        ev.record(self._stream)
        return ev

    def attach(self, pool: Any) -> None:
        """Read from ``pool``'s slot groups: page-lock the slots (CUDA) and defer each group's release until
        the copies out of it completed (``DecodePool.hold``)."""
        self._pool = pool
        span = pool.block_span() if hasattr(pool, "block_span") else None
        if self._cuda and span is not None:
            from xbmd_batch.score.hostpin import cuda_pinner, pinning_disabled

            self._pin_off = pinning_disabled()
            if self._pin_off is None:
                self._pinner = cuda_pinner(span)
                pool.on_close(self._pinner.close)

    def pinning(self) -> dict[str, Any] | None:
        """run.json: what was page-locked, or why not (None: not a CUDA hand-off from a pool)."""
        if self._pin_off is not None:
            from xbmd_batch.score.hostpin import disabled_report

            return disabled_report(self._pin_off)
        return None if self._pinner is None else self._pinner.report()

    def _upload(self, red: object) -> object:
        """The item with its pixels on the device (CUDA: queued on the batcher's stream). A JPEG 2000
        codestream (``dicom_io.Codestream``) stays as it is: ``_emit`` decodes it with its batch."""
        import dataclasses

        import torch

        if self.j2k is not None and not hasattr(red, "pixels"):
            return red
        if torch.is_tensor(getattr(red, "pixels", None)):  # decoded on the device already
            return red
        host = np.asarray(red.pixels)  # type: ignore[attr-defined]
        if not host.flags.c_contiguous:
            host = np.ascontiguousarray(host)
        px = torch.from_numpy(host)
        if not self._cuda:
            dev = px.to(self.device)
            if dev.data_ptr() == px.data_ptr():  # same memory (CPU device): own it, the slot is reused
                dev = dev.clone()
            return dataclasses.replace(red, pixels=dev)  # type: ignore[call-overload]
        if self._pinner is not None:
            self._pinner.ensure(host.ctypes.data, host.nbytes)  # False: pageable (by value, or it failed)
        with torch.cuda.stream(self._stream):
            # page-locked: a DMA on the batcher's stream (the slot group is held until it completed);
            # pageable: the driver has staged the source when the call returns
            dev = px.to(self.device, non_blocking=True)
        return dataclasses.replace(red, pixels=dev)  # type: ignore[call-overload]

    def _finish(self, items: list[object]) -> Any:
        from xbmd_batch.preprocess_torch import finish_batch

        if not self._cuda:
            return finish_batch(items, self.cfg, self.device)  # type: ignore[arg-type]
        import torch

        with torch.cuda.stream(self._stream):
            out = finish_batch(items, self.cfg, self.device)  # type: ignore[arg-type]
        consumer = torch.cuda.current_stream(out.device)
        consumer.wait_stream(self._stream)  # on the device: the runners' feed stream waits for the batch
        out.record_stream(consumer)  # made on our stream, read on the consumer's: no early reuse
        return out

    def _emit(self) -> Batch:
        """Finish the gathered items; an item that cannot be finished becomes a failure row (the batch is
        then finished item by item), while a sticky device error propagates (the loop stops on it)."""
        from xbmd_batch.errors import is_device_error

        items, idx = self._items, np.asarray(self._idx, dtype=np.int64)
        self._items, self._idx = [], []
        failed: list[tuple[int, str, str]] = []  # JPEG 2000 files that failed their CPU fallback too
        if self.j2k is not None:
            idx, items, failed = self._decode_j2k(idx, items)
            if not items:
                return Batch(idx, self._empty(), failed)
        try:
            return Batch(idx, self._finish(items), failed)
        except Exception as e:  # noqa: BLE001 - isolate the item that broke it
            if is_device_error(e):
                raise
        import torch

        good: list[int] = []
        out: list[object] = []
        failures: list[tuple[int, str, str]] = []
        for i, red in zip(idx, items, strict=True):
            try:
                out.append(self._finish([red]))
                good.append(int(i))
            except Exception as e1:  # noqa: BLE001
                if is_device_error(e1):
                    raise
                oom = "out of memory" in str(e1).lower()  # transient: a resume retries it
                why = "out_of_memory" if oom else f"decode_error:{type(e1).__name__}"
                failures.append((int(i), why, f"{type(e1).__name__}: {e1}"[:500]))
        images = torch.cat(out) if out else self._empty()
        return Batch(np.asarray(good, dtype=np.int64), images, failed + failures)

    def _empty(self) -> Any:
        """A batch with no image left (every item failed)."""
        import torch

        return torch.zeros((0, 1, 1, 1), device=self.device)  # type: ignore[arg-type]

    def _decode_j2k(
        self, idx: np.ndarray, items: list[object]
    ) -> tuple[np.ndarray, list[object], list[tuple[int, str, str]]]:
        """The batch's codestreams decoded on the device (on the batcher's stream, where the batch is then
        finished), CPU fallbacks uploaded like any other item."""
        import contextlib

        import torch

        with torch.cuda.stream(self._stream) if self._cuda else contextlib.nullcontext():
            idx, items, failed = self.j2k.resolve(idx, items)  # type: ignore[union-attr]
        return idx, [self._upload(r) for r in items], failed

    def add(self, idx: np.ndarray, reduced: list[object], group: int = -1) -> Iterator[Batch]:
        """Add decoded items (None = failed, skipped) of one task (``group``: the pool's slot group they lie
        in); yield every batch that fills up. Once the task's copies are all queued (or the caller stops
        early) the group is handed to the pool with a fence: it is reused only after the copies completed."""
        queued = False
        try:
            for i, red in zip(idx, reduced, strict=True):
                if red is None:
                    continue
                self._items.append(self._upload(red))
                self._idx.append(int(i))
                queued = True
                if len(self._items) == self.batch_size:
                    yield self._emit()
        except BaseException:  # the caller stopped early (GeneratorExit) or something failed
            if queued:
                try:
                    self._hold(group)
                except Exception:  # noqa: BLE001 - a failed device cannot record an event; keep the first error
                    pass
            raise
        if queued:
            self._hold(group)

    def _hold(self, group: int) -> None:
        if group >= 0 and self._pool is not None and self._fence is not None:
            self._pool.hold(group, self._fence())

    def flush(self) -> Batch | None:
        return self._emit() if self._items else None
