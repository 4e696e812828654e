"""Stage 5: decode + preprocess in a process pool with a bounded number of tasks in flight.

Decode (not the model) is the bottleneck, and it is CPU-bound Python/C, so processes, one per core by
default. The file list reaches each worker once, at start-up, as an arrow string array (two buffers, no
per-path Python objects to copy or refcount); tasks are just index arrays. At most ``max_inflight`` tasks
are queued or running, so memory stays flat however large the cohort. Each worker calls exactly
``preprocess.load_and_preprocess`` with the model card's PreprocessConfig (what training did); any error
becomes a failure row for that file, never a crash. Workers are started by ``forkserver`` so they never
inherit the parent's torch/onnxruntime thread pools.

Zero-copy hand-off: images never travel through a pipe. The pool owns one shared-memory block
(``multiprocessing.shared_memory``) of ``max_inflight + 1`` slot groups of ``task_size`` images; each task is
submitted with a free group, the worker writes its preprocessed images there, and only indices, flags,
failure text and timings are pickled back. ``DecodedTask.images`` is a view of the group, valid until the
caller asks for the next task (then the group is reused) -- the batcher copies it into its batch buffer.
A consumer whose copy out of the group completes later (an asynchronous copy to a GPU) calls
``DecodePool.hold(group, fence)`` before asking for the next task: the group then goes back to the free list
only once ``fence.query()`` is true (``fence.synchronize()`` is called when no other group is free), and
every held fence is waited for before the block is closed. ``on_close`` callbacks (e.g. unregistering
page-locked memory) run after that and before the block is unmapped.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.score.privacy import scrub


@dataclass
class DecodedTask:
    """One finished task: item indices, their images (zeros where failed), failures and worker-side timing."""

    idx: np.ndarray  # int64 [k] indices into the plan
    images: np.ndarray  # float32 [k, 1, S, S]; a shared-memory view, valid until the next task is requested
    ok: np.ndarray  # bool [k]
    failures: list[tuple[int, str, str]]  # (plan index, reason, message)
    seconds: float  # worker wall time for the task (decode + preprocess)
    info: list[dict[str, Any]]  # compact DecodeInfo per ok item (transfer syntax, reduce level, ...)
    group: int = -1  # shared-memory slot group the images were written to (-1: none)
    # handoff="reduced" (on-device preprocessing): per item a preprocess.Reduced whose pixels are a view of
    # the slot (None where the item failed); ``images`` is then empty. With j2k="device" a JPEG 2000 item is
    # a dicom_io.Codestream instead (checked, not decoded: the main process decodes it on the GPU).
    reduced: list[Any] | None = None


_STATE: dict[str, Any] = {}


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (killed, not yet reaped by its own parent) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _watch_parent(main_pid: int, period_s: float = 0.5) -> None:
    """Exit when the scoring process is gone (kill -9 leaves no one to shut the pool down; an orphaned
    worker would otherwise block forever on the task queue and keep the caller's stdout pipe open)."""
    import threading

    def loop() -> None:
        while True:
            time.sleep(period_s)
            if not _alive(main_pid):
                os._exit(0)

    threading.Thread(target=loop, name="xbmd-parent-watch", daemon=True).start()


def _attach(shm_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The pool's slot bytes (uint8 [groups, task_size, slot_bytes]) in this worker. Attached once per
    worker; the segment is owned (and unlinked) by the pool in the main process, whose resource tracker the
    forkserver workers share."""
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=shm_name)
    _STATE["shm"] = shm  # keep the mapping alive for the worker's lifetime
    return np.ndarray(shape, dtype=np.uint8, buffer=shm.buf)


def _one_thread_per_worker() -> None:
    """Limit every native thread pool of this decode worker to one thread.

    OMP_NUM_THREADS set in the worker comes too late: numpy (OpenBLAS) is already loaded by the time the
    initializer runs, and its default pool has one thread per core. Preprocessing's banded matrix products
    then ran on 2 BLAS threads in each of 2 workers next to the model's threads: on the 2-core box the
    workers burnt 35.5 s of CPU for 256 images instead of 2.4 s and scoring ran at 12.5 instead of 50.6
    images/s (measured 2026-11-29, SYNTHETIC cohort C). threadpoolctl resizes the already-loaded pools.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - opencv is a core dependency
        pass


def _init_worker(
    root: str,
    paths: pa.Array,
    cfg: dict[str, Any],
    main_pid: int | None = None,
    slots: tuple[str, tuple[int, ...]] | np.ndarray | None = None,
    handoff: str = "image",
    j2k: str = "cpu",
) -> None:
    """Runs once per worker (or in the main process for workers=0, where it only sets the state): keep the
    shared file list and config; in a worker also one thread, no SIGINT, exit when the scorer dies."""
    if main_pid is not None and main_pid != os.getpid():  # a pool worker (not workers=0 in-process)
        import signal

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from xbmd_batch.score.privacy import silence_dicom_warnings

        silence_dicom_warnings()  # a worker's warnings go straight to the user's stderr
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it saves a part
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so is SIGTERM (Slurm/PBS signal the whole job)
        _watch_parent(main_pid)
        import sys

        if "torch" in sys.modules:  # never oversubscribe the cores from a decode worker
            sys.modules["torch"].set_num_threads(1)
        _one_thread_per_worker()
    _STATE["root"] = Path(root)
    _STATE["paths"] = paths
    _STATE["cfg"] = PreprocessConfig.from_dict(cfg)
    _STATE["handoff"] = handoff
    _STATE["j2k"] = j2k
    if isinstance(slots, tuple):
        _STATE["slots"] = _attach(*slots)
    else:
        _STATE["slots"] = slots  # workers=0: the pool's own array (or None: return images by value)


def _info_dict(info: Any) -> dict[str, Any]:
    if info is None:
        return {}
    if dataclasses.is_dataclass(info):
        d = dataclasses.asdict(info)
    elif isinstance(info, dict):
        d = dict(info)
    else:
        d = (
            {k: v for k, v in vars(info).items() if not k.startswith("_")}
            if hasattr(info, "__dict__")
            else {}
        )
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _reason(e: BaseException) -> str:
    from xbmd_batch.errors import InputError

    name = type(e).__name__
    text = str(e).lower()
    if isinstance(getattr(e, "reason", None), str):  # errors.ImageError: the reader knows exactly what broke
        return e.reason  # type: ignore[attr-defined]
    if isinstance(e, MemoryError):
        return "out_of_memory"
    if "transfer syntax" in text or "no pixel data handler" in text or "unable to decode" in text:
        return "unsupported_transfer_syntax"
    if isinstance(e, FileNotFoundError):
        return "file_missing"
    if isinstance(e, InputError):
        return "invalid_image"
    return f"decode_error:{name}"


def _is_file_error(e: BaseException) -> bool:
    """Exceptions one file can cause: every Exception, plus a Rust decoder's panic (pyo3's PanicException
    derives from BaseException, so a malformed RLE/JPEG file would otherwise stop the whole cohort)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _image_view(slot: np.ndarray, s: int) -> np.ndarray:
    """One slot's bytes as a float32 (1, S, S) image."""
    return slot[: s * s * 4].view(np.float32).reshape(1, s, s)


def _reduced_into(slot: np.ndarray, red: Any) -> Any:
    """Copy a Reduced's pixels into the slot's bytes; return it with pixels=None and (shape, dtype) kept
    (``_reduced_view`` rebuilds the view in the main process). Too big for a slot: sent by value. A
    ``Codestream``'s bytes travel the same way (dtype ``"codestream"``)."""
    from xbmd_batch.dicom_io import Codestream

    if isinstance(red, Codestream):
        n = len(red.data)
        if n > slot.nbytes:
            return red
        slot[:n] = np.frombuffer(red.data, dtype=np.uint8)
        return dataclasses.replace(red, data=None), (n,), _CODESTREAM
    a = np.ascontiguousarray(red.pixels)
    if a.nbytes > slot.nbytes:
        return red
    slot[: a.nbytes].view(a.dtype).reshape(a.shape)[...] = a
    return dataclasses.replace(red, pixels=None), a.shape, a.dtype.str


_CODESTREAM = "codestream"


def _reduced_view(slot: np.ndarray, sent: Any) -> Any:
    if not isinstance(sent, tuple):
        return sent  # by value (did not fit a slot)
    red, shape, dtype = sent
    if dtype == _CODESTREAM:  # an own copy: it waits for its GPU batch, beyond the slot's reuse
        return dataclasses.replace(red, data=slot[: shape[0]].tobytes())
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return dataclasses.replace(red, pixels=slot[:n].view(np.dtype(dtype)).reshape(shape))


def decode_task(idx: np.ndarray, group: int = -1, cpu_j2k: bool = False) -> DecodedTask:
    """Decode and preprocess the given plan indices (runs inside a worker, or inline with workers=0).

    With a slot ``group`` the results are written into the pool's shared memory and not returned (the
    returned task's ``images`` is empty; the pool puts the views back); without one they are returned.
    With handoff "reduced" only step 1 of preprocessing runs here (``preprocess.reduce_stored``); the
    rest runs batched on the model's device (``preprocess_torch.finish_batch``). With j2k "device" (and not
    ``cpu_j2k``: the fallback for codestreams the GPU rejected) a JPEG 2000 file is checked exactly as the
    CPU path checks it, then handed over undecoded (``dicom_io.read_for_device``)."""
    from xbmd_batch.dicom_io import read_for_device, read_stored
    from xbmd_batch.preprocess import load_and_preprocess, reduce_stored

    t0 = time.perf_counter()
    cfg: PreprocessConfig = _STATE["cfg"]
    s = cfg.image_size
    k = len(idx)
    slots = _STATE.get("slots")
    reduced_mode = _STATE.get("handoff", "image") == "reduced"
    j2k_device = reduced_mode and _STATE.get("j2k", "cpu") == "device" and not cpu_j2k
    if group < 0 or slots is None:
        group = -1
    images = np.zeros((k, 1, s, s), dtype=np.float32) if group < 0 and not reduced_mode else None
    reduced: list[Any] = []
    ok = np.zeros(k, dtype=bool)
    failures: list[tuple[int, str, str]] = []
    infos: list[dict[str, Any]] = []
    paths: pa.Array = _STATE["paths"]
    for n, i in enumerate(idx):
        rel = paths[int(i)].as_py()
        try:
            if reduced_mode:
                read = read_for_device if j2k_device else read_stored
                st, info = read(_STATE["root"] / rel, target_size=s, apply_voi=cfg.apply_voi)
                red = reduce_stored(st, cfg) if hasattr(st, "pixels") else st  # a Codestream as it is
                reduced.append(_reduced_into(slots[group, n], red) if group >= 0 else red)
            else:
                arr, info = load_and_preprocess(_STATE["root"] / rel, cfg)
                arr = np.asarray(arr, dtype=np.float32).reshape(1, s, s)
                if not np.isfinite(arr).all():
                    raise ValueError("preprocessed image holds NaN/inf values")
                if group >= 0:
                    _image_view(slots[group, n], s)[...] = arr
                else:
                    images[n] = arr  # type: ignore[index]
            ok[n] = True
            infos.append(_info_dict(info))
        except BaseException as e:  # noqa: BLE001 - one bad file must never stop the cohort
            if not _is_file_error(e):
                raise
            msg = scrub(
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", _STATE["root"], rel
            )
            failures.append((int(i), _reason(e), msg))
            if reduced_mode:
                reduced.append(None)
    sent = images if images is not None else np.zeros((0, 1, s, s), dtype=np.float32)
    return DecodedTask(
        np.asarray(idx, dtype=np.int64),
        sent,
        ok,
        failures,
        time.perf_counter() - t0,
        infos,
        group,
        reduced if reduced_mode else None,
    )


class DecodePool:
    """Iterate decoded tasks over ``order`` (plan indices) with at most ``max_inflight`` tasks outstanding."""

    def __init__(
        self,
        root: Path,
        paths: pa.Array,
        cfg: PreprocessConfig,
        workers: int,
        task_size: int = 4,
        max_inflight: int | None = None,
        handoff: str = "image",
        j2k: str = "cpu",
    ) -> None:
        self.root, self.paths, self.cfg = Path(root), paths, cfg
        self.workers = max(0, int(workers))
        self.task_size = max(1, int(task_size))
        self.max_inflight = max_inflight or max(2, 4 * max(1, self.workers))
        self._ex: ProcessPoolExecutor | None = None
        self.wait_seconds = 0.0  # main-thread time spent waiting for decode (decode not hidden)
        if handoff not in ("image", "reduced"):
            raise ValueError(f"handoff must be 'image' or 'reduced', not {handoff!r}")
        self.handoff = handoff
        if j2k not in ("cpu", "device") or (j2k == "device" and handoff != "reduced"):
            raise ValueError(f"j2k must be 'cpu', or 'device' with handoff 'reduced', not {j2k!r}")
        self.j2k = j2k  # "device": JPEG 2000 files are handed over as codestreams (score/j2k_device.py)
        s = cfg.image_size
        # Slot bytes: a float32 S x S image, or (reduced) step 1's output: version 3's block means (below 4S
        # on the short side: 4S x 8S float32) or version 4's stored integers at full resolution (16 MiB: a
        # 2500 x 3200 uint16 image); a larger one travels by value. Untouched pages of a shared memory block
        # cost nothing.
        slot_bytes = s * s * 4 if handoff == "image" else max((4 * s) * (8 * s) * 4, 16 << 20)
        # One group per task in flight, +1 so a finished task can be held while the next is submitted.
        n_slots = (self.max_inflight + 1) * self.task_size
        room = _shm_room()
        if handoff == "reduced" and room is not None and n_slots * slot_bytes > room // 2:
            # A container's /dev/shm is often small (Docker: 64 MB) and touching pages beyond it kills the
            # worker with SIGBUS: keep the block within half of it; larger images then travel by value.
            slot_bytes = max(4096, room // 2 // n_slots // 4096 * 4096)
        self._shape = (self.max_inflight + 1, self.task_size, slot_bytes)
        self._shm: Any = None
        self._slots: np.ndarray | None = None
        self._free: list[int] = []
        self._fences: dict[int, Any] = {}  # group -> fence, set by hold() while the caller has the task
        self._held: list[tuple[int, Any]] = []  # released by the caller, copy out of it not yet complete
        self._on_close: list[Any] = []

    def __enter__(self) -> DecodePool:
        self._free = list(range(self._shape[0]))[::-1]
        self._fences, self._held = {}, []
        if self.workers == 0:
            self._slots = np.zeros(self._shape, dtype=np.uint8)
            _init_worker(
                str(self.root),
                self.paths,
                self.cfg.to_dict(),
                slots=self._slots,
                handoff=self.handoff,
                j2k=self.j2k,
            )
        else:
            self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)
        self._release_shm()

    def close(self, cancel: bool = False) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=not cancel, cancel_futures=True)
            self._ex = None

    def hold(self, group: int, fence: Any) -> None:
        """Keep slot group ``group`` (the task the caller holds now) out of the free list after the caller
        moves on, until ``fence.query()`` is true: for a copy out of the group that completes later (an
        asynchronous host-to-device copy from page-locked slots). ``fence`` needs ``query() -> bool`` and
        ``synchronize()`` (``torch.cuda.Event`` has both)."""
        if group >= 0:
            self._fences[group] = fence

    def on_close(self, callback: Any) -> None:
        """Run ``callback()`` when the pool closes its block: after every held group's fence completed, before
        the block is unmapped (e.g. ``cudaHostUnregister``)."""
        self._on_close.append(callback)

    def block_span(self) -> tuple[int, int, int] | None:
        """(address, bytes, bytes per slot) of the slot memory in this process; None before it exists."""
        if self._slots is None:
            return None
        return int(self._slots.ctypes.data), int(self._slots.nbytes), int(self._shape[2])

    def _release(self, group: int) -> None:
        """The caller is done with ``group``: free it now, or once its fence completes (``hold``)."""
        fence = self._fences.pop(group, None)
        if fence is None:
            self._free.append(group)
        else:
            self._held.append((group, fence))

    def _reap(self, wait: bool = False) -> None:
        """Free the held groups whose copy has completed; with ``wait`` (nothing free) wait for the oldest."""
        still = []
        for g, fence in self._held:
            if fence.query():
                self._free.append(g)
            else:
                still.append((g, fence))
        self._held = still
        if wait and not self._free and self._held:
            g, fence = self._held.pop(0)
            fence.synchronize()
            self._free.append(g)

    def _take_group(self) -> int:
        self._reap(wait=not self._free)
        return self._free.pop()

    def _drain(self) -> None:
        """Wait for every copy still reading the block (before it is closed)."""
        held = self._held + list(self._fences.items())
        self._held, self._fences = [], {}
        for g, fence in held:
            try:
                if not fence.query():
                    fence.synchronize()
            except Exception:  # noqa: BLE001 - a failed device (sticky CUDA error): its copies are gone;
                pass  # closing must not hide the error that stopped the run
            self._free.append(g)

    def _release_shm(self) -> None:
        """Unlink the segment (the name goes at once); the mapping closes when no view of it is left."""
        self._drain()
        callbacks, self._on_close = self._on_close, []
        for cb in callbacks:
            cb()
        self._slots = None
        _STATE.pop("slots", None)
        if self._shm is not None:
            shm, self._shm = self._shm, None
            try:
                shm.close()
            except BufferError:  # a caller still holds a DecodedTask view; the mapping dies with it
                pass
            try:
                shm.unlink()
            except FileNotFoundError:
                pass

    def _start(self) -> None:
        from multiprocessing import shared_memory

        if self._shm is None:  # kept across pool restarts after a worker crash
            self._shm = shared_memory.SharedMemory(create=True, size=int(np.prod(self._shape)))
            self._slots = np.ndarray(self._shape, dtype=np.uint8, buffer=self._shm.buf)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["xbmd_batch.preprocess", "xbmd_batch.score.decode"])
        slots = (self._shm.name, self._shape)
        args = (str(self.root), self.paths, self.cfg.to_dict(), os.getpid(), slots, self.handoff, self.j2k)
        self._ex = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=args)

    def _view(self, task: DecodedTask) -> DecodedTask:
        """Put the shared-memory views back into a task that came through a slot group."""
        if task.group < 0 or self._slots is None:
            return task
        group = self._slots[task.group]
        if task.reduced is not None:
            task.reduced = [
                None if r is None else _reduced_view(group[n], r) for n, r in enumerate(task.reduced)
            ]
        else:
            s = self.cfg.image_size
            task.images = group[: len(task.idx), : s * s * 4].view(np.float32).reshape(-1, 1, s, s)
        return task

    def start(self, order: np.ndarray) -> None:
        """Queue the work and submit the first ``max_inflight`` tasks now, so workers start up and decode
        while the caller is still loading the model."""
        order = np.asarray(order, dtype=np.int64)
        step = self.task_size
        self._tasks: Iterator[np.ndarray] = (order[i : i + step] for i in range(0, len(order), step))
        self._retry: list[tuple[np.ndarray, bool]] = []  # (task, is a single-file retry)
        self._pending: dict[Future[DecodedTask], tuple[np.ndarray, bool, int]] = {}  # (task, retry, group)
        self._exhausted = False
        if self.workers > 0:
            self._fill()

    def _fill(self) -> None:
        if self._ex is None:
            self._start()
        while len(self._pending) < self.max_inflight and (self._retry or not self._exhausted):
            if self._retry:
                t, single = self._retry.pop()
            else:
                t, single = next(self._tasks, None), False
                if t is None:
                    self._exhausted = True
                    continue
            g = self._take_group()
            self._pending[self._ex.submit(decode_task, t, g)] = (t, single, g)  # type: ignore[union-attr]

    def results(self) -> Iterator[DecodedTask]:
        """Yield tasks as they finish. A worker killed by a decoder crash breaks the pool: the pool is
        restarted and the affected tasks retried one file at a time; a file that crashes a worker twice
        becomes a ``worker_crashed`` failure."""
        if self.workers == 0:
            for t in self._tasks:
                g = self._take_group()
                try:
                    yield self._view(decode_task(t, g))
                finally:
                    self._release(g)
            return
        pending, retry = self._pending, self._retry
        while pending or retry or not self._exhausted:
            self._fill()
            if not pending:
                continue
            t0 = time.perf_counter()
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            self.wait_seconds += time.perf_counter() - t0
            broken = False
            for f in done:
                t, single, g = pending.pop(f)
                try:
                    res = f.result()
                except BrokenProcessPool:
                    broken = True
                    if single:
                        yield _crashed(t)
                    else:
                        retry.extend((t[j : j + 1], True) for j in range(len(t)))
                else:
                    yield self._view(res)  # the caller is done with it when it asks for the next task
                finally:
                    self._release(g)  # free now, or once the caller's copy out of it completed (hold)
            if broken:
                self._free.extend(g for _, _, g in pending.values())
                for t, single, _ in pending.values():  # all of them die with the pool
                    retry.extend([(t, True)] if single else [(t[j : j + 1], True) for j in range(len(t))])
                pending.clear()
                self.close(cancel=True)

    def decode_now(self, idx: np.ndarray) -> DecodedTask:
        """The CPU path (JPEG 2000 decoded by the workers' reduced decode) for these plan indices, now, by
        value: the fallback for codestreams the GPU decoder rejected (``score/j2k_device.py``). In a worker,
        so a decoder crash cannot take the scoring process down; a crash makes them ``worker_crashed`` rows
        (transient: a rerun redoes them)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.workers == 0:
            return decode_task(idx, -1, True)
        if self._ex is None:
            self._start()
        try:
            return self._ex.submit(decode_task, idx, -1, True).result()  # type: ignore[union-attr]
        except BrokenProcessPool:  # the pool's own loop notices it and restarts the workers
            return _crashed(idx)

    def run(self, order: np.ndarray) -> Iterator[DecodedTask]:
        self.start(order)
        return self.results()


def _shm_room() -> int | None:
    """Bytes free in /dev/shm (where ``multiprocessing.shared_memory`` lives on Linux); None if unknown."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail * st.f_frsize)


def _crashed(t: np.ndarray) -> DecodedTask:
    k = len(t)
    msg = "the decoder crashed the worker process twice (segfault or out of memory)"
    return DecodedTask(
        np.asarray(t, dtype=np.int64),
        np.zeros((k, 1, 1, 1), dtype=np.float32),
        np.zeros(k, dtype=bool),
        [(int(i), "worker_crashed", msg) for i in t],
        0.0,
        [],
    )
