"""Shared pytest fixtures: a tiny model (.pt and .onnx) and a tiny synthetic cohort, built once per session.

The builders live in tests/helpers/ (``from tests.helpers.score import make_model``); the DICOM factory is
``xbmd_batch.testing`` (benchmarks use it too).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.score import export_onnx, make_cohort, make_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    return export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="session")
def cohort_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort") / "c")


@pytest.fixture()
def cohort(cohort_session: Path, tmp_path: Path) -> Path:
    """A private copy of the session cohort (tests may plant files in it)."""
    dst = tmp_path / "cohort"
    shutil.copytree(cohort_session, dst)
    return dst
