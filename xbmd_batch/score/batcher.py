"""Stage 6: gather decoded images (arriving in any order) into fixed-size model batches.

A preallocated [B, 1, S, S] buffer is reused, so batching costs one copy per image. The last, partial batch
is flushed at the end; runners accept any batch size up to their maximum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

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
    host copy, and the slot is free again at once), and finishes a full batch on the device
    (``preprocess_torch.finish_batch``). ``Batch.images`` is then a torch tensor [b, 1, S, S] on ``device``.
    """

    def __init__(self, batch_size: int, cfg: object, device: object = "cpu") -> None:
        if batch_size < 1:
            raise ValueError("batch size must be >= 1")
        self.batch_size, self.cfg, self.device = batch_size, cfg, device
        self._items: list[object] = []
        self._idx: list[int] = []

    def _upload(self, red: object) -> object:
        import dataclasses

        import torch

        px = torch.from_numpy(np.ascontiguousarray(red.pixels))  # type: ignore[attr-defined]
        dev = px.to(self.device, non_blocking=False)
        if dev.data_ptr() == px.data_ptr():  # same memory (CPU device): own it, the slot is reused
            dev = dev.clone()
        return dataclasses.replace(red, pixels=dev)  # type: ignore[call-overload]

    def _emit(self) -> Batch:
        """Finish the gathered items; an item that cannot be finished becomes a failure row (the batch is
        then finished item by item), while a sticky device error propagates (the loop stops on it)."""
        from xbmd_batch.errors import is_device_error
        from xbmd_batch.preprocess_torch import finish_batch

        items, idx = self._items, np.asarray(self._idx, dtype=np.int64)
        self._items, self._idx = [], []
        try:
            return Batch(idx, finish_batch(items, self.cfg, self.device))  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - isolate the item that broke it
            if is_device_error(e):
                raise
        import torch

        good: list[int] = []
        out: list[object] = []
        failures: list[tuple[int, str, str]] = []
        for i, red in zip(idx, items, strict=True):
            try:
                out.append(finish_batch([red], self.cfg, self.device))  # type: ignore[list-item]
                good.append(int(i))
            except Exception as e1:  # noqa: BLE001
                if is_device_error(e1):
                    raise
                oom = "out of memory" in str(e1).lower()  # transient: a resume retries it
                why = "out_of_memory" if oom else f"decode_error:{type(e1).__name__}"
                failures.append((int(i), why, f"{type(e1).__name__}: {e1}"[:500]))
        images = torch.cat(out) if out else torch.zeros((0, 1, 1, 1), device=self.device)  # type: ignore[arg-type]
        return Batch(np.asarray(good, dtype=np.int64), images, failures)

    def add(self, idx: np.ndarray, reduced: list[object]) -> Iterator[Batch]:
        """Add decoded items (None = failed, skipped); yield every batch that fills up."""
        for i, red in zip(idx, reduced, strict=True):
            if red is None:
                continue
            self._items.append(self._upload(red))
            self._idx.append(int(i))
            if len(self._items) == self.batch_size:
                yield self._emit()

    def flush(self) -> Batch | None:
        return self._emit() if self._items else None
