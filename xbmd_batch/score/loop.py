"""Stages 5-7 driven together: decoded images -> batches -> the runner -> finished rows -> atomic parts.

`ScoringLoop.run` consumes a started `DecodePool`, fills fixed-size batches, feeds the runner by the model
card's input names, and books every image exactly once: scored (finite prediction) or failed (decode error,
inference error, non-finite output), in a `ChunkBuffer` that becomes a part every ``chunk_size`` rows. A
failed batch is retried image by image so one bad image cannot take its neighbours down. On any exception,
Ctrl-C included, the rows already finished are written before it propagates.

On-device preprocessing (``finish_device``, from ``score --preprocess-device``): the pool hands over reduced
integer images (``DecodePool(handoff="reduced")``), a ``DeviceBatcher`` uploads each one to the device and
finishes whole batches there (``preprocess_torch.finish_batch``), and the runner takes the device tensor as
its image feed (no host copy: ``BaseRunner.takes_tensor``). On CUDA the uploads are asynchronous from
page-locked slots; the batcher hands each task's slot group back to the pool with an event
(``DecodePool.hold``), so the workers reuse it only once the copies out of it completed. Stage
``preprocess_device`` is then the host's time to queue uploads and finishing, not the device's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from xbmd_batch.errors import DeviceError, is_device_error
from xbmd_batch.score.batcher import Batch, Batcher, DeviceBatcher
from xbmd_batch.score.decode import DecodePool
from xbmd_batch.score.stopwatch import Stopwatch
from xbmd_batch.score.writer import ChunkBuffer, PartWriter


@dataclass
class LoopStats:
    """One session's counts and times (run.json's counts and throughput)."""

    scored: int = 0
    failed: int = 0
    parts: int = 0
    images: int = 0  # images taken from the decode pool
    decode_worker_s: float = 0.0  # summed over workers
    decode_wait_s: float = 0.0  # main process waiting on decode
    loop_s: float = 0.0
    upload: dict[str, Any] | None = None  # on-device preprocessing on CUDA: page-locking report (hostpin)


class ScoringLoop:
    """The consumer half of `score`: everything between a started decode pool and the part files."""

    def __init__(
        self,
        runner: Any,
        card: Any,
        buf: ChunkBuffer,
        writer: PartWriter | None,  # None: the caller takes the buffer's rows (Ray actors)
        meta_values: np.ndarray,
        meta_mask: np.ndarray,
        meta_row: np.ndarray,
        batch_size: int,
        chunk_size: int,
        stopwatch: Stopwatch,
        finish_device: str | None = None,
        j2k: Any = None,
    ) -> None:
        self.runner, self.buf, self.writer = runner, buf, writer
        self.values, self.mask, self.meta_row = meta_values, meta_mask, meta_row
        # finish_device None: workers preprocess completely; else a torch device (the pool must have been
        # opened with handoff="reduced") where whole batches are finished
        self.batcher: Batcher | DeviceBatcher = (
            Batcher(batch_size, card.preprocess.image_size)
            if finish_device is None
            else DeviceBatcher(batch_size, card.preprocess, finish_device, j2k=j2k)
        )
        if j2k is not None and finish_device is None:
            raise ValueError("GPU JPEG 2000 decode (j2k) needs on-device finishing (finish_device)")
        self.chunk_size = chunk_size
        self.sw = stopwatch
        self.image_name, self.meta_name, self.mask_name = card.input_names
        self.bmd_name, self.attn_name = card.output_names[0], card.output_names[1]
        self.has_attention = bool(runner.has_attention)
        self.stats = LoopStats()

    def run(self, pool: DecodePool, progress: Any = None, task: Any = None) -> LoopStats:
        st = self.stats
        t0 = time.perf_counter()
        if isinstance(self.batcher, DeviceBatcher):
            self.batcher.attach(pool)  # slot groups are released once the copies out of them completed
        try:
            for dec in pool.results():
                st.decode_worker_s += dec.seconds
                self.add_decode_failures(dec.failures)
                for b in self._add(dec):
                    if len(b.idx):  # a device batch whose every item failed has none left to infer
                        self._infer(b.idx, b.images)
                st.images += len(dec.idx)
                if progress is not None:
                    el = time.perf_counter() - t0
                    progress.update(task, completed=st.images, rate=st.images / el if el > 0 else 0.0)
                if self.buf.n_rows >= self.chunk_size:
                    self._write_part()
            last = self._flush()
            if last is not None and len(last.idx):
                self._infer(last.idx, last.images)
            self._write_part()
            st.decode_wait_s = pool.wait_seconds
        except BaseException:
            self._write_part()  # KeyboardInterrupt / crash: keep every finished row (atomic part), then stop
            raise
        finally:
            st.scored, st.failed = self.buf.n_scored, self.buf.n_failed
            if isinstance(self.batcher, DeviceBatcher):
                st.upload = self.batcher.pinning()
            st.loop_s = time.perf_counter() - t0
        return st

    def _add(self, dec: Any) -> Iterator[Batch]:
        """The task's good images into the batcher; every batch that fills up (device failures booked)."""
        if isinstance(self.batcher, Batcher):
            ok = dec.ok
            yield from self.batcher.add(dec.idx[ok], dec.images[ok])
            return
        reduced = dec.reduced if dec.reduced is not None else [None] * len(dec.idx)  # crashed task: none
        t0 = time.perf_counter()  # uploads + finishing: stage "preprocess_device" (not the runner's time)
        for b in self.batcher.add(dec.idx, reduced, dec.group):
            self.sw.add("preprocess_device", time.perf_counter() - t0)
            yield self._booked(b)
            t0 = time.perf_counter()
        self.sw.add("preprocess_device", time.perf_counter() - t0)

    def _flush(self) -> Batch | None:
        t0 = time.perf_counter()
        last = self.batcher.flush()
        if isinstance(self.batcher, DeviceBatcher):
            self.sw.add("preprocess_device", time.perf_counter() - t0)
        return None if last is None else self._booked(last)

    def _booked(self, b: Batch) -> Batch:
        """Book the items the device could not finish as failure rows."""
        if b.failures:
            f = b.failures
            f_idx = np.array([x[0] for x in f], dtype=np.int64)
            self.buf.add_failed(f_idx, "decode", [x[1] for x in f], [x[2] for x in f])
        return b

    def add_decode_failures(self, failures: list[tuple[int, str, str]]) -> None:
        """A decode task's (plan index, reason, message) failures as rows (the Ray engine's actors too)."""
        if failures:
            f_idx = np.array([f[0] for f in failures], dtype=np.int64)
            self.buf.add_failed(f_idx, "decode", [f[1] for f in failures], [f[2] for f in failures])

    def score_batch(self, idx: np.ndarray, images: np.ndarray) -> None:
        """One model batch into the buffer, exactly as `run` scores it (the Ray engine's actors call this)."""
        self._infer(idx, images)

    def _feeds(self, idx: np.ndarray, images: np.ndarray) -> dict[str, np.ndarray]:
        rows = self.meta_row[idx]
        return {self.image_name: images, self.meta_name: self.values[rows], self.mask_name: self.mask[rows]}

    def _infer(self, idx: np.ndarray, images: np.ndarray) -> None:
        t0 = time.perf_counter()
        try:
            self._accept(idx, self.runner.infer(self._feeds(idx, images)))
        except Exception as e:  # noqa: BLE001 - isolate the bad image: retry one by one
            if is_device_error(e):
                raise self._device_failure(e) from e
            for k in range(len(idx)):
                one = idx[k : k + 1]
                try:
                    self._accept(one, self.runner.infer(self._feeds(one, images[k : k + 1])))
                except Exception as e1:  # noqa: BLE001
                    if is_device_error(e1):
                        raise self._device_failure(e1) from e1
                    msg = f"{type(e1).__name__}: {e1}"[:500]
                    self.buf.add_failed(one, "infer", ["inference_error"], [msg])
        self.sw.add("infer", time.perf_counter() - t0)

    def _device_failure(self, e: BaseException) -> DeviceError:
        """A sticky CUDA error fails every later call: stop (exit 5), not fail the rest of the cohort."""
        return DeviceError(
            f"{self.runner.name}: the GPU failed ({type(e).__name__}: {str(e)[:300]}); a CUDA context in "
            f"this state fails every later call, so scoring stops here instead of marking the rest of the "
            f"cohort as failed. Finished rows are kept; rerun the same command to resume (or --device cpu)."
        )

    def _accept(self, idx: np.ndarray, out: dict[str, np.ndarray]) -> None:
        bmd = np.asarray(out[self.bmd_name], dtype=np.float32).reshape(len(idx))
        attn = out.get(self.attn_name) if self.has_attention else None
        attn = None if attn is None else np.asarray(attn, dtype=np.float32).reshape(len(idx), -1)
        sd = out.get("bmd_sd_models")  # a fold ensemble's between-model SD (export --ensemble)
        sd = None if sd is None else np.asarray(sd, dtype=np.float32).reshape(len(idx))
        good = np.isfinite(bmd)
        if attn is not None:
            good &= np.isfinite(attn).all(axis=1)
        if good.all():
            self.buf.add_scored(idx, bmd, attn, sd)
            return
        self.buf.add_scored(
            idx[good], bmd[good], None if attn is None else attn[good], None if sd is None else sd[good]
        )
        bad = idx[~good]
        why = "the model returned NaN/inf for this image"
        self.buf.add_failed(bad, "infer", ["nonfinite_prediction"] * len(bad), [why] * len(bad))

    def _write_part(self) -> None:
        t0 = time.perf_counter()
        table = self.buf.take()
        if table is not None:
            self.writer.write(table)
            self.stats.parts += 1
        self.sw.add("write", time.perf_counter() - t0)
