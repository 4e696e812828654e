"""Reader-path crashes found by the fuzzer (issue 13), kept as regression files in tests/fuzz_cases/."""

from __future__ import annotations

import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.errors import InputError
from xbmd_batch.preprocess import load_and_preprocess
from xbmd_batch.score import decode
from xbmd_batch.testing import make_dicom

DATA = Path(__file__).parent / "fuzz_cases"


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("gdcm_abort_jpegls.dcm", "compressed frame is 64x64 pixels but Rows/Columns say 1024x64"),
        ("gdcm_abort_j2k.dcm", "every decoder failed"),  # J2K main header unreadable: gdcm not tried
    ],
)
def test_gdcm_abort_files_are_failures_not_a_dead_process(name: str, says: str) -> None:
    """gdcm called std::terminate on these (corrupt JPEG-LS size, J2K main header): the process died."""
    code = (
        "import sys; from xbmd_batch.preprocess import load_and_preprocess; from xbmd_batch.config import "
        "PreprocessConfig; from xbmd_batch.errors import InputError\n"
        f"try:\n    load_and_preprocess({str(DATA / name)!r}, PreprocessConfig(32))\n"
        "except InputError as e:\n    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused:" in r.stdout and says in r.stdout


def test_rust_decoder_panic_becomes_a_failure_row() -> None:
    """pylibjpeg-rle panicked (pyo3 PanicException is a BaseException) and escaped `except Exception`."""
    decode._init_worker(
        str(DATA), pa.array(["rle_panic.dcm"], pa.large_string()), PreprocessConfig(32).to_dict()
    )
    task = decode.decode_task(np.array([0], dtype=np.int64))
    assert not task.ok[0]
    assert task.failures[0][1].startswith(("decode_error:", "invalid_image", "unsupported"))


def test_corrupt_element_length_does_not_allocate_it(tmp_path: Path) -> None:
    """A PixelData length of 0xFFFFFFF0 in a 4 kB file made pydicom ask for a 4 GB buffer."""
    p = make_dicom(tmp_path / "x.dcm", rows=32, cols=32)
    data = bytearray(p.read_bytes())
    i = data.find(b"\xe0\x7f\x10\x00OW\x00\x00")
    assert i > 0
    data[i + 8 : i + 12] = struct.pack("<I", 0xFFFFFFF0)
    p.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        try:  # the pixel bytes that are there may decode; either outcome is fine, the allocation is not
            arr, _ = load_and_preprocess(p, PreprocessConfig(32))
            assert arr.shape == (1, 32, 32)
        except (InputError, ValueError):
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
