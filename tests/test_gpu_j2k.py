"""gpu_j2k: nvImageCodec JPEG 2000 decode (skipped without nvImageCodec + CUDA) and the device-side step 1
(block means + padding value), which runs on CPU torch here against the numpy definition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.testing import hip_phantom, make_dicom

torch = pytest.importorskip("torch")


def test_reduce_on_device_matches_block_means_and_fill() -> None:
    from xbmd_batch.gpu_j2k import block_means_reference, reduce_on_device
    from xbmd_batch.preprocess import _band, _edge_value, block_factor

    cfg = PreprocessConfig(image_size=32, version=3)  # version 3: block means
    x = hip_phantom(301, 259, 12, seed=5)
    red = reduce_on_device(torch.from_numpy(x.astype(np.int32)), cfg, scale=1.0, offset=0.0)
    k = block_factor(x.shape, 32)
    assert k == 4 and red.step == 4 and red.full_shape == (301, 259)
    np.testing.assert_allclose(red.pixels.numpy(), block_means_reference(x.astype(np.float64), k), rtol=1e-5)
    assert red.fill == pytest.approx(float(_edge_value(x, _band(x.shape, 1))))
    v4 = reduce_on_device(torch.from_numpy(x.astype(np.int32)), PreprocessConfig(image_size=32), 1.0, 0.0)
    assert v4.step == 1 and v4.fill == red.fill  # version 4: no block means
    np.testing.assert_array_equal(v4.pixels.numpy(), x.astype(np.float32))


def test_status_names_the_active_decoder() -> None:
    from xbmd_batch.gpu_j2k import status

    active, why = status()
    assert isinstance(active, bool) and ("nvImageCodec" in why)


@pytest.mark.gpu
def test_nvimgcodec_decode_equals_pydicom(tmp_path: Path) -> None:
    from xbmd_batch.gpu_j2k import GpuJ2KDecoder, status

    active, why = status()
    if not active:
        pytest.skip(why)
    import pydicom
    from pydicom import uid
    from pydicom.encaps import generate_frames

    px = hip_phantom(200, 180, 12, seed=1)
    p = make_dicom(tmp_path / "j.dcm", pixels=px, transfer_syntax=uid.JPEG2000Lossless)
    ds = pydicom.dcmread(p)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    (out,) = GpuJ2KDecoder("cuda").decode([frame])
    np.testing.assert_array_equal(out.cpu().numpy().astype(np.int64), px.astype(np.int64))
