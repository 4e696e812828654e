"""Decode + preprocess per image on ONE core: preprocessing v4 (current) and v3 vs v2 vs a minimal hand path.

Not a test. Cohorts are SYNTHETIC (`xbmd_batch.synth`, the generator behind `xbmd-batch synth`): uncompressed
~2000-px files (`--size 2000 --j2k-fraction 0 --seed 3`, like issue 11's cohort C) and JPEG 2000 lossless.
One process pinned to one core, OMP/OpenCV threads 1, files in the page cache (one untimed pass first);
methods are interleaved per file and repeated, so a shared box's load hits them alike: compare the ratios.

- ``v4``: ``preprocess.load_and_preprocess`` (the current definition): read_stored + preprocess_stored.
- ``v3``: the same with a version-3 card (block means before the resize).
- ``v2``: ``preprocess_v2.load_and_preprocess`` (the previous definition).
- ``minimal``: what a user writes by hand: ``pydicom.dcmread`` -> ``pixel_array`` -> OpenCV ``INTER_AREA``
  resize of the uint16 array to 224 x 224 -> float32, percentile clip, standardise (no padding, no
  MONOCHROME1/rescale handling).
Parity: |v4 - v2| and |v3 - v2| per file in model-input units (mean, p99, max).

Run:  .venv/bin/python benchmarks/decode_fastpath.py [--n 16] [--repeat 3] [--tag vm]
Writes benchmarks/results/decode_fastpath_<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import command_line, write_results  # noqa: E402
from _machine import cpu_model, load_average  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="files per cohort")
    p.add_argument("--size", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--work", type=Path, default=Path("/tmp/xbmd_bench_decode"))
    p.add_argument(
        "--cohort", type=Path, default=None, help="use this synth cohort's files as the uncompressed set"
    )
    p.add_argument("--tag", default="vm")
    return p


def _cohort(path: Path, n: int, size: int, j2k: float) -> list[Path]:
    from xbmd_batch.synth import SynthConfig, generate_cohort

    if not (path / "cohort.json").is_file():
        cfg = SynthConfig(n=n, size=size, seed=3, j2k_fraction=j2k)
        generate_cohort(path, cfg, progress=False)
    return sorted(p for p in (path / "dicom").rglob("*") if p.is_file())


def _minimal(path: Path, s: int) -> np.ndarray:
    import cv2
    import pydicom

    a = pydicom.dcmread(path).pixel_array
    y = cv2.resize(a, (s, s), interpolation=cv2.INTER_AREA).astype(np.float32)
    lo, hi = np.percentile(y, (0.5, 99.5))
    return ((np.clip((y - lo) / (hi - lo), 0, 1) - 0.5) / 0.25)[None]


def measure(files: list[Path], s: int, repeat: int, with_minimal: bool) -> dict[str, Any]:
    from xbmd_batch import preprocess_v2
    from xbmd_batch.config import PreprocessConfig
    from xbmd_batch.preprocess import load_and_preprocess

    cur = PreprocessConfig(image_size=s)  # the current definition (version 4: no block means)
    v3 = dataclasses.replace(cur, version=3)  # block means (issue 11, first fast path)
    v2 = dataclasses.replace(cur, version=2)
    new = f"v{cur.version}"
    methods = {
        new: lambda p: load_and_preprocess(p, cur)[0],
        "v3": lambda p: load_and_preprocess(p, v3)[0],
        "v2": lambda p: preprocess_v2.load_and_preprocess(p, v2)[0],
    }
    if with_minimal:
        methods["minimal"] = lambda p: _minimal(p, s)
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}  # process CPU time: robust to a loaded box
    parity: dict[str, list[tuple[float, float, float]]] = {new: [], "v3": []}
    levels: list[int] = []
    for p in files:  # warm: page cache, imports, weight caches
        ref = methods["v2"](p)
        for m in parity:
            d = np.abs(methods[m](p) - ref)
            parity[m].append((float(d.mean()), float(np.percentile(d, 99)), float(d.max())))
        levels.append(load_and_preprocess(p, cur)[1].reduce_level)
        if with_minimal:
            methods["minimal"](p)
    for _ in range(repeat):
        for p in files:
            for name, fn in methods.items():
                t, c = time.perf_counter(), time.process_time()
                fn(p)
                times[name].append((time.perf_counter() - t) * 1e3)
                cpu[name].append((time.process_time() - c) * 1e3)
    out: dict[str, Any] = {
        name: {
            "median_ms": round(statistics.median(v), 2),
            "p90_ms": round(float(np.percentile(v, 90)), 2),
            "cpu_median_ms": round(statistics.median(cpu[name]), 2),
        }
        for name, v in times.items()
    }
    out["current"] = new
    for m, rows in parity.items():
        par = np.array(rows)
        out[f"parity_{m}_vs_v2"] = {
            "mean": float(par[:, 0].mean()),
            "p99_worst_file": float(par[:, 1].max()),
            "max": float(par[:, 2].max()),
        }
    out["reduce_levels"] = sorted(set(levels))
    if with_minimal:
        for m in (new, "v3"):
            out[f"{m}_over_minimal"] = round(out[m]["median_ms"] / out["minimal"]["median_ms"], 3)
            out[f"{m}_over_minimal_cpu"] = round(out[m]["cpu_median_ms"] / out["minimal"]["cpu_median_ms"], 3)
    out[f"v2_over_{new}"] = round(out["v2"]["median_ms"] / out[new]["median_ms"], 2)
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    import cv2

    cv2.setNumThreads(1)
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass
    if args.cohort is not None:
        raw = sorted(p for p in (args.cohort / "dicom").rglob("*") if p.is_file())[: args.n]
    else:
        raw = _cohort(args.work / f"raw_{args.size}_{args.n}", args.n, args.size, 0.0)
    j2k = _cohort(args.work / f"j2k_{args.size}_{args.n}", max(4, args.n // 2), args.size, 1.0)
    load_before = load_average()
    t0 = time.time()
    res = {
        "uncompressed": measure(raw, args.image_size, args.repeat, with_minimal=True),
        "j2k_lossless": measure(j2k, args.image_size, args.repeat, with_minimal=False),
    }
    r = {
        "benchmark": "decode_fastpath",
        "synthetic": True,
        "command": command_line("decode_fastpath.py"),
        "cpu": cpu_model(),
        "cores_used": 1,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "seconds": round(time.time() - t0, 1),
        "n_files": {"uncompressed": len(raw), "j2k_lossless": len(j2k)},
        "image_size": args.image_size,
        "results": res,
    }
    write_results(f"decode_fastpath_{args.tag}", r, _markdown(r))
    return r


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# decode + preprocess per image, one core (SYNTHETIC cohorts, {r['image_size']} px)",
        "",
        f"`{r['command']}` · {r['cpu']} · load average before {r['load_average_before']}, after "
        f"{r['load_average_after']} (shared box: compare ratios) · files {r['n_files']}",
        "",
        "| cohort | method | median wall ms | p90 wall ms | median CPU ms |",
        "|---|---|---|---|---|",
    ]
    for cohort, res in r["results"].items():
        for m in (res["current"], "v3", "v2", "minimal"):
            if m in res:
                r_ = res[m]
                lines.append(
                    f"| {cohort} | {m} | {r_['median_ms']} | {r_['p90_ms']} | {r_['cpu_median_ms']} |"
                )
    lines.append("")
    for cohort, res in r["results"].items():
        new = res["current"]
        extra = ""
        if f"{new}_over_minimal" in res:
            extra = (
                f"; {new} / minimal = {res[f'{new}_over_minimal']} (wall), {res[f'{new}_over_minimal_cpu']} "
                f"(CPU); v3 / minimal = {res['v3_over_minimal']} (wall), {res['v3_over_minimal_cpu']} (CPU)"
            )
        lines.append(
            f"- {cohort}: v2 / {new} = {res[f'v2_over_{new}']}{extra}; reduce levels {res['reduce_levels']}"
        )
        for m in (new, "v3"):
            par = res[f"parity_{m}_vs_v2"]
            lines.append(
                f"  - |{m} - v2| mean {par['mean']:.2e}, worst-file p99 {par['p99_worst_file']:.2e}, "
                f"max {par['max']:.2e} (model-input units)"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(get_args_parser().parse_args())
