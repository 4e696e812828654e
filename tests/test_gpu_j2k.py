"""gpu_j2k: the device-side step 1 (block means + padding value) and the codestream checks, on CPU torch
with a stand-in decoder; the nvImageCodec decode itself in gpu-marked tests (skipped without nvImageCodec +
CUDA)."""

from __future__ import annotations

import dataclasses
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
    # unsigned samples of a signed dataset: two's complement of BitsStored bits, as pydicom reads them
    u = torch.tensor([[0, 2047, 2048, 4095]] * 4, dtype=torch.uint16)
    s = reduce_on_device(u, PreprocessConfig(image_size=2), 1.0, 0.0, signed_bits=12)
    assert s.pixels[0].tolist() == [0.0, 2047.0, -2048.0, -1.0]


def test_status_names_the_active_decoder() -> None:
    from xbmd_batch.gpu_j2k import status

    active, why = status()
    assert isinstance(active, bool) and ("nvImageCodec" in why)


def test_probe_codestream_holds_what_it_says() -> None:
    openjpeg = pytest.importorskip("openjpeg")
    from xbmd_batch.dicom_io import _j2k_params
    from xbmd_batch.gpu_j2k import probe_codestream

    frame, want = probe_codestream()
    params = _j2k_params(frame)
    assert params is not None and params.ncomp == 1 and not params.signed
    np.testing.assert_array_equal(openjpeg.decode(frame), want)


class _Fixed:
    """A decoder answering prepared tensors (or None)."""

    name = "fixed"

    def __init__(self, out: list) -> None:
        self.out = out
        self.errors = [None if t is not None else "refused" for t in out]

    def decode(self, frames: list) -> list:
        assert len(frames) == len(self.out)
        return self.out


def test_decode_codestreams_checks_shape_and_sign(tmp_path: Path) -> None:
    pytest.importorskip("openjpeg")
    from pydicom import uid

    from xbmd_batch.dicom_io import Codestream, read_for_device, read_stored
    from xbmd_batch.gpu_j2k import decode_codestreams
    from xbmd_batch.preprocess import finish, reduce_stored

    cfg = PreprocessConfig(image_size=32)
    kw = {"rows": 128, "cols": 96, "transfer_syntax": uid.JPEG2000Lossless}
    p_u = make_dicom(tmp_path / "u.dcm", bits_stored=12, photometric="MONOCHROME1", **kw)
    p_s = make_dicom(tmp_path / "s.dcm", bits_stored=12, signed=True, rescale=(1.0, -1024.0), **kw)
    cu, _ = read_for_device(p_u, 32)
    cs, _ = read_for_device(p_s, 32)
    assert isinstance(cu, Codestream) and isinstance(cs, Codestream) and cs.codestream_signed
    import openjpeg

    au, as_ = openjpeg.decode(cu.data), openjpeg.decode(cs.data)
    assert au.dtype == np.uint16 and as_.dtype == np.int16  # what nvImageCodec gives with allow_any_depth
    good = decode_codestreams(_Fixed([torch.from_numpy(au), torch.from_numpy(as_)]), [cu, cs], cfg)
    for d, p in zip(good, (p_u, p_s), strict=True):
        assert d.error is None
        st, _ = read_stored(p, target_size=32)
        want = finish(reduce_stored(st, cfg), cfg)
        got = finish(dataclasses.replace(d.reduced, pixels=d.reduced.pixels.numpy()), cfg)
        np.testing.assert_allclose(got, want, atol=1e-5)
    wrong = torch.from_numpy(au[:-1].copy())
    unsigned = torch.from_numpy(as_.astype(np.uint16))
    bad = decode_codestreams(_Fixed([None, wrong, unsigned]), [cu, cu, cs], cfg)
    assert [d.reduced for d in bad] == [None] * 3
    assert bad[0].error == "refused" and "shape" in bad[1].error and "signed" in bad[2].error


@pytest.fixture()
def gpu_decoder():
    from xbmd_batch.gpu_j2k import GpuJ2KDecoder, status

    pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec (nvidia-nvimgcodec-cu13) not installed")
    active, why = status()
    if not active:
        pytest.skip(why)
    return GpuJ2KDecoder("cuda")  # its constructor's self-test decodes a 16-bit codestream


@pytest.mark.gpu
@pytest.mark.parametrize(("bits", "signed"), [(12, False), (16, False), (12, True), (16, True)])
def test_nvimgcodec_decode_equals_pydicom(tmp_path: Path, gpu_decoder, bits: int, signed: bool) -> None:
    """Lossless 12/16-bit (and signed) JPEG 2000: nvImageCodec's values == pydicom's decode, exactly; through
    the loop's step 1 (decode_codestreams) the stored values, sign and affine are the CPU path's."""
    pytest.importorskip("openjpeg")  # pydicom's J2K encoder and decoder (the jpeg extra)
    import pydicom
    from pydicom import uid

    from xbmd_batch.dicom_io import read_for_device
    from xbmd_batch.gpu_j2k import decode_codestreams

    p = make_dicom(
        tmp_path / "j.dcm",
        rows=300,
        cols=260,
        bits_stored=bits,
        signed=signed,
        transfer_syntax=uid.JPEG2000Lossless,
    )
    ref = pydicom.dcmread(p).pixel_array
    cs, _ = read_for_device(p, 64)
    (out,) = gpu_decoder.decode([cs.data])
    assert out is not None, gpu_decoder.errors
    np.testing.assert_array_equal(out.cpu().numpy().astype(np.int64), ref.astype(np.int64))
    (d,) = decode_codestreams(gpu_decoder, [cs], PreprocessConfig(image_size=64))
    assert d.error is None and d.reduced.pixels.is_cuda
    np.testing.assert_array_equal(d.reduced.pixels.cpu().numpy(), ref.astype(np.float32))


@pytest.mark.gpu
def test_nvimgcodec_batch_isolates_a_broken_codestream(tmp_path: Path, gpu_decoder) -> None:
    pytest.importorskip("openjpeg")
    import pydicom
    from pydicom import uid

    from xbmd_batch.dicom_io import read_for_device

    frames, refs = [], []
    for i, (r, c) in enumerate([(300, 260), (257, 411), (512, 384)]):
        p = make_dicom(tmp_path / f"{i}.dcm", rows=r, cols=c, seed=i, transfer_syntax=uid.JPEG2000Lossless)
        frames.append(read_for_device(p, 64)[0].data)
        refs.append(pydicom.dcmread(p).pixel_array)
    broken = frames[1][: frames[1].find(b"\xff\x90") + 20]  # main header intact, first tile cut
    out = gpu_decoder.decode([frames[0], broken, frames[2]])
    assert out[1] is None and gpu_decoder.errors[1]
    for t, ref in ((out[0], refs[0]), (out[2], refs[2])):
        np.testing.assert_array_equal(t.cpu().numpy().astype(np.int64), ref.astype(np.int64))
