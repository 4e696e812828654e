"""D1: the GPU install is split (onnxruntime-gpu installs from the standard index alone) and doctor names
the missing GPU piece with its fix."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from xbmd_batch.doctor import collect, gpu_stack

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in reqs}


def test_gpu_extra_is_onnxruntime_gpu_alone_and_tensorrt_is_its_own_extra() -> None:
    extras = _extras()
    # `tensorrt` from PyPI is a placeholder that downloads from pypi.nvidia.com at build time: in the same
    # extra, one unreachable NVIDIA index would also stop onnxruntime-gpu from installing.
    assert "onnxruntime-gpu" in _names(extras["gpu"])
    assert _names(extras["gpu"]) <= {"onnxruntime-gpu", "nvidia-nvimgcodec-cu13"}  # real wheels on PyPI
    assert _names(extras["tensorrt"]) == {"tensorrt"}
    assert "onnxruntime" not in _names(extras["tensorrt"]) | _names(extras["gpu"])


def _info(**over: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": {
            "installed": True,
            "version": "2.14.1",
            "cuda_build": "13.0",
            "cuda_available": True,
            "devices": ["NVIDIA H200 (sm_90)"],
        },
        "onnxruntime": {
            "installed": True,
            "distributions": ["onnxruntime-gpu"],
            "version": "1.31.1",
            "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        },
        "tensorrt": {"installed": True, "version": "11.4.0.106"},
    }
    for k, v in over.items():
        info[k] = {**info[k], **v}
    return info


def _rows(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["piece"]: r for r in gpu_stack(info)}


def test_gpu_stack_all_ready() -> None:
    rows = _rows(_info())
    assert [r["ready"] for r in rows.values()] == [True, True, True]
    assert all(r["fix"] == "" for r in rows.values())


def test_gpu_stack_names_missing_tensorrt_only() -> None:
    rows = _rows(
        _info(tensorrt={"installed": False, "error": "ModuleNotFoundError: No module named 'tensorrt'"})
    )
    assert rows["torch-cuda"]["ready"] and rows["onnxruntime-cuda"]["ready"]
    assert not rows["tensorrt"]["ready"]
    assert "xbmd-batch[tensorrt]" in rows["tensorrt"]["fix"] and "pypi.nvidia.com" in rows["tensorrt"]["fix"]


def test_gpu_stack_cpu_onnxruntime_and_both_builds() -> None:
    cpu = _rows(
        _info(
            onnxruntime={
                "distributions": ["onnxruntime"],
                "version": "1.32.0",
                "providers": ["CPUExecutionProvider"],
            }
        )
    )
    assert not cpu["onnxruntime-cuda"]["ready"] and "CPU build" in cpu["onnxruntime-cuda"]["why"]
    assert "xbmd-batch[gpu]" in cpu["onnxruntime-cuda"]["fix"]
    both = _rows(_info(onnxruntime={"distributions": ["onnxruntime", "onnxruntime-gpu"]}))
    assert not both["onnxruntime-cuda"]["ready"] and "both" in both["onnxruntime-cuda"]["why"]


def test_gpu_stack_torch_without_gpu() -> None:
    rows = _rows(_info(torch={"cuda_available": False, "devices": []}))
    assert not rows["torch-cuda"]["ready"] and "nvidia-smi" in rows["torch-cuda"]["fix"]
    cpu_build = _rows(_info(torch={"cuda_available": False, "cuda_build": None, "devices": []}))
    assert "CPU-only build" in cpu_build["torch-cuda"]["why"]


def test_collect_reports_the_stack_of_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        sys.modules, "tensorrt", None
    )  # import tensorrt -> ImportError, whatever is installed
    info = collect()
    rows = {r["piece"]: r for r in info["gpu_stack"]}
    assert set(rows) == {"torch-cuda", "onnxruntime-cuda", "tensorrt"}
    assert rows["tensorrt"]["ready"] is False and rows["tensorrt"]["fix"]
    assert info["onnxruntime"]["distributions"]  # this venv has one onnxruntime build installed
