"""fsutil: atomic writes leave the old file or the new one (never half), with normal permissions."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xbmd_batch.fsutil import atomic_open, atomic_write_json, atomic_write_parquet, now_iso, sha256_file


def test_atomic_open_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(p) as f:
        f.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]  # the temp file is gone


def test_atomic_writes_land_whole_with_normal_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "sub" / "a.json", {"b": 1, "a": Path("x")})
        atomic_write_parquet(tmp_path / "t.parquet", pa.table({"x": [1, 2, 3]}))
    finally:
        os.umask(umask)
    assert (tmp_path / "sub" / "a.json").read_text() == '{\n  "b": 1,\n  "a": "x"\n}\n'
    assert pq.read_table(tmp_path / "t.parquet").column("x").to_pylist() == [1, 2, 3]
    assert (tmp_path / "t.parquet").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert not list(tmp_path.glob("**/*.tmp"))


def test_sha256_and_now_iso(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"abc" * 1000)
    assert sha256_file(p, chunk=7) == hashlib.sha256(b"abc" * 1000).hexdigest()
    t = dt.datetime.fromisoformat(now_iso())
    assert t.utcoffset() == dt.timedelta(0) and t.microsecond == 0
