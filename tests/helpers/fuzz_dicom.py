"""Fuzzing the reader path (discover sniff -> header read -> decode -> preprocess) over mutated DICOM bytes.

Shared by the bounded CI test (tests/test_fuzz_reader.py) and the long run (benchmarks/fuzz_reader.py).
Seeds: small real-world files shipped with pydicom (CT, MR, RLE, JPEG 2000, JPEG-LS, JPEG, big endian,
no meta, truncated, RGB, RT plan/dose, SR) plus synthetic hip images from xbmd_batch.testing (uncompressed
12/16/8-bit, MONOCHROME1 with rescale, preamble-less, JPEG 2000, RLE). Mutations (hypothesis strategies):
byte flips, random overwrites, truncation, insertion, deletion, chunk duplication, and targeted values in
the fields decoders trust (Rows, Columns, Bits*, SamplesPerPixel, NumberOfFrames, element lengths, the
transfer syntax). The only allowed outcomes of ``reader_path`` are a result ("ok") or what the pipeline
turns into a listed file or a failure row; anything escaping, hanging or crashing the process is a bug.
"""

from __future__ import annotations

import os
import signal
import struct
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

REAL_SEEDS = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_truncated.dcm",
    "JPEG2000.dcm", "JPGExtended.dcm", "no_meta.dcm", "ExplVR_BigEnd.dcm", "SC_rgb_small_odd.dcm",
    "rtdose_1frame.dcm", "rtplan.dcm", "image_dfl.dcm", "emri_small_RLE.dcm", "693_J2KI.dcm",
)  # fmt: skip

# (group, element) of values that size buffers or pick code paths
_TARGET_TAGS = (
    (0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100), (0x0028, 0x0101), (0x0028, 0x0102),
    (0x0028, 0x0103), (0x0028, 0x0002), (0x0028, 0x0008), (0x0028, 0x0004), (0x0002, 0x0010),
    (0x0028, 0x1052), (0x0028, 0x1053), (0x7FE0, 0x0010), (0x0028, 0x0030), (0x0008, 0x0018),
)  # fmt: skip
_INTERESTING = (0, 1, 2, 7, 8, 12, 15, 16, 17, 32, 33, 64, 255, 0x7FFF, 0x8000, 0xFFFF, 60000, 0xFFFFFFFF)


class FuzzTimeout(BaseException):
    """Raised by the per-file alarm; a BaseException so no `except Exception` in the pipeline can hide it."""


@cache
def seeds() -> tuple[tuple[str, bytes], ...]:
    """(name, bytes) of every seed available here (real ones are skipped if pydicom lacks them)."""
    import pydicom.data

    out: list[tuple[str, bytes]] = []
    base = Path(pydicom.data.__file__).parent / "test_files"
    for name in REAL_SEEDS:
        p = base / name
        if p.is_file() and p.stat().st_size < 200_000:
            out.append((f"real:{name}", p.read_bytes()))
    out.extend(_synthetic_seeds())
    return tuple(out)


def _synthetic_seeds() -> list[tuple[str, bytes]]:
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from xbmd_batch.testing import make_dicom

    specs = [
        ("synth:u16", {"rows": 48, "cols": 40, "bits_stored": 12}),
        ("synth:mono1", {"rows": 40, "cols": 48, "photometric": "MONOCHROME1", "rescale": (0.5, -100.0)}),
        ("synth:u8", {"rows": 32, "cols": 32, "bits_stored": 8}),
        ("synth:no-preamble", {"rows": 32, "cols": 40, "preamble": False}),
        ("synth:j2k", {"rows": 48, "cols": 48, "transfer_syntax": JPEG2000Lossless}),
        ("synth:rle", {"rows": 40, "cols": 32, "transfer_syntax": RLELossless}),
    ]
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name, kw in specs:
            try:
                p = make_dicom(Path(d) / "x.dcm", **kw)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - an encoder or option missing here: fewer seeds, not a failure
                continue
            out.append((name, p.read_bytes()))
    return out


def _value_sites(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the value (or length field) of each targeted element found in the bytes."""
    sites = []
    for g, e in _TARGET_TAGS:
        for endian in ("<", ">"):
            tag = struct.pack(f"{endian}HH", g, e)
            i = data.find(tag)
            while i != -1 and len(sites) < 64:
                sites.append((i + 4, 4))  # VR + length (explicit) or the 4-byte length (implicit)
                sites.append((i + 8, 4))  # the value (short values) / the length (long explicit VRs)
                i = data.find(tag, i + 4)
    return sites


@st.composite
def mutated_dicom(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed with 1-4 mutations; returns (description, bytes)."""
    pool = seeds()
    name, raw = pool[draw(st.integers(0, len(pool) - 1))]
    data = bytearray(raw)
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(
            st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete", "dup", "value", "value"])
        )
        n = len(data)
        pos = draw(st.integers(0, n - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif kind == "dup":
            k = draw(st.integers(1, 256))
            data[pos:pos] = data[pos : pos + k]
        else:
            sites = _value_sites(bytes(data))
            if not sites:
                continue
            off, _ = sites[draw(st.integers(0, len(sites) - 1))]
            v = draw(st.sampled_from(_INTERESTING) | st.integers(0, 0xFFFFFFFF))
            fmt = draw(st.sampled_from(["<H", "<I", ">H", ">I"]))
            packed = struct.pack(fmt, v & (0xFFFF if fmt.endswith("H") else 0xFFFFFFFF))
            data[off : off + len(packed)] = packed
        steps.append(f"{kind}@{pos}")
    return f"{name} {' '.join(steps)}", bytes(data)


def _alarm(_signum: int, _frame: object) -> None:
    raise FuzzTimeout()


def reader_path(path: Path, image_size: int = 32, timeout_s: float = 10.0) -> str:
    """Run one file through the pipeline's own per-file functions; return the outcome label.

    "non_dicom" / "unreadable" (listed by discover), "header_error" (a failure row), "non_image" (no
    rows/columns: listed), "ok", or "failure:<reason>" (a decode failure row). FuzzTimeout / any exception
    escaping these functions propagates: the caller counts it as a bug.
    """
    import pyarrow as pa

    from xbmd_batch.config import PreprocessConfig
    from xbmd_batch.score import decode, discover, headers

    root, rel = path.parent, path.name
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        kind, _ = discover._classify(root, rel)
        if kind != "dicom":
            return kind
        row = headers._read_one(root, rel)
        if row["header_error"] is not None:
            return "header_error"
        if not row.get("rows") or not row.get("columns"):
            return "non_image"
        decode._init_worker(
            str(root), pa.array([rel], pa.large_string()), PreprocessConfig(image_size).to_dict()
        )
        task = decode.decode_task(np.array([0], dtype=np.int64))
        if task.ok[0]:
            img = task.images[0]
            if img.shape != (1, image_size, image_size) or not np.isfinite(img).all():
                return "bad_result"
            return "ok"
        return f"failure:{task.failures[0][1]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


ALLOWED_PREFIXES = ("ok", "non_dicom", "unreadable", "header_error", "non_image", "failure:")


def is_allowed(outcome: str) -> bool:
    return outcome.startswith(ALLOWED_PREFIXES) and outcome != "failure:out_of_memory"


def scratch_dir() -> str:
    return (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    )
