"""Steps 6-7 of `score --engine ray`: the driver's glue between the run (plan, run.json, console, stopwatch)
and `ray_engine.score_on_ray`, which moves the work. The part buffer is the local engine's (`run_local`), so
both engines write the same rows; imported only when ``--engine ray`` is asked for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xbmd_batch.arrowutil import to_arrow
from xbmd_batch.score.ingest import Ingested
from xbmd_batch.score.options import ScoreOptions, kill_hook_from_env
from xbmd_batch.score.run_local import loop_inputs, progress_bar
from xbmd_batch.score.stopwatch import Stopwatch
from xbmd_batch.score.writer import PartWriter


def run_ray(
    dicom_dir: Path, model_path: Path, model_sha: str, card: Any, ing: Ingested, ids: dict[str, np.ndarray],
    todo: np.ndarray, file_stats: Any, out_dir: Path, o: ScoreOptions, sw: Stopwatch, console: Any,
    run: dict[str, Any], pin: Callable[[], dict[str, Any]],
) -> tuple[Any, Any, int]:  # fmt: skip
    """Steps 6-7 on Ray: the driver keeps the plan and writes every part; the run is pinned once the first
    actor has opened the model (as the local engine pins once its runner has)."""
    from xbmd_batch.score import ray_engine

    def started(runner: Any) -> None:
        run["runner"] = runner.info or {"backend": None, "reason": runner.reason}
        run["model"]["engine_sha256"] = run["runner"].get("engine_sha256")
        state = pin()
        run["sessions"], run["created"] = len(state["sessions"]), state["created"]
        why = f" - {runner.reason}" if runner.reason else ""
        console.print(f"backend: [bold]{runner.backend or '-'}[/] ({runner.precision or '-'}) on Ray{why}")
        sw.lap("model_load")

    buf, values, mask = loop_inputs(card, ing, ids, "", "", file_stats)  # backend: each actor's runner
    paths = to_arrow(ing.plan.items.get_column("relative_path"), pa.large_string())
    progress = progress_bar(console, o.quiet)
    with progress:
        runner, stats, run["ray"] = ray_engine.score_on_ray(
            opts=o, dicom_dir=dicom_dir, paths=paths, card=card, model_path=model_path,
            model_sha256=model_sha, todo=todo, buf=buf, values=values, mask=mask,
            writer=PartWriter(out_dir, after_write=kill_hook_from_env()), on_start=started,
            progress=progress, task=progress.add_task("scoring (Ray)", total=len(todo), rate=0.0),
        )  # fmt: skip
    sw.add("infer", run["ray"].get("infer_actor_s", 0.0))
    return runner, stats, o.workers or int(run["ray"].get("cluster_cpus", 0))
