"""Benchmark `xbmd-batch synth`: seconds per subject for a SYNTHETIC cohort at full size.

Usage: .venv/bin/python benchmarks/synth_speed.py --n 1000 --size 2500 --workers 2 [--keep DIR]
Prints the command, machine, load, n, size, workers and s/subject, and one JSON line with the same.
The output folder is a temporary directory, deleted afterwards unless --keep is given (1,000 full-size
subjects take about 10 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from xbmd_batch.synth import SynthConfig, generate_cohort


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=2500)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--j2k-fraction", type=float, default=SynthConfig.j2k_fraction)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep the cohort")
    args = ap.parse_args(argv)

    out = args.keep or Path(tempfile.mkdtemp(prefix="synth_speed_"))
    cfg = SynthConfig(
        n=args.n, size=args.size, seed=args.seed, workers=args.workers, j2k_fraction=args.j2k_fraction
    )
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    s = generate_cohort(out, cfg, progress=sys.stderr.isatty())
    wall = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in (out / "dicom").rglob("*") if p.is_file())
    if args.keep is None:
        shutil.rmtree(out, ignore_errors=True)
    res = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "n": args.n,
        "size": args.size,
        "workers": s.workers,
        "j2k_fraction": args.j2k_fraction,
        "seconds": round(wall, 2),
        "s_per_subject": round(wall / args.n, 4),
        "projected_s_per_1000": round(1000 * wall / args.n, 1),
        "dicom_gb": round(nbytes / 1e9, 3),
        "note": "SYNTHETIC cohort; other processes may share the CPU (see loadavg)",
    }
    for k, v in res.items():
        print(f"{k:>22}: {v}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
