"""OUT/run.json: what ran, on what, with which model, and how it went (one JSON object, written atomically).

Enough to reproduce or audit a run: package versions, machine, model/engine sha256, backend and why it was
chosen, precision, options, reconciliation counts, per-stage timings and shares, throughput.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata as _md
from pathlib import Path
from typing import Any

from xbmd_batch import __version__
from xbmd_batch.fsutil import atomic_write_json

_DISTS = (
    "numpy", "pydicom", "polars", "pyarrow", "pillow", "torch", "torchvision", "onnx", "onnxruntime",
    "onnxruntime-gpu", "tensorrt", "pylibjpeg", "pylibjpeg-openjpeg", "python-gdcm",
)  # fmt: skip


def versions() -> dict[str, str]:
    """Installed versions (read from package metadata: nothing heavy is imported)."""
    out = {"xbmd_batch": __version__, "python": platform.python_version()}
    for d in _DISTS:
        try:
            out[d] = _md.version(d)
        except _md.PackageNotFoundError:
            pass
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except (ImportError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def is_synthetic(dicom_dir: Path) -> bool:
    """A cohort made by `xbmd-batch synth` has cohort.json (SYNTHETIC disclaimer) beside or in DIR."""
    for p in (Path(dicom_dir) / "cohort.json", Path(dicom_dir).parent / "cohort.json"):
        if p.is_file():
            try:
                return "SYNTHETIC" in p.read_text().upper()
            except OSError:
                return False
    return False


def write_run_json(out_dir: Path, manifest: dict[str, Any]) -> Path:
    path = Path(out_dir) / "run.json"
    atomic_write_json(path, manifest)
    return path


def stage_shares(timings: dict[str, float]) -> dict[str, float]:
    """Each stage's share of the summed stage time (decode counted as worker-seconds / workers)."""
    tot = sum(v for v in timings.values() if v > 0)
    return {k: round(v / tot, 4) if tot > 0 else 0.0 for k, v in timings.items()}
