"""`score --engine ray`, the cluster side: what Ray runs in its tasks and actors (``ray_engine`` drives them).

``decode_rows``: a Ray CPU task running the local pool's ``decode.decode_task``; a batch whose worker died
is redone file by file through a one-worker local ``DecodePool`` (``Attempts`` counts the starts).
``ScoreActor``: one model per actor (``open_runner``), each batch booked by a local ``ScoringLoop``
(``add_decode_failures``, ``score_batch``) into part-schema rows plus a few per-batch facts (``AUX`` columns,
on the first row)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xbmd_batch.errors import ModelFileError, XbmdError
from xbmd_batch.score.loop import ScoringLoop
from xbmd_batch.score.stopwatch import Stopwatch
from xbmd_batch.score.writer import ChunkBuffer

# per-batch facts on the first row of each table an actor returns (not part columns; the driver drops them)
AUX = ("_runner", "_infer_s", "_decode_s", "_redone")
_WORKER_READY: list[bool] = []  # this Ray worker process has set up decode (one thread per native pool)


class Attempts:
    """A tiny actor (no CPU) counting how often each decode batch was started, so a batch whose Ray worker
    died (a decoder segfault, an OOM kill) is decoded file by file the second time."""

    def __init__(self) -> None:
        self.n: dict[int, int] = {}

    def begin(self, key: int) -> int:
        self.n[key] = self.n.get(key, 0) + 1
        return self.n[key]


def decode_rows(
    batch: dict[str, np.ndarray],
    root: str,
    paths: pa.Array,
    cfg: dict[str, Any],
    attempts: Any = None,
    crash_marker: str | None = None,
) -> dict:
    """Ray CPU task: the local pool's ``decode.decode_task`` on ``batch["idx"]``; failures as columns.

    A batch started before (its worker died, Ray retried it) goes through the local ``DecodePool`` with one
    worker and one file per task instead: a file that kills its process twice becomes a ``worker_crashed``
    failure row, as in a local run, rather than being retried by Ray forever."""
    import ray

    from xbmd_batch.score import decode
    from xbmd_batch.score.privacy import silence_dicom_warnings

    if not _WORKER_READY:  # once per Ray worker process, as the local pool's initializer does
        silence_dicom_warnings()
        decode._one_thread_per_worker()
        _WORKER_READY.append(True)
    idx = np.asarray(batch["idx"], dtype=np.int64)
    retried = attempts is not None and ray.get(attempts.begin.remote(int(idx[0]))) > 1
    if crash_marker and not retried and not os.path.exists(crash_marker):
        Path(crash_marker).touch()
        os._exit(1)  # the test hook: this decode worker dies mid-batch, once
    if retried:
        tasks = _decode_isolated(root, paths, cfg, idx)
    else:
        decode._init_worker(root, paths, cfg)  # the worker state only (file list, config); images by value
        tasks = [decode.decode_task(idx)]
    s = int(cfg["image_size"])
    out_idx = np.concatenate([t.idx for t in tasks])
    k = len(out_idx)
    images = np.zeros((k, 1, s, s), dtype=np.float32)
    ok = np.concatenate([t.ok for t in tasks])
    reason, message = np.full(k, "", dtype=object), np.full(k, "", dtype=object)
    seconds, redone = np.zeros(k, dtype=np.float64), np.zeros(k, dtype=np.int64)
    seconds[:1], redone[:1] = sum(t.seconds for t in tasks), int(retried)
    pos = {int(i): n for n, i in enumerate(out_idx)}
    for t in tasks:
        for n, i in enumerate(t.idx):
            if t.ok[n]:
                images[pos[int(i)]] = t.images[n]
        for i, r, m in t.failures:
            reason[pos[i]], message[pos[i]] = r, m
    return {"idx": out_idx, "image": images, "ok": ok, "reason": reason, "message": message,
            "_decode_s": seconds, "_redone": redone}  # fmt: skip


def _decode_isolated(root: str, paths: pa.Array, cfg: dict[str, Any], idx: np.ndarray) -> list[Any]:
    """``idx`` through a one-worker local DecodePool, one file per task (its crash handling, its rows)."""
    from xbmd_batch.config import PreprocessConfig
    from xbmd_batch.score.decode import DecodePool

    out = []
    with DecodePool(Path(root), paths, PreprocessConfig.from_dict(cfg), workers=1, task_size=1) as pool:
        for t in pool.run(idx):
            t.images = np.array(t.images, copy=True)  # a view of the pool's shared memory until the next task
            out.append(t)
    return out


class ScoreActor:
    """One model per actor (opened once); each batch of decoded rows -> a part-schema table of its rows."""

    def __init__(
        self,
        model_path: str,
        model_sha256: str,
        runner_kwargs: dict[str, Any],
        buf: ChunkBuffer,
        values: np.ndarray,
        mask: np.ndarray,
        batch_size: int,
        kill_marker: str | None = None,
    ) -> None:
        import ray

        from xbmd_batch.infer.model_file import open_model
        from xbmd_batch.infer.select import open_runner
        from xbmd_batch.parity_feeds import make_reference_feeds

        self.kill_marker = kill_marker
        # A constructor that raises kills the actor and Ray keeps only the error's text; an error kept here
        # and raised by the first batch reaches the driver as the exception itself (exit code as locally).
        self.init_error: XbmdError | None = None
        buf, values, mask = (ray.get(x) if isinstance(x, ray.ObjectRef) else x for x in (buf, values, mask))
        try:
            model = open_model(Path(model_path))
            if model.sha256 != model_sha256:  # every node must see the driver's model file, unchanged
                raise ModelFileError(f"{model_path}: this node's copy differs from the driver's (sha256)")
            runner = open_runner(model, parity_feeds=make_reference_feeds, **runner_kwargs)
        except XbmdError as e:
            self.init_error = e
            return
        self.runner = runner.__enter__()  # held for the actor's lifetime (Ray ends the process)
        buf.backend, buf.precision = runner.backend, runner.precision
        self.loop = ScoringLoop(
            runner, model.card, buf, None, values, mask, buf.meta_row, batch_size, 1, Stopwatch()
        )
        prov = {**runner.provenance(), "backend_reason": runner.reason, "actor_pid": os.getpid()}
        self.provenance = json.dumps(prov, default=str)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.init_error is not None:
            raise self.init_error
        if self.kill_marker and not os.path.exists(self.kill_marker):
            Path(self.kill_marker).touch()
            os._exit(1)  # the test hook: this actor dies mid-run, once
        t0 = time.perf_counter()
        idx = np.asarray(batch["idx"], dtype=np.int64)
        ok = np.asarray(batch["ok"], dtype=bool)
        bad = np.flatnonzero(~ok)
        self.loop.add_decode_failures(
            [(int(idx[j]), str(batch["reason"][j]), str(batch["message"][j])) for j in bad]
        )
        if ok.any():
            self.loop.score_batch(idx[ok], np.ascontiguousarray(batch["image"][ok], dtype=np.float32))
        table = self.loop.buf.take()
        assert table is not None and table.num_rows == len(idx)  # every row booked exactly once
        n = table.num_rows
        first = np.zeros(n, dtype=bool)
        first[0] = True
        aux = {
            "_runner": pa.array([self.provenance] + [None] * (n - 1), type=pa.string()),
            "_infer_s": pa.array(np.where(first, time.perf_counter() - t0, 0.0)),
            "_decode_s": pa.array(np.where(first, float(np.sum(batch["_decode_s"])), 0.0)),
            "_redone": pa.array(np.where(first, int(np.sum(batch["_redone"])), 0)),
        }
        for name, col in aux.items():
            table = table.append_column(name, col)
        return table
