"""preprocess_torch: the batched torch finish (on-device preprocessing) equals the CPU path (within 2e-3,
model-input units), on CPU torch, for a mixed batch: MONOCHROME1/2, rescaled, non-square, JPEG 2000."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import uid

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.dicom_io import read_stored
from xbmd_batch.preprocess import finish, reduce_stored
from xbmd_batch.testing import hip_phantom, make_dicom

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("version", [4, 3])  # 3: version-3 cards hand over block means
def test_torch_finish_matches_cpu(tmp_path: Path, version: int) -> None:
    from xbmd_batch.preprocess_torch import finish_batch

    cfg = PreprocessConfig(image_size=32, version=version)
    files = [
        make_dicom(tmp_path / "m2.dcm", pixels=hip_phantom(150, 130, 12, seed=1)),
        make_dicom(
            tmp_path / "m1.dcm",
            pixels=(4095 - hip_phantom(140, 140, 12, seed=2)).astype(np.uint16),
            photometric="MONOCHROME1",
        ),
        make_dicom(tmp_path / "r.dcm", pixels=hip_phantom(90, 160, 12, seed=3), rescale=(-0.5, 100.0)),
        make_dicom(
            tmp_path / "j.dcm", pixels=hip_phantom(300, 260, 12, seed=4), transfer_syntax=uid.JPEG2000Lossless
        ),
        make_dicom(tmp_path / "flat.dcm", pixels=np.full((64, 64), 100, np.uint16)),
    ]
    reduced = []
    for p in files:
        st, _ = read_stored(p, target_size=cfg.image_size, apply_voi=cfg.apply_voi)
        reduced.append(reduce_stored(st, cfg))
    assert any(r.step > 1 for r in reduced)  # block means and/or a reduced J2K decode are exercised
    assert (reduced[0].step > 1) == (version == 3)  # version 3: block means of the 150 x 130 image
    assert reduced[0].pixels.dtype == np.uint16  # integers are handed over, not float32
    cpu = np.stack([finish(r, cfg) for r in reduced])
    dev = finish_batch(reduced, cfg, device="cpu").numpy()
    assert dev.shape == cpu.shape == (5, 1, 32, 32)
    assert np.abs(dev - cpu).max() <= 2e-3, np.abs(dev - cpu).max()
    np.testing.assert_array_equal(dev[4], cpu[4])  # a constant image maps to the same constant


@pytest.mark.gpu
def test_torch_finish_on_cuda(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from xbmd_batch.preprocess_torch import finish_batch

    cfg = PreprocessConfig(image_size=32)
    st, _ = read_stored(make_dicom(tmp_path / "a.dcm", pixels=hip_phantom(150, 130, 12)), target_size=32)
    r = reduce_stored(st, cfg)
    out = finish_batch([r], cfg, device="cuda").cpu().numpy()
    assert np.abs(out - finish(r, cfg)[None]).max() <= 2e-3


def test_geometry_groups_and_chunks_keep_the_batch_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items sharing a geometry are finished together (however far apart in the batch), in chunks when a
    group is larger than CHUNK_BYTES; the batch comes back in item order and equals the CPU path."""
    from xbmd_batch import preprocess_torch
    from xbmd_batch.preprocess_torch import _runs, finish_batch

    cfg = PreprocessConfig(image_size=32)
    shapes = [(120, 100), (90, 150), (120, 100), (120, 100), (90, 150), (64, 64), (120, 100)]
    reduced = []
    for k, (h, w) in enumerate(shapes):
        p = make_dicom(tmp_path / f"{k}.dcm", pixels=hip_phantom(h, w, 12, seed=10 + k))
        st, _ = read_stored(p, target_size=cfg.image_size, apply_voi=cfg.apply_voi)
        reduced.append(reduce_stored(st, cfg))
    cpu = np.stack([finish(r, cfg) for r in reduced])
    monkeypatch.setattr(preprocess_torch, "CHUNK_BYTES", 2 * 120 * 100 * 4)  # 2 images of the big group
    dev = finish_batch(reduced, cfg, device="cpu").numpy()
    assert np.abs(dev - cpu).max() <= 2e-3, np.abs(dev - cpu).max()
    one_by_one = np.concatenate([finish_batch([r], cfg).numpy() for r in reduced])
    assert np.abs(dev - one_by_one).max() <= 1e-5
    assert _runs([0, 2, 3, 6]) == [(0, 1, 0), (2, 4, 1), (6, 7, 3)]
