"""Decode-worker CPU per JPEG 2000 file: the CPU path (resolution-aware reduced decode + preprocessing, what a
worker does without GPU decode) vs the GPU hand-off (``dicom_io.read_for_device``: every check, frame 0's
codestream extracted, plus its copy into a shared-memory-like buffer and the main process's copy out), on one
core. The GPU decode itself is not here (no GPU in the session that wrote this). SYNTHETIC files
(``xbmd-batch synth DIR --j2k-fraction 1 --size 2000``).

Run:  .venv/bin/python benchmarks/j2k_worker_cost.py DICOM_DIR N [--repeat 3] [--tag vm]
Writes benchmarks/results/j2k_worker_cost_<tag>.json.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from xbmd_batch import dicom_io, preprocess  # noqa: E402
from xbmd_batch.config import PreprocessConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TAG = sys.argv[sys.argv.index("--tag") + 1] if "--tag" in sys.argv else "vm"
REPEAT = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 3
cfg = PreprocessConfig()
files = sorted(p for p in Path(sys.argv[1]).rglob("*") if p.is_file())[: int(sys.argv[2])]
slot = np.empty(16 << 20, np.uint8)


def cpu_path(p: Path) -> None:
    preprocess.load_and_preprocess(p, cfg)


def handoff(p: Path) -> int:
    cs, _ = dicom_io.read_for_device(p, target_size=cfg.image_size, apply_voi=cfg.apply_voi)
    assert isinstance(cs, dicom_io.Codestream), p
    n = len(cs.data)
    slot[:n] = np.frombuffer(cs.data, np.uint8)  # worker: into the slot
    slot[:n].tobytes()  # main process: its own copy (score/decode._reduced_view)
    return n


def cpu_ms(fn, p: Path) -> float:
    best = []
    for _ in range(REPEAT):
        t0 = time.process_time()
        fn(p)
        best.append((time.process_time() - t0) * 1e3)
    return min(best)


with threadpool_limits(limits=1):
    for p in files[:2]:  # warm-up (imports, caches)
        cpu_path(p), handoff(p)
    rows = []
    for p in files:
        level = dicom_io.read_for_device(p, cfg.image_size)[0].cpu_level  # the CPU path's wavelet level
        rows.append(
            {"file": p.name, "cpu_path_ms": cpu_ms(cpu_path, p), "handoff_ms": cpu_ms(handoff, p),
             "codestream_bytes": handoff(p), "cpu_level": level}
        )  # fmt: skip
med = {k: statistics.median(r[k] for r in rows) for k in ("cpu_path_ms", "handoff_ms", "codestream_bytes")}
out = {
    "machine": os.uname().nodename,
    "load_avg": os.getloadavg(),
    "files": len(rows),
    "repeat_best_of": REPEAT,
    "median": med,
    "ratio_cpu_path_over_handoff": med["cpu_path_ms"] / med["handoff_ms"],
    "rows": rows,
    "note": "SYNTHETIC; process CPU ms, one thread; the GPU decode is not included",
}
(ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
(ROOT / "benchmarks" / "results" / f"j2k_worker_cost_{TAG}.json").write_text(json.dumps(out, indent=2))
print(
    json.dumps({k: out[k] for k in ("load_avg", "files", "median", "ratio_cpu_path_over_handoff")}, indent=2)
)
