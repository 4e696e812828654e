"""Bounded fuzz of the reader path in CI (issue 13): mutated DICOM bytes give a result or a failure row.

The long run (>= 10^5 examples, in a memory-limited child process watched for crashes and hangs) is
benchmarks/fuzz_reader.py; this runs a fixed (derandomised) sample in-process, with the same per-file alarm.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.helpers import fuzz_dicom as fz  # noqa: E402


def test_seeds_cover_real_and_synthetic_files() -> None:
    names = [n for n, _ in fz.seeds()]
    assert any(n.startswith("real:") for n in names) and any(n.startswith("synth:") for n in names)


def test_every_seed_reads_to_an_allowed_outcome(tmp_path: Path) -> None:
    outcomes = {}
    for name, data in fz.seeds():
        f = tmp_path / "x.dcm"
        f.write_bytes(data)
        outcomes[name] = fz.reader_path(f)
    assert all(fz.is_allowed(o) for o in outcomes.values()), outcomes
    assert outcomes.get("synth:u16") == "ok" and outcomes.get("synth:j2k", "ok") == "ok"


_DIR = Path(tempfile.mkdtemp(prefix="xbmd-fuzz-ci-"))


@settings(max_examples=120, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(fz.mutated_dicom())
def test_mutated_dicoms_never_escape_hang_or_crash(example: tuple[str, bytes]) -> None:
    desc, data = example
    f = _DIR / "x.dcm"
    f.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fz.reader_path(f, timeout_s=20.0)  # FuzzTimeout or an escaping exception fails the test
    assert fz.is_allowed(out), (desc, out)
