"""benchmarks/gpu_j2k_check.sh: the prepared GPU JPEG 2000 check parses and plans anywhere (dry-run); its
``base``/``run`` modes need the device box (docs/gpu.md, "JPEG 2000 on the GPU")."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_j2k_check.sh"


def test_dry_run_plans_and_checks_syntax() -> None:
    r = subprocess.run(["bash", str(SCRIPT), "dry-run"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "syntax ok" in r.stdout and "plan:" in r.stdout and ".whl-j2k" in r.stdout


def test_unknown_mode_is_refused() -> None:
    r = subprocess.run(["bash", str(SCRIPT), "nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stdout
