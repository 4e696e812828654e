"""Small pure pieces of the score pipeline: batcher, pseudonymiser, part writer, join rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from xbmd_batch.errors import InputError, ModelFileError
from xbmd_batch.score import runstate
from xbmd_batch.score.batcher import Batcher
from xbmd_batch.score.finalize import screen_column
from xbmd_batch.score.join import KeySpec, join_metadata
from xbmd_batch.score.privacy import Pseudonymizer
from xbmd_batch.score.resume import latest_rows
from xbmd_batch.score.writer import PartWriter, list_parts


def test_batcher_full_and_partial_batches() -> None:
    b = Batcher(batch_size=4, image_size=2)
    got = []
    for start in range(0, 10, 3):  # arrivals of 3, 3, 3, 1
        idx = np.arange(start, min(start + 3, 10))
        imgs = np.stack([np.full((1, 2, 2), i, np.float32) for i in idx])
        got += [(bb.idx.copy(), bb.images[:, 0, 0, 0].copy()) for bb in b.add(idx, imgs)]
    last = b.flush()
    assert [list(i) for i, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all((i == v).all() for i, v in got)  # image k stays with index k
    assert last is not None and list(last.idx) == [8, 9] and list(last.images[:, 0, 0, 0]) == [8, 9]
    assert b.flush() is None


def test_pseudonymizer_hmac() -> None:
    import hashlib
    import hmac

    key = b"k" * 32
    p = Pseudonymizer(key)
    assert p("SUBJ1") == hmac.new(key, b"SUBJ1", hashlib.sha256).hexdigest()
    assert p("SUBJ1") == Pseudonymizer(key)("SUBJ1") != Pseudonymizer(b"j" * 32)("SUBJ1")
    assert p(None) is None
    assert Pseudonymizer(None)("SUBJ1") == "SUBJ1" and Pseudonymizer(None).fingerprint is None
    assert p.fingerprint and "k" not in p.fingerprint
    with pytest.raises(InputError, match="at least 16"):
        Pseudonymizer(b"short")


def test_keyfile_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        Pseudonymizer.from_keyfile(tmp_path / "missing")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        Pseudonymizer.from_keyfile(tmp_path / "empty")


def test_part_writer_numbering_and_latest_rows(tmp_path) -> None:
    def part(rel: list[str], sop: list[str]) -> pa.Table:
        return pa.table({"relative_path": rel, "sop_instance_uid": sop, "status": ["scored"] * len(rel),
                         "reason": pa.nulls(len(rel), pa.string())})  # fmt: skip

    w = PartWriter(tmp_path)
    w.write(part(["a", "b"], ["1", "2"]))
    w.write(part(["c"], ["3"]))
    (tmp_path / "parts" / "part-00007.parquet.tmp").write_bytes(b"garbage")
    w2 = PartWriter(tmp_path)  # a new session continues numbering and removes the stale tmp
    assert w2.next_index == 2
    assert not list((tmp_path / "parts").glob("*.tmp"))
    assert [p.name for p in list_parts(tmp_path)] == ["part-00000.parquet", "part-00001.parquet"]
    assert set(latest_rows(tmp_path)) == {("a", "1"), ("b", "2"), ("c", "3")}


def test_state_pins(tmp_path) -> None:
    expect = {"model_sha256": "m1", "meta_sha256": "x", "pseudonym_key_fingerprint": None, "key_spec": {},
              "dicom_dir": "/d"}  # fmt: skip
    assert runstate.read_state(tmp_path) is None
    s1 = runstate.pin(tmp_path, None, expect, "rid")
    s2 = runstate.read_state(tmp_path)
    assert s2 is not None and s2["run_id"] == s1["run_id"] == "rid"
    runstate.check_pins(tmp_path, s2, expect)
    s3 = runstate.pin(tmp_path, s2, expect, "ignored")
    assert s3["run_id"] == "rid" and len(s3["sessions"]) == 2
    with pytest.raises(ModelFileError):
        runstate.check_pins(tmp_path, s3, {**expect, "model_sha256": "m2"})
    with pytest.raises(InputError, match="META"):
        runstate.check_pins(tmp_path, s3, {**expect, "meta_sha256": "y"})
    with pytest.raises(InputError, match="DICOM folder"):
        runstate.check_pins(tmp_path, s3, {**expect, "dicom_dir": "/elsewhere"})


def test_check_out_dir(tmp_path) -> None:
    d = tmp_path / "dicom"
    d.mkdir()
    meta = tmp_path / "m.csv"
    meta.write_text("subject_id\n")
    with pytest.raises(InputError, match="inside"):
        runstate.check_out_dir(d / "out", d, meta)
    with pytest.raises(InputError, match="inside"):
        runstate.check_out_dir(d, d, meta)
    runstate.check_out_dir(tmp_path / "new" / "out", d, meta)
    assert not (tmp_path / "new").exists()  # checking creates nothing
    other = tmp_path / "other"
    other.mkdir()
    (other / "important.txt").write_text("x")
    with pytest.raises(InputError, match="not an xbmd-batch score output"):
        runstate.check_out_dir(other, d, meta)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "run.lock").write_text("{}")
    (ours / ".run_state.json.abc.tmp").write_text("")  # a first state write the disk refused
    runstate.check_out_dir(ours, d, meta)  # the lock marks it ours: the rerun is not refused


def test_join_by_patient_id_duplicates_and_leftovers() -> None:
    meta = pl.DataFrame({"subject_id": ["A", "B", "B", "C", None]})
    j = join_metadata(
        ["a.dcm", "b.dcm", "x.dcm", "n.dcm"], ["A", "B", "X", None], meta, KeySpec(), "subject_id"
    )
    assert list(j.meta_row) == [0, -1, -1, -1]
    assert j.issue == [None, "ambiguous_metadata", "no_metadata", "no_subject_key"]
    assert j.meta_rows_without_images == [3, 4]  # C, and the row without a key
    assert j.duplicate_meta_keys == {"B": [1, 2]}


def test_join_by_path_column() -> None:
    meta = pl.DataFrame(
        {"participant": ["P1", "P2", "P3"], "file": ["s1/img.dcm", "./s2/img.dcm", "other.dcm"]}
    )
    rels = ["s1/img.dcm", "s2/img.dcm", "s3/other.dcm", "s4/img.dcm"]
    j = join_metadata(rels, ["X", "Y", "Z", "W"], meta, KeySpec("participant", "file"), "subject_id")
    assert list(j.meta_row) == [0, 1, 2, -1]  # "other.dcm" is a unique file name -> s3/other.dcm
    assert j.subject_key[:3] == ["P1", "P2", "P3"]
    assert j.issue[3] == "no_metadata"
    with pytest.raises(InputError, match="no column"):
        join_metadata(rels, ["X"] * 4, meta, KeySpec(None, "nope"), "subject_id")


def test_screen_column_names() -> None:
    assert screen_column(-1.0) == "screen_t_le_m1"
    assert screen_column(-2.5) == "screen_t_le_m2_5"


def test_unknown_backend_refused_before_out_is_touched(tmp_path: Path) -> None:
    from xbmd_batch.score import ScoreOptions, score_cohort

    (tmp_path / "dicom").mkdir()
    (tmp_path / "meta.csv").write_text("subject_id\nS1\n")
    out = tmp_path / "out"
    for opts in (ScoreOptions(backend="onnxrutime"), ScoreOptions(precision="fp8")):
        with pytest.raises(InputError, match="is unknown"):
            score_cohort(tmp_path / "dicom", tmp_path / "meta.csv", tmp_path / "m.pt", out, opts)
    assert not out.exists()
