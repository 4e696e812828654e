"""`score --engine ray`: the decode and inference stages on a Ray cluster (Ray Data), same functions as local.

The driver builds the plan as the local engine does, then: a Ray Dataset of plan indices still
to do -> ``map_batches(decode_batch)`` on CPU tasks (``decode.decode_task``: the same decode + preprocess
the local process pool runs) -> ``map_batches(ScoreActor)`` on an actor pool (each actor opens the model
once with ``infer.select.open_runner`` and scores with ``infer_step.infer_batch``, as the local loop does;
``num_gpus=1`` per actor when the cluster has GPUs) -> the driver streams the rows into the same
``ChunkBuffer``/``PartWriter`` parts, and the caller finalises with the same ``finalize``. Only the driver
writes, so a task or actor that Ray retries can never duplicate a row in a part (and ``finalize`` keeps
each (path, SOP UID) once regardless).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ENGINES = ("local", "ray")


def decode_batch(batch: dict[str, np.ndarray], root: str, paths: pa.Array, cfg: dict[str, Any]) -> dict:
    """Ray CPU task: decode + preprocess ``batch["idx"]`` with the local engine's ``decode_task``."""
    from xbmd_batch.score import decode

    decode._init_worker(root, paths, cfg)  # sets the worker state only (no pool plumbing)
    t = decode.decode_task(np.asarray(batch["idx"], dtype=np.int64))
    reason = np.array([""] * len(t.idx), dtype=object)
    message = np.array([""] * len(t.idx), dtype=object)
    pos = {int(i): n for n, i in enumerate(t.idx)}
    for i, r, m in t.failures:
        reason[pos[i]], message[pos[i]] = r, m
    return {"idx": t.idx, "image": t.images, "ok": t.ok, "reason": reason, "message": message}


class ScoreActor:
    """Ray actor: one model per actor, opened once; scores decoded batches with ``infer_step.infer_batch``."""

    def __init__(
        self,
        model_path: str,
        runner_kwargs: dict[str, Any],
        values: np.ndarray,
        mask: np.ndarray,
        meta_row: np.ndarray,
    ) -> None:
        from xbmd_batch.infer.model_file import open_model
        from xbmd_batch.infer.select import open_runner
        from xbmd_batch.parity_feeds import make_reference_feeds

        self.runner = open_runner(
            open_model(model_path), parity_feeds=make_reference_feeds, **runner_kwargs
        ).__enter__()
        self.values, self.mask, self.meta_row = values, mask, meta_row
        self.n_fields = values.shape[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from xbmd_batch.score.infer_step import infer_batch

        idx = np.asarray(batch["idx"], dtype=np.int64)
        ok = np.asarray(batch["ok"], dtype=bool)
        n = len(idx)
        status = np.array(["failed"] * n, dtype=object)
        stage = np.array(["decode"] * n, dtype=object)
        reason = np.asarray(batch["reason"], dtype=object).copy()
        message = np.asarray(batch["message"], dtype=object).copy()
        bmd = np.full(n, np.nan, dtype=np.float32)
        attn = np.full((n, self.n_fields), np.nan, dtype=np.float32)
        has_attn = np.zeros(n, dtype=bool)
        sd = np.full(n, np.nan, dtype=np.float32)
        has_sd = np.zeros(n, dtype=bool)
        good = idx[ok]
        if len(good):
            rows = self.meta_row[good]
            images = np.asarray(batch["image"], dtype=np.float32)[ok]
            res = infer_batch(
                self.runner, self.runner.has_attention, good, images, self.values[rows], self.mask[rows]
            )
            pos = {int(i): k for k, i in enumerate(idx)}
            for i_arr, b, a, s in res.scored:
                for k, i in enumerate(i_arr):
                    p = pos[int(i)]
                    status[p], stage[p], reason[p], message[p], bmd[p] = "scored", "", "", "", b[k]
                    if a is not None:
                        attn[p], has_attn[p] = a[k], True
                    if s is not None:
                        sd[p], has_sd[p] = s[k], True
            for i_arr, rs, ms in res.failed:
                for k, i in enumerate(i_arr):
                    p = pos[int(i)]
                    stage[p], reason[p], message[p] = "infer", rs[k], ms[k]
        r = self.runner
        return {
            "idx": idx, "status": status, "stage": stage, "reason": reason, "message": message, "bmd": bmd,
            "attn": attn, "has_attn": has_attn, "sd": sd, "has_sd": has_sd,
            "backend": np.array([r.backend] * n, dtype=object),
            "precision": np.array([r.precision] * n, dtype=object),
            "backend_reason": np.array([r.reason] * n, dtype=object),
        }  # fmt: skip


def _decode_task_args() -> dict[str, Any]:
    return {"num_cpus": 1}


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def ensure_ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError as e:
        from xbmd_batch.errors import InputError

        raise InputError("--engine ray needs Ray: pip install 'xbmd-batch[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def run(
    *,
    address: str | None,
    dicom_dir: Path,
    paths: pa.Array,
    preprocess_cfg: dict[str, Any],
    todo: np.ndarray,
    model_path: Path,
    runner_kwargs: dict[str, Any],
    values: np.ndarray,
    mask: np.ndarray,
    meta_row: np.ndarray,
    task_size: int,
    batch_size: int,
    actors: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield scored/failed row batches (numpy columns, ``idx`` = plan index) for every index in ``todo``."""
    ray = ensure_ray(address)
    if not len(todo):
        return
    gpus = _cluster_gpus()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # sizing rule: one actor per GPU; on CPU-only clusters, one actor per 4 CPUs (decode needs the rest)
    n_actors = actors or (gpus if gpus else max(1, cpus // 4))
    # blocks of whole decode tasks, enough of them to keep every CPU busy (and few enough to stay cheap)
    todo = np.asarray(todo, dtype=np.int64)
    n_tasks = -(-len(todo) // task_size)
    per_block = task_size * max(1, -(-n_tasks // max(4 * cpus, -(-len(todo) // 4096))))
    ds = ray.data.from_arrow(
        [pa.table({"idx": pa.array(todo[i : i + per_block])}) for i in range(0, len(todo), per_block)]
    )
    ds = ds.map_batches(
        decode_batch,
        batch_size=task_size,
        batch_format="numpy",
        fn_kwargs={"root": str(dicom_dir), "paths": paths, "cfg": preprocess_cfg},
        # a ray_remote_args_fn keeps decode a pool of CPU tasks: without it Ray Data fuses it into the model
        # actors, and decode (the bottleneck) then runs only as many at a time as there are actors
        ray_remote_args_fn=_decode_task_args,
    )
    ds = ds.map_batches(
        ScoreActor,
        batch_size=batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model_path": str(model_path),
            "runner_kwargs": runner_kwargs,
            "values": values,
            "mask": mask,
            "meta_row": meta_row,
        },  # fmt: skip
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
    )  # Ray Data restarts a dead actor and retries its batch (max_restarts=-1 by default)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
