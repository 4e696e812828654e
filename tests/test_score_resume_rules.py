"""Resume rules (issue 13, attacks 4.3, 4.10, 4.11): transient failures retried, changed files redone,
corrupt parts moved aside."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xbmd_batch.score.resume import CORRUPT_DIR, check_parts, is_done, is_transient, latest_rows


@pytest.mark.parametrize(
    ("reason", "transient"),
    [
        ("worker_crashed", True),
        ("out_of_memory", True),
        ("file_missing", True),
        ("decode_error:OSError", True),
        ("decode_error:PermissionError", True),
        ("invalid_image", False),
        ("unsupported_transfer_syntax", False),
        ("undecodable_pixel_data", False),
        ("decode_error:ValueError", False),
        ("nonfinite_prediction", False),
        (None, False),
    ],
)
def test_transient_vs_content(reason: str | None, transient: bool) -> None:
    assert is_transient(reason) is transient


def _part(path: Path, rows: list[tuple[str, str, str, str | None, int | None, int | None]]) -> None:
    cols = list(zip(*rows, strict=True))
    t = pa.table({
        "status": pa.array(cols[2], pa.string()), "relative_path": pa.array(cols[0], pa.string()),
        "sop_instance_uid": pa.array(cols[1], pa.string()), "reason": pa.array(cols[3], pa.string()),
        "file_size": pa.array(cols[4], pa.int64()), "file_mtime_ns": pa.array(cols[5], pa.int64()),
    })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path)


def test_latest_row_wins_and_is_done(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    _part(parts / "part-00000.parquet", [("a", "1", "failed", "worker_crashed", 10, 5),
                                         ("b", "2", "failed", "invalid_image", 10, 5),
                                         ("c", "3", "scored", None, 10, 5)])  # fmt: skip
    _part(parts / "part-00001.parquet", [("a", "1", "scored", None, 10, 5)])
    rows = latest_rows(tmp_path)
    assert rows[("a", "1")][0] == "scored"
    assert is_done(rows[("a", "1")], 10, 5) and is_done(rows[("b", "2")], 10, 5)
    assert not is_done(rows[("c", "3")], 11, 5)  # size changed in place
    assert not is_done(rows[("c", "3")], 10, 6)  # mtime changed in place
    assert not is_done(("failed", "worker_crashed", 10, 5), 10, 5)  # transient: retried
    assert is_done(("scored", None, None, None), 10, 5)  # parts of older versions carry no stats
    assert not is_done(None, 1, 1)


def test_corrupt_part_moved_aside(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    _part(parts / "part-00000.parquet", [("a", "1", "scored", None, 1, 1)])
    _part(parts / "part-00001.parquet", [("b", "2", "scored", None, 1, 1)])
    data = (parts / "part-00001.parquet").read_bytes()
    (parts / "part-00001.parquet").write_bytes(data[: len(data) // 2])
    res = check_parts(tmp_path)
    assert [n for n, _ in res.moved] == ["part-00001.parquet"]
    assert (tmp_path / CORRUPT_DIR / "part-00001.parquet").is_file()
    assert set(latest_rows(tmp_path)) == {("a", "1")}
    _part(parts / "part-00001.parquet", [("b", "2", "scored", None, 1, 1)])
    (parts / "part-00001.parquet").write_bytes(b"PAR1 garbage")
    assert [n for n, _ in check_parts(tmp_path).moved] == ["part-00001.parquet"]
    assert (tmp_path / CORRUPT_DIR / "part-00001.parquet.1").is_file()  # an earlier one is never overwritten
