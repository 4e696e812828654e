"""Small pure pieces of the score pipeline: batcher, pseudonymiser, part writer, join rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from xbmd_batch.errors import InputError, ModelFileError
from xbmd_batch.score.batcher import Batcher
from xbmd_batch.score.finalize import screen_column
from xbmd_batch.score.join import KeySpec, join_metadata
from xbmd_batch.score.privacy import Pseudonymizer
from xbmd_batch.score.writer import PartWriter, done_keys, list_parts, load_or_create_state, prepare_out_dir


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


def test_part_writer_numbering_and_done_keys(tmp_path) -> None:
    w = PartWriter(tmp_path)
    t = pa.table({"relative_path": ["a", "b"], "sop_instance_uid": ["1", "2"]})
    w.write(t)
    w.write(pa.table({"relative_path": ["c"], "sop_instance_uid": ["3"]}))
    (tmp_path / "parts" / "part-00007.parquet.tmp").write_bytes(b"garbage")
    w2 = PartWriter(tmp_path)  # a new session continues numbering and removes the stale tmp
    assert w2.next_index == 2
    assert not list((tmp_path / "parts").glob("*.tmp"))
    assert [p.name for p in list_parts(tmp_path)] == ["part-00000.parquet", "part-00001.parquet"]
    assert done_keys(tmp_path) == {("a", "1"), ("b", "2"), ("c", "3")}


def test_state_pins(tmp_path) -> None:
    expect = {"model_sha256": "m1", "meta_sha256": "x", "pseudonym_key_fingerprint": None, "key_spec": {}}
    s1, resumed = load_or_create_state(tmp_path, expect)
    assert not resumed
    s2, resumed = load_or_create_state(tmp_path, expect)
    assert resumed and s2["run_id"] == s1["run_id"] and len(s2["sessions"]) == 2
    with pytest.raises(ModelFileError):
        load_or_create_state(tmp_path, {**expect, "model_sha256": "m2"})
    with pytest.raises(InputError, match="META"):
        load_or_create_state(tmp_path, {**expect, "meta_sha256": "y"})


def test_prepare_out_dir(tmp_path) -> None:
    d = tmp_path / "dicom"
    d.mkdir()
    meta = tmp_path / "m.csv"
    meta.write_text("subject_id\n")
    with pytest.raises(InputError, match="inside"):
        prepare_out_dir(d / "out", d, meta)
    with pytest.raises(InputError, match="inside"):
        prepare_out_dir(d, d, meta)
    prepare_out_dir(tmp_path / "new" / "out", d, meta)
    assert (tmp_path / "new" / "out").is_dir()


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
