"""preprocess_torch.finish_batch, current vs a previous revision, on CPU torch (NOT a GPU number).

Not a test. The on-device finishing path is meant for CUDA; this only compares the two implementations'
host-side work on CPU torch (same inputs, interleaved, ``--repeat`` rounds), where the old one padded the
whole batch to (B, hmax, wmax) float32 with per-item weight matrices and the new one works per geometry
group. The ratio says nothing reliable about a GPU (different memory system, kernel launch costs, no
Python per-item loop cost relative to the same work); `benchmarks/gpu_first_light.sh` measures the GPU.

Inputs: SYNTHETIC ``preprocess.Reduced`` items made here (uint16 phantoms, 12-bit, full-resolution like
preprocessing version 4 hands over), ``--shapes`` distinct detector shapes cycled over the batch.

Run:  .venv/bin/python benchmarks/finish_batch_cpu.py [--b 16] [--size 2000] [--old-rev 5baaa48] [--threads 2]
Prints one JSON line (and the machine's load average) to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from _machine import cpu_model, load_average  # noqa: E402


def _old_module(rev: str) -> object:
    """``xbmd_batch/preprocess_torch.py`` as of ``rev`` (git), imported under another name."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:xbmd_batch/preprocess_torch.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "preprocess_torch_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("preprocess_torch_old", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _items(b: int, size: int, n_shapes: int) -> list[object]:
    from xbmd_batch.preprocess import Reduced
    from xbmd_batch.testing import hip_phantom

    shapes = [(size - 100 * k, int(size * 0.8) - 60 * k) for k in range(n_shapes)]
    out = []
    for i in range(b):
        h, w = shapes[i % n_shapes]
        px = hip_phantom(h, w, 12, seed=i).astype(np.uint16)
        out.append(Reduced(px, float(px[0, 0]), 1.0, 0.0, 1, 0.0, (h, w)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=16)
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--shapes", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old-rev", default="5baaa48")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from xbmd_batch import preprocess_torch as new
    from xbmd_batch.config import PreprocessConfig

    old = _old_module(a.old_rev)
    cfg = PreprocessConfig()
    items = _items(a.b, a.size, a.shapes)
    ref = old.finish_batch(items, cfg, "cpu")  # warm-up (geometry caches) and parity
    got = new.finish_batch(items, cfg, "cpu")
    times: dict[str, list[float]] = {"old": [], "new": []}
    load_before = load_average()
    for _ in range(a.repeat):
        for name, mod in (("old", old), ("new", new)):
            t0 = time.perf_counter()
            mod.finish_batch(items, cfg, "cpu")
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(
        json.dumps(
            {
                "what": "preprocess_torch.finish_batch on CPU torch (not a GPU number); SYNTHETIC inputs",
                "batch": a.b,
                "shapes": sorted({tuple(r.pixels.shape) for r in items}),  # type: ignore[attr-defined]
                "image_size": cfg.image_size,
                "torch_threads": a.threads,
                "torch": torch.__version__,
                "old_rev": a.old_rev,
                "seconds": times,
                "median_s": med,
                "old_over_new": med["old"] / med["new"],
                "max_abs_diff_model_units": float((ref - got).abs().max()),
                "cpu": cpu_model(),
                "load_average_before_after": [load_before, load_average()],
            }
        )
    )


if __name__ == "__main__":
    main()
