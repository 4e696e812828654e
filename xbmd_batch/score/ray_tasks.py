"""`score --engine ray`, the cluster side: what Ray runs in its tasks and actors (``ray_engine`` drives them).

``decode_rows``: a Ray CPU task running the local pool's ``decode.decode_task``; a batch whose worker died
is redone file by file through a one-worker local ``DecodePool`` (``Attempts`` counts the starts).
``ScoreActor``: one model per actor (``open_runner``); each batch goes through a local ``ScoringLoop``
(``add_decode_failures``, ``score_batch``) into a ``RowRecorder``, whose row outcomes (plus a few per-batch
facts on the first row: ``_runner``, ``_infer_s``, ...) the driver books with ``replay``.
"""

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


class RowRecorder:
    """Stands in for the ``ChunkBuffer`` of an actor's ``ScoringLoop``: records what the loop books (plan
    index, outcome) without the plan's ids; ``take`` hands the rows over as columns. The driver replays them
    into its ``ChunkBuffer`` (``replay``), the one a local run fills: actors never hold the whole plan's ids
    (they grow with the cohort), and part rows are built by the same code as locally."""

    def __init__(self, n_fields: int) -> None:
        self.n_fields = n_fields
        self._calls: list[tuple[Any, ...]] = []

    def add_scored(
        self, idx: np.ndarray, bmd: np.ndarray, attn: np.ndarray | None, sd_models: np.ndarray | None = None
    ) -> None:
        self._calls.append(("scored", np.asarray(idx, dtype=np.int64), bmd, attn, sd_models, "", [], []))

    def add_failed(self, idx: np.ndarray, stage: str, reasons: list[str], messages: list[str]) -> None:
        self._calls.append(
            ("failed", np.asarray(idx, dtype=np.int64), None, None, None, stage, reasons, messages)
        )

    def take(self) -> dict[str, np.ndarray]:
        """The recorded rows as numpy columns (NaN / empty where a column does not apply); buffer emptied."""
        cols: dict[str, list[Any]] = {c: [] for c in RECORD_COLUMNS}
        for status, idx, bmd, attn, sd, stage, reasons, messages in self._calls:
            k = len(idx)
            cols["idx"].append(idx)
            cols["status"].append(np.full(k, status, dtype=object))
            cols["bmd"].append(np.full(k, np.nan, np.float32) if bmd is None else np.asarray(bmd, np.float32))
            cols["attn"].append(
                np.full((k, self.n_fields), np.nan, np.float32)
                if attn is None
                else np.asarray(attn, np.float32)
            )
            cols["has_attn"].append(np.full(k, attn is not None))
            cols["sd"].append(np.full(k, np.nan, np.float32) if sd is None else np.asarray(sd, np.float32))
            cols["has_sd"].append(np.full(k, sd is not None))
            cols["stage"].append(np.full(k, stage, dtype=object))
            cols["reason"].append(np.asarray(list(reasons) or [""] * k, dtype=object))
            cols["message"].append(np.asarray(list(messages) or [""] * k, dtype=object))
        self._calls = []
        return {c: np.concatenate(v) for c, v in cols.items()}


RECORD_COLUMNS = ("idx", "status", "bmd", "attn", "has_attn", "sd", "has_sd", "stage", "reason", "message")


def replay(rows: dict[str, np.ndarray], buf: ChunkBuffer) -> int:
    """Book an actor's recorded rows into the driver's ``ChunkBuffer`` (calls grouped as the loop made them:
    scored rows by whether attention / ensemble SD came with them, failures by stage); returns rows scored."""
    idx, status = np.asarray(rows["idx"], dtype=np.int64), np.asarray(rows["status"])
    scored = status == "scored"
    has_attn, has_sd = np.asarray(rows["has_attn"], bool), np.asarray(rows["has_sd"], bool)
    for a, d in {(bool(x), bool(y)) for x, y in zip(has_attn[scored], has_sd[scored], strict=True)}:
        m = scored & (has_attn == a) & (has_sd == d)
        attn = np.asarray(rows["attn"], np.float32)[m] if a else None
        buf.add_scored(idx[m], np.asarray(rows["bmd"], np.float32)[m], attn,
                       np.asarray(rows["sd"], np.float32)[m] if d else None)  # fmt: skip
    stage = np.asarray(rows["stage"])
    for st in sorted(set(stage[~scored].tolist())):
        m = ~scored & (stage == st)
        buf.add_failed(
            idx[m], str(st), [str(x) for x in rows["reason"][m]], [str(x) for x in rows["message"][m]]
        )
    return int(scored.sum())


class ScoreActor:
    """One model per actor (opened once); each batch of decoded rows -> its rows' outcomes as columns."""

    def __init__(
        self,
        model_path: str,
        model_sha256: str,
        runner_kwargs: dict[str, Any],
        meta_row: np.ndarray,
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
        meta_row, values, mask = (  # numeric arrays: zero-copy views of Ray's object store
            ray.get(x) if isinstance(x, ray.ObjectRef) else x for x in (meta_row, values, mask)
        )
        try:
            model = open_model(Path(model_path))
            if model.sha256 != model_sha256:  # every node must see the driver's model file, unchanged
                raise ModelFileError(f"{model_path}: this node's copy differs from the driver's (sha256)")
            runner = open_runner(model, parity_feeds=make_reference_feeds, **runner_kwargs)
        except XbmdError as e:
            self.init_error = e
            return
        self.runner = runner.__enter__()  # held for the actor's lifetime (Ray ends the process)
        self.rec = RowRecorder(values.shape[1])
        self.loop = ScoringLoop(
            runner, model.card, self.rec, None, values, mask, meta_row, batch_size, 1, Stopwatch()
        )
        prov = {**runner.provenance(), "backend_reason": runner.reason, "actor_pid": os.getpid()}
        self.provenance = json.dumps(prov, default=str)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        out = self.rec.take()
        n = len(out["idx"])
        assert n == len(idx) and set(out["idx"].tolist()) == set(
            idx.tolist()
        )  # every row booked exactly once
        runner = np.full(n, "", dtype=object)
        runner[0] = self.provenance
        first = np.arange(n) == 0
        out.update(
            _runner=runner,
            _infer_s=np.where(first, time.perf_counter() - t0, 0.0),
            _decode_s=np.where(first, float(np.sum(batch["_decode_s"])), 0.0),
            _redone=np.where(first, int(np.sum(batch["_redone"])), 0),
        )
        return out
