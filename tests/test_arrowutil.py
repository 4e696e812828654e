"""arrowutil.to_arrow: the arrays ``pa.array`` would give, without importing pandas; and a whole `score` run
on the onnxruntime path keeps pandas (and torch) out of the main process (issue 11, main-process RSS)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from xbmd_batch.arrowutil import to_arrow


def test_to_arrow_matches_pa_array() -> None:
    cases = [
        (np.array(["a", None, "é"], dtype=object), pa.string()),
        (["x", "y"], pa.large_string()),
        (np.array([], dtype=object), pa.string()),
        (np.array([1.5, -2.0], np.float32), pa.float32()),
        (np.array([3, 4], np.int64), pa.int32()),
        (np.array([True, False]), pa.bool_()),
    ]
    for values, dtype in cases:
        got = to_arrow(values, dtype)
        assert got.type == dtype and got.equals(pa.array(values, type=dtype)), (values, dtype)
    size = np.array([5, -1, 7], np.int64)
    masked = to_arrow(size, pa.int64(), mask=size < 0)
    assert masked.equals(pa.array(size, mask=size < 0)) and masked.null_count == 1
    arr = pa.array([1, 2], pa.int64())
    assert to_arrow(arr, pa.int32()).equals(arr.cast(pa.int32()))


def test_score_main_process_imports_neither_pandas_nor_torch(
    cohort_session: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    code = (
        "import sys\n"
        "from xbmd_batch.score import ScoreOptions, score_cohort\n"
        f"r = score_cohort({str(cohort_session / 'dicom')!r}, {str(cohort_session / 'meta.csv')!r}, "
        f"{str(tiny_onnx)!r}, {str(tmp_path / 'out')!r}, "
        "ScoreOptions(quiet=True, workers=0, backend='onnxruntime', batch_size=8))\n"
        "assert r.counts['scored'] > 0, r.counts\n"
        "print('pandas' in sys.modules, 'torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "False False", res.stdout
