"""Image cache: reused when nothing changed, rebuilt when preprocessing or a file changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from train.data import build_image_cache, cache_key
from xbmd_batch.config import PreprocessConfig
from xbmd_batch.preprocess import load_and_preprocess
from xbmd_batch.testing import hip_phantom, make_dicom


@pytest.fixture()
def files(tmp_path: Path) -> list[str]:
    out = []
    for i in range(3):
        p = tmp_path / "dicom" / f"S{i}" / "img.dcm"
        p.parent.mkdir(parents=True)
        make_dicom(p, pixels=hip_phantom(64, 56, seed=i), patient_id=f"S{i}")
        out.append(str(p))
    return out


def test_cache_reused_and_invalidated(files: list[str], tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cfg = PreprocessConfig(image_size=32)
    # request in a non-sorted order: row_of must still point at the right image
    order = [files[2], files[0], files[1]]
    a = build_image_cache(order, cfg, cache_dir, workers=1, progress=False)
    assert not a.reused and a.ok.all() and a.images.shape == (3, 1, 32, 32)
    for i, p in enumerate(order):
        ref, _ = load_and_preprocess(p, cfg)  # the same function `score` uses
        np.testing.assert_array_equal(a.images[a.row_of[i]], ref)

    b = build_image_cache(order, cfg, cache_dir, workers=1, progress=False)
    assert b.reused and b.path == a.path and b.key == a.key

    # preprocessing change -> new key, fresh decode, old cache untouched
    cfg2 = PreprocessConfig(image_size=32, clip_percentiles=(1.0, 99.0))
    c = build_image_cache(order, cfg2, cache_dir, workers=1, progress=False)
    assert not c.reused and c.key != a.key and c.path != a.path
    assert not np.array_equal(np.asarray(c.images), np.asarray(a.images))
    assert cache_key(order, cfg2) != cache_key(order, cfg)

    # a touched file (new mtime) -> new key too
    st = os.stat(files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    d = build_image_cache(order, cfg, cache_dir, workers=1, progress=False)
    assert not d.reused and d.key != a.key


def test_cache_marks_undecodable_files(files: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom at all")
    with pytest.warns(UserWarning, match="1 file"):
        res = build_image_cache(
            [*files, str(bad)], PreprocessConfig(image_size=32), tmp_path / "c", progress=False
        )
    assert res.ok.tolist() == [True, True, True, False]
    assert str(bad) in res.errors
