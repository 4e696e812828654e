"""Stage 6: gather decoded images (arriving in any order) into fixed-size model batches.

A preallocated [B, 1, S, S] buffer is reused, so batching costs one copy per image. The last, partial batch
is flushed at the end; runners accept any batch size up to their maximum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    idx: np.ndarray  # int64 [b] plan indices
    images: np.ndarray  # float32 [b, 1, S, S] (a view; consumed before the next add)


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
