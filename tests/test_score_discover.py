"""discover: every entry under DIR in exactly one bucket, counts equal to `find DIR ! -type d` (issue 13)."""

from __future__ import annotations

import builtins
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from xbmd_batch.errors import InputError
from xbmd_batch.score import discover as disc_mod
from xbmd_batch.score.discover import discover
from xbmd_batch.testing import make_dicom


def _find_count(root: Path) -> int:
    out = subprocess.run(["find", str(root), "-mindepth", "1", "!", "-type", "d", "-print0"],
                         capture_output=True, check=True).stdout  # fmt: skip
    return out.count(b"\0")


def _hostile_dir(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "dicom"
    outside = tmp_path / "outside"
    make_dicom(root / "A" / "a.dcm", rows=32, cols=32)
    make_dicom(root / "A" / "b", rows=32, cols=32)  # no extension: found by content
    make_dicom(outside / "o.dcm", rows=32, cols=32)
    make_dicom(outside / "sub" / "o2.dcm", rows=32, cols=32)
    (root / "notes.txt").write_text("hello")
    (root / ".DS_Store").write_bytes(b"\0junk")
    (root / ".hid").mkdir()
    make_dicom(root / ".hid" / "x.dcm", rows=32, cols=32)
    os.symlink(outside / "sub", root / "dirlink_out")  # directory link leaving DIR
    os.symlink(".", root / "selfdir")  # directory link inside DIR (a loop if followed)
    os.symlink(root / "nothere", root / "broken")
    os.symlink("loopb", root / "loopa")
    os.symlink("loopa", root / "loopb")  # ELOOP
    os.symlink(outside / "o.dcm", root / "link_out.dcm")  # file link leaving DIR
    os.symlink("A/a.dcm", root / "link_in.dcm")  # file link inside DIR
    os.symlink("/etc/hostname", root / "etc_link")
    os.mkfifo(root / "fifo")
    bad = os.fsencode(root / "A") + b"/\xff\xfe_caf\xe9.dcm"
    shutil.copyfile(root / "A" / "a.dcm", bad)  # a DICOM with a non-UTF-8 name
    with open(os.fsencode(root) + b"/\xffreadme", "wb") as f:  # a non-DICOM with one
        f.write(b"text")
    return root, outside


def test_every_entry_in_exactly_one_bucket(tmp_path: Path) -> None:
    root, _ = _hostile_dir(tmp_path)
    d = discover(root, threads=2)
    b = d.bucket_counts()
    assert d.n_files == _find_count(root) == sum(b.values()) == 16
    assert sorted(d.dicom.to_pylist()) == ["A/a.dcm", "A/b", "link_in.dcm"]
    assert set(d.non_dicom) == {"notes.txt", "\\xffreadme"}
    assert set(d.hidden) == {".DS_Store", ".hid/x.dcm"}
    links = dict(d.skipped_links)
    assert set(links) == {"dirlink_out", "selfdir", "broken", "loopa", "loopb", "link_out.dcm", "etc_link"}
    assert (
        "loop" in links["loopa"] and "broken" in links["broken"] and "--follow-symlinks" in links["etc_link"]
    )
    assert "inside DIR" in links["selfdir"] and "leaving DIR" in links["dirlink_out"]
    assert dict(d.special) == {"fifo": "FIFO (named pipe)"}
    assert [p for p, _ in d.bad_names] == ["A/\\xff\\xfe_caf\\xe9.dcm"]
    for p, _ in d.bad_names:
        p.encode("utf-8")  # safe to write anywhere


def test_follow_symlinks_opt_in(tmp_path: Path) -> None:
    root, _ = _hostile_dir(tmp_path)
    d = discover(root, threads=2, follow_symlinks=True)
    assert {"link_out.dcm", "dirlink_out/o2.dcm"} <= set(d.dicom.to_pylist())
    assert "etc_link" in d.non_dicom  # opened only because the user asked
    links = dict(d.skipped_links)
    assert "dirlink_out" not in links and "selfdir" in links and "loopa" in links


def test_unreadable_file_is_not_non_dicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied -> unreadable (a failure row), never non-DICOM. Works as root: open() is patched."""
    root = tmp_path / "d"
    make_dicom(root / "ok.dcm", rows=32, cols=32)
    make_dicom(root / "locked.dcm", rows=32, cols=32)
    real_open = builtins.open

    def fake_open(file, *a, **k):  # type: ignore[no-untyped-def]
        if str(file).endswith("locked.dcm"):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    d = discover(root, threads=1)
    assert d.dicom.to_pylist() == ["ok.dcm"] and d.non_dicom == ()
    assert d.unreadable == (("locked.dcm", "cannot read file: Permission denied"),)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files; the patched-open test covers it")
def test_unreadable_file_by_mode(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_dicom(root / "locked.dcm", rows=32, cols=32).chmod(0)
    assert [p for p, _ in discover(root).unreadable] == ["locked.dcm"]


def test_unreadable_subfolder_is_a_bucket_not_an_abort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "d"
    make_dicom(root / "ok.dcm", rows=32, cols=32)
    make_dicom(root / "SITE03" / "x.dcm", rows=32, cols=32)
    real = os.scandir

    def fake(path):  # type: ignore[no-untyped-def]
        if str(path).endswith("SITE03"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(disc_mod.os, "scandir", fake)
    d = discover(root, threads=1)
    assert d.unreadable == (("SITE03", "cannot list directory: Permission denied"),)
    assert d.dicom.to_pylist() == ["ok.dcm"]
    monkeypatch.setattr(
        disc_mod.os, "scandir", lambda p: (_ for _ in ()).throw(PermissionError(13, "denied"))
    )
    with pytest.raises(InputError, match="cannot list DICOM folder"):
        discover(root)


def test_score_survives_hostile_entries_and_counts_add_up(
    cohort: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import json

    import polars as pl

    from xbmd_batch.score import ScoreOptions, score_cohort
    from xbmd_batch.score.pipeline import EXIT_QUARANTINE

    root = cohort / "dicom"
    first = sorted(p for p in root.rglob("*.dcm"))[0]
    os.symlink("loopb", root / "loopa")
    os.symlink("loopa", root / "loopb")
    os.symlink(".", root / "selfdir")
    os.mkfifo(root / "fifo")
    shutil.copyfile(first, os.fsencode(root) + b"/\xff\xfe.dcm")
    res = score_cohort(
        root, cohort / "meta.csv", tiny_model, tmp_path / "out", ScoreOptions(quiet=True, workers=0)
    )
    assert res.exit_code == EXIT_QUARANTINE
    rec = json.loads((tmp_path / "out" / "reconciliation.json").read_text())
    c = rec["counts"]
    assert c["files_seen"] == _find_count(root)
    assert (c["skipped_links"], c["special_files"], c["invalid_file_names"]) == (3, 1, 1)
    f = pl.read_parquet(tmp_path / "out" / "failures.parquet")
    assert f.filter(pl.col("reason") == "invalid_file_name")["relative_path"].to_list() == ["\\xff\\xfe.dcm"]
    assert c["matched_images"] == res.counts["scored"] > 0
