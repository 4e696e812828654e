"""Benchmark of scale-out on this machine (not a test). Every cohort here is SYNTHETIC.

On one SYNTHETIC cohort (generator v1, --n subjects, --size px, tiny 64 px model, torch CPU), the local
engine (--workers 2) once, then
1. `--shard 1/3, 2/3, 3/3` + `merge` vs the single run: same rows? max |bmd difference|, same failure reasons,
   same reconciliation counts; summed shard wall time vs single wall time (shards run one after another here).
2. (--ray) `--engine ray` on a local Ray runtime per configuration in --ray-configs ("CPUS:ACTORS", e.g. 2:1
   = ray.init(num_cpus=2), 1 model actor, decode tasks on the other CPU; 4:2 declares 4 logical CPUs on this
   machine, i.e. oversubscribes the cores): Ray start-up (ray.init + one trivial task), wall time, the scoring
   loop's images/s, the ratio to the local engine, and the same equality checks as the shards.

Run:  nice -n 10 .venv/bin/python benchmarks/scale_out.py [--n 96] [--size 512] [--ray] [--no-shards]
Writes benchmarks/results/scale_out_<tag>.json (machine info, load average, command).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/xbmd_bench_scale"))
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tag", default="vm")
    p.add_argument("--ray", action="store_true", help="also time --engine ray (needs the `ray` extra)")
    p.add_argument("--ray-configs", default="2:1,4:2", help="CPUS:ACTORS per local Ray runtime")
    p.add_argument("--no-shards", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import polars as pl
    import torch

    torch.set_num_threads(1)
    from benchmarks._machine import cpu_model, load_average
    from tests.helpers.score import make_cohort, make_model
    from xbmd_batch.score import ScoreOptions, score_cohort
    from xbmd_batch.score.shard import merge_shards

    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    cohort = make_cohort(a.work / "cohort", n=a.n, size=a.size)
    model = make_model(a.work / "tiny.pt")
    dicom, meta = cohort / "dicom", cohort / "meta.csv"
    res: dict = {"synthetic": True, "n_subjects": a.n, "size": a.size, "load_avg_before": load_average(),
                 "cpu": cpu_model(), "cpus": os.cpu_count(), "command": " ".join(sys.argv)}  # fmt: skip

    def run(name: str, **kw: object) -> dict:
        t0 = time.perf_counter()
        r = score_cohort(dicom, meta, model, a.work / name, ScoreOptions(quiet=True, **kw))  # type: ignore[arg-type]
        return {"wall_s": round(time.perf_counter() - t0, 2), **r.throughput, "exit": r.exit_code}

    res["local"] = run("local", workers=2)

    compared = []
    if not a.no_shards:
        shards = [run(f"s{k}", workers=2, shard=f"{k}/3") for k in (1, 2, 3)]
        t0 = time.perf_counter()
        merge_shards(a.work / "merged", [a.work / f"s{k}" for k in (1, 2, 3)])
        res["merge_s"] = round(time.perf_counter() - t0, 2)
        res["shards_wall_s"] = [s["wall_s"] for s in shards]
        compared.append("merged")
    if a.ray:
        import ray

        for conf in a.ray_configs.split(","):
            cpus, actors = (int(x) for x in conf.split(":"))
            name = f"ray_{cpus}cpu_{actors}actor"
            t0 = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            ray.get(ray.remote(lambda: 1).remote())
            startup = round(time.perf_counter() - t0, 2)
            r = run(name, engine="ray", ray_actors=actors)
            ray.shutdown()
            run_json = json.loads((a.work / name / "run.json").read_text())
            res[name] = {"ray_init_and_first_task_s": startup, **r,
                         "ray": run_json["ray"], "load_avg_after": load_average(),
                         "images_per_s_over_local": round(r["images_per_s"] / res["local"]["images_per_s"],
                                                          3),
                         "wall_over_local": round(r["wall_s"] / res["local"]["wall_s"], 3)}  # fmt: skip
            compared.append(name)
    s1 = pl.read_parquet(a.work / "local" / "scores.parquet")
    for other in compared:
        s2 = pl.read_parquet(a.work / other / "scores.parquet")
        same = s2["relative_path"].to_list() == s1["relative_path"].to_list()
        d = float(np.max(np.abs(s2["bmd_pred"].to_numpy() - s1["bmd_pred"].to_numpy()))) if same else None
        f1, f2 = (pl.read_parquet(a.work / x / "failures.parquet") for x in ("local", other))
        r1, r2 = (json.loads((a.work / x / "reconciliation.json").read_text()) for x in ("local", other))
        res[f"{other}_vs_local"] = {
            "same_rows": same, "rows": s2.height, "max_abs_bmd_diff": d,
            "same_failure_reasons": f1["reason"].to_list() == f2["reason"].to_list(),
            "same_reconciliation_counts": r1["counts"] == r2["counts"],
        }  # fmt: skip
    res["load_avg_after"] = load_average()
    out = ROOT / "benchmarks" / "results" / f"scale_out_{a.tag}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
