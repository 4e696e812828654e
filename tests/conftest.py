"""Shared pytest fixtures: a tiny model (.pt and .onnx) and a tiny synthetic cohort, built once per session.

The builders live in tests/helpers/ (``from tests.helpers.score import make_model``); the DICOM factory is
``xbmd_batch.testing`` (benchmarks use it too).
"""

from __future__ import annotations

import shutil
import signal
import warnings
from pathlib import Path

import pytest

from tests.helpers.score import export_onnx, make_cohort, make_model


@pytest.fixture(autouse=True)
def _sigint_left_alone():
    """No test may leave this process's Ctrl-C handler changed: a change is undone and reported as a warning
    naming the test that made it, instead of failing an unrelated later test that checks the handler."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        warnings.warn(f"this test left SIGINT set to {after!r}; restored to {before!r}", RuntimeWarning, 2)


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
