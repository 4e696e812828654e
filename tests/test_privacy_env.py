"""Nothing is written outside --out: onnxruntime's telemetry store is switched off (issue 13, attack 3.7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")


def _home_after(tmp_path: Path, name: str, code: str, env_extra: dict[str, str]) -> list[str]:
    home = tmp_path / name
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), **env_extra)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


def test_importing_xbmd_batch_disables_onnxruntime_telemetry(tmp_path: Path) -> None:
    code = "import xbmd_batch, onnxruntime; onnxruntime.get_available_providers()"
    assert _home_after(tmp_path, "ours", code, {}) == []
    control = _home_after(tmp_path, "control", code, {"ORT_DISABLE_TELEMETRY": "0"})  # the user opted in
    if not control:
        pytest.skip("this onnxruntime build writes no telemetry store (nothing to switch off)")
    assert any("onnxruntime" in p for p in control)
