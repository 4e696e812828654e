"""Helpers the benchmark scripts share: where results go, how a run records its command, the random-weight
model's predictions, and running the CLI while sampling its peak RSS.

Run the scripts from a checkout (``.venv/bin/python benchmarks/X.py``: this folder is then on ``sys.path``);
importing this module puts the repository root there too, for ``export``/``train``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def command_line(script: str) -> str:
    """This run's command as the results record it (``.venv/bin/python benchmarks/<script> ARGS``)."""
    return " ".join([".venv/bin/python", f"benchmarks/{script}", *sys.argv[1:]])


def write_results(
    stem: str, result: dict[str, Any], markdown: str, default: Callable[[Any], Any] | None = None
) -> None:
    """benchmarks/results/<stem>.json and .md; the markdown is printed too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=default) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)


def emit_json(result: dict[str, Any], path: Path | None) -> None:
    """Print the result as JSON, and write it to ``path`` when one was given (``--json``)."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def predict(model: Any, xs: Sequence[Any], n_fields: int, batch: int = 16) -> Any:
    """bmd predictions (float64 numpy) of a torch model for preprocessed images, metadata all missing (so
    only the image path differs between inputs), in batches of ``batch``."""
    import numpy as np
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(xs), batch):
            b = torch.from_numpy(np.stack(xs[i : i + batch]))
            z = model(b, torch.zeros(len(b), n_fields), torch.zeros(len(b), n_fields))
            out.append((z[0] if isinstance(z, tuple) else z).numpy())
    return np.concatenate(out).astype(np.float64)


@dataclass
class SampledRun:
    returncode: int
    stderr: bytes
    wall_s: float  # from start to the process's exit
    peak_rss_main: int  # bytes
    peak_rss_tree: int  # bytes: main + all its children (decode workers, forkserver); 0 unless tree=True


def run_sampling_rss(cmd: list[str], cwd: Path | None = None, tree: bool = False) -> SampledRun:
    """Run ``cmd`` (stdout/stderr captured) and sample the RSS of its process (and, with ``tree``, of its
    children too) every 0.1 s until it exits."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = {"main": 0, "tree": 0}
    stop = threading.Event()

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                main = p.memory_info().rss
                sub = sum(c.memory_info().rss for c in p.children(recursive=True)) if tree else 0
            except psutil.Error:
                break
            peak["main"] = max(peak["main"], main)
            if tree:
                peak["tree"] = max(peak["tree"], main + sub)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    return SampledRun(proc.returncode, err, wall, peak["main"], peak["tree"])
