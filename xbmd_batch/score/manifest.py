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
from xbmd_batch.fsutil import atomic_write_json, now_iso

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


def run_manifest(
    run_id: str,
    resumed: bool,
    state: dict[str, Any],
    dicom_dir: Path,
    meta_path: Path,
    model_path: Path,
    model_sha: str,
    card: Any,
    options: Any,
    pseudo: Any,
    reconciliation: dict[str, int],
) -> dict[str, Any]:
    """The part of run.json known before scoring starts (the runner's provenance is added once it loads)."""
    from xbmd_batch.clinical import REFERENCES

    return {
        "format": "xbmd-batch-run",
        "run_id": run_id,
        "resumed": resumed,
        "sessions": len(state.get("sessions", [])),
        "created": state.get("created"),
        "finished": None,
        "inputs": {
            "dicom_dir": str(Path(dicom_dir).resolve()),
            "meta": str(Path(meta_path).resolve()),
            "meta_sha256": state["meta_sha256"],
        },
        "model": {
            "path": str(Path(model_path).resolve()),
            "sha256": model_sha,
            "checkpoint_sha256": getattr(card, "checkpoint_sha256", ""),
            "engine_sha256": None,
            "image_size": card.preprocess.image_size,
            "fields": list(card.schema.names),
            "training_synthetic": bool((card.training_summary or {}).get("synthetic", False)),
        },
        "reference": REFERENCES[options.reference].to_dict(),
        "synthetic_cohort": is_synthetic(dicom_dir),
        "pseudonymized": pseudo.enabled,
        "pseudonym_key_fingerprint": pseudo.fingerprint,
        "options": options.to_dict(),
        "versions": versions(),
        "machine": machine_info(),
        "reconciliation": reconciliation,
    }


def refused_strict(run: dict[str, Any], n_quarantined: int, timings: dict[str, float]) -> dict[str, Any]:
    """run.json of a --strict run that stopped after reconciliation."""
    return {
        **run,
        "status": "refused_strict",
        "finished": now_iso(),
        "counts": {"quarantined_before_scoring": n_quarantined},
        "timings_s": timings,
    }


def result_info(
    runner: Any,
    plan: Any,
    fin: dict[str, Any],
    stats: Any,
    todo: Any,
    workers: int,
    timings: dict[str, float],
    wall_s: float,
) -> dict[str, Any]:
    """The part of run.json known once the session ends: status, counts, timings, throughput, WHO classes."""
    stages = {k: round(v, 4) for k, v in timings.items()}
    n_todo, loop_s = int(len(todo)), stats.loop_s
    counts = {
        **plan.counts,
        "scored": fin["scored"],
        "failed_in_scoring": fin["failed_in_scoring"],
        "failures_total": fin["failures_total"],
        "not_processed": fin["not_processed"],
        "skipped_resume": plan.items.height - n_todo,
        "scored_this_session": stats.scored,
        "failed_this_session": stats.failed,
        "parts_written_this_session": stats.parts,
    }
    throughput = {
        "images_per_s": round(n_todo / loop_s, 3) if loop_s > 0 and n_todo else 0.0,
        "scoring_loop_s": round(loop_s, 3),
        "wall_s": round(wall_s, 3),
        "decode_worker_s": round(stats.decode_worker_s, 3),
        "decode_workers": workers,
        "images_this_session": n_todo,
    }
    return {
        "status": "complete" if fin["not_processed"] == 0 else "incomplete",
        "finished": now_iso(),
        "backend": runner.backend,
        "backend_reason": runner.reason,
        "precision": runner.precision,
        "counts": counts,
        "timings_s": stages,
        "stage_shares": stage_shares(stages),
        "throughput": throughput,
        "who_distribution": fin["who_distribution"],
    }
