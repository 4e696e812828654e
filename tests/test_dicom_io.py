"""dicom_io: sniffing, headers, grayscale order, decoders, resolution-aware JPEG 2000, rejections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from xbmd_batch import dicom_io
from xbmd_batch.dicom_io import (
    J2K_OVERSAMPLE,
    choose_reduce_level,
    is_dicom,
    read_header,
    read_image,
)
from xbmd_batch.errors import InputError
from xbmd_batch.testing import hip_phantom, make_dataset, make_dicom


def _stored(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array.astype(np.float64)


# --- is_dicom -------------------------------------------------------------------------------------------


def test_is_dicom_by_content_not_extension(tmp_path: Path) -> None:
    with_pre = make_dicom(tmp_path / "a.txt")
    bare = make_dicom(tmp_path / "noext", preamble=False)
    png = tmp_path / "x.dcm"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 300)
    text = tmp_path / "notes.dcm"
    text.write_text("subject_id,sex\n1,F\n" * 20)
    hidden = tmp_path / ".hidden.dcm"
    hidden.write_bytes(with_pre.read_bytes())
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert is_dicom(with_pre) and is_dicom(bare)
    assert not any(is_dicom(p) for p in (png, text, hidden, empty, tmp_path / "missing"))


def test_is_dicom_rejects_junk_starting_like_a_tag(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x08\x00\x16\x00" + bytes(range(256)) * 4)
    assert not is_dicom(junk)


# --- headers --------------------------------------------------------------------------------------------


def test_read_header_fields_and_missing_tags(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "h.dcm", rows=40, cols=30, rescale=(1.0, -1024.0), patient_id="P42")
    h = read_header(p)
    assert (h.patient_id, h.rows, h.columns, h.bits_stored, h.modality) == ("P42", 40, 30, 12, "DX")
    assert h.photometric == "MONOCHROME2" and h.transfer_syntax_uid == uid.ExplicitVRLittleEndian
    assert h.pixel_spacing == (0.15, 0.15) and h.has_rescale and not h.has_voi
    assert h.laterality == "L" and h.view_position == "AP" and h.body_part == "HIP"
    assert h.number_of_frames is None and h.file_size == p.stat().st_size
    bare = read_header(make_dicom(tmp_path / "bare", preamble=False))
    assert bare.sop_instance_uid and bare.transfer_syntax_uid == uid.ImplicitVRLittleEndian


def test_read_header_unreadable_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 10)
    with pytest.raises(InputError, match="bad.dcm"):
        read_header(bad)
    with pytest.raises(InputError, match="not a DICOM"):
        read_header(_write(tmp_path / "t.txt", b"hello world, not dicom at all" * 10))


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


# --- grayscale order ------------------------------------------------------------------------------------


def test_monochrome1_and_2_agree_up_to_affine_bone_bright(tmp_path: Path) -> None:
    px = hip_phantom(64, 48, 12)
    inv = (4095 - px.astype(np.int32)).astype(np.uint16)  # the same exposure stored as MONOCHROME1
    m2, i2 = read_image(make_dicom(tmp_path / "m2", pixels=px, photometric="MONOCHROME2"))
    m1, i1 = read_image(make_dicom(tmp_path / "m1", pixels=inv, photometric="MONOCHROME1"))
    a, b = np.polyfit(m1.ravel(), m2.ravel(), 1)
    assert a > 0  # positive slope: bone bright in both
    np.testing.assert_allclose(a * m1 + b, m2, atol=1e-3)
    assert "invert_monochrome1" in i1.steps and not any("invert" in s for s in i2.steps)
    # Bone (the femoral head, top-left centre) is brighter than soft tissue at the border, in both.
    for img in (m1, m2):
        assert img[19, 21] > img[60, 2]


def test_presentation_lut_inverse_inverts_monochrome2_once(tmp_path: Path) -> None:
    px = hip_phantom(32, 32, 12)
    plain, _ = read_image(make_dicom(tmp_path / "a", pixels=px))
    inv, info = read_image(make_dicom(tmp_path / "b", pixels=px, presentation_lut_shape="INVERSE"))
    np.testing.assert_allclose(inv, 4095 - plain)
    assert info.steps[-1] == "invert_presentation_lut"
    # MONOCHROME1 + INVERSE (the DX convention) is one inversion, not two.
    m1, i1 = read_image(
        make_dicom(tmp_path / "c", pixels=px, photometric="MONOCHROME1", presentation_lut_shape="INVERSE")
    )
    np.testing.assert_allclose(m1, 4095 - plain)
    assert sum("invert" in s for s in i1.steps) == 1


def test_rescale_applied_and_defaults(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "r", rescale=(0.5, -100.0))
    img, info = read_image(p)
    np.testing.assert_allclose(img, _stored(p) * 0.5 - 100.0, rtol=1e-6)
    assert info.steps == ["modality_lut:rescale(0.5,-100)"]
    p2 = make_dicom(tmp_path / "n")
    img2, info2 = read_image(p2)
    np.testing.assert_array_equal(img2, _stored(p2))
    assert info2.steps == ["modality_lut:default(1,0)"] and img2.dtype == np.float32
    # Only a slope present: intercept defaults to 0 (pydicom alone would skip the rescale).
    p3 = make_dicom(tmp_path / "s", rescale_slope_only=2.0)
    np.testing.assert_allclose(read_image(p3)[0], _stored(p3) * 2.0)


def test_signed_pixels(tmp_path: Path) -> None:
    px = hip_phantom(32, 32, 11).astype(np.int16) - 1000
    p = make_dicom(tmp_path / "s", pixels=px, signed=True, bits_stored=12)
    np.testing.assert_array_equal(read_image(p)[0], px.astype(np.float32))


def test_voi_only_when_asked(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "v", window=(2000.0, 1000.0))
    no_voi, i0 = read_image(p)
    voi, i1 = read_image(p, apply_voi=True)
    np.testing.assert_array_equal(no_voi, _stored(p))
    assert "voi_window" in i1.steps and not any(s.startswith("voi") for s in i0.steps)
    assert voi.min() >= 0 and voi.max() <= 4095 and (voi == 4095).any() and (voi == 0).any()


# --- decoders --------------------------------------------------------------------------------------------


def test_j2k_lossless_full_decode_exact(tmp_path: Path) -> None:
    raw = make_dicom(tmp_path / "raw", rows=96, cols=80)
    j2k = make_dicom(tmp_path / "j2k", rows=96, cols=80, transfer_syntax=uid.JPEG2000Lossless)
    a, ia = read_image(raw)
    b, ib = read_image(j2k)
    np.testing.assert_array_equal(a, b)
    assert (
        ib.decoder == "pylibjpeg" and ib.reduce_level == 0 and ib.transfer_syntax_uid == uid.JPEG2000Lossless
    )


def test_rle_decodes(tmp_path: Path) -> None:
    raw = make_dicom(tmp_path / "raw", rows=50, cols=70)
    rle = make_dicom(tmp_path / "rle", rows=50, cols=70, transfer_syntax=uid.RLELossless)
    b, info = read_image(rle)
    np.testing.assert_array_equal(read_image(raw)[0], b)
    assert info.decoder in ("pylibjpeg", "gdcm", "pydicom")


def test_decoder_fallback_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pylibjpeg is preferred for J2K; when it fails, gdcm decodes and the failure is recorded."""
    from pydicom.pixels.decoders.base import Decoder

    p = make_dicom(tmp_path / "j", rows=40, cols=40, transfer_syntax=uid.JPEG2000Lossless)
    real = Decoder.as_array

    def flaky(self, src, **kw):  # type: ignore[no-untyped-def]
        if kw.get("decoding_plugin") == "pylibjpeg":
            raise RuntimeError("simulated codec crash")
        return real(self, src, **kw)

    monkeypatch.setattr(Decoder, "as_array", flaky)
    img, info = read_image(p)
    assert info.decoder == "gdcm" and "simulated codec crash" in info.fallbacks[0]
    np.testing.assert_array_equal(img, read_image(make_dicom(tmp_path / "r", rows=40, cols=40))[0])


def test_decoder_preference() -> None:
    assert dicom_io.decoder_preference(uid.JPEGLossless)[0] == "gdcm"
    assert dicom_io.decoder_preference(uid.JPEGLSLossless)[0] == "gdcm"
    assert dicom_io.decoder_preference(uid.JPEG2000Lossless)[0] == "pylibjpeg"
    assert dicom_io.decoder_preference(uid.ExplicitVRLittleEndian) == ["pydicom"]


def test_j2k_reduced_level_zero_matches_stored(tmp_path: Path) -> None:
    """The Pillow/openjpeg path with reduce=0 reproduces the stored values exactly (bit handling is right)."""
    for bits, signed in ((12, False), (16, False), (12, True)):
        px = hip_phantom(64, 40, bits - 1 if signed else bits)
        if signed:
            px = px.astype(np.int16) - 500
        p = make_dicom(
            tmp_path / f"j{bits}{signed}",
            pixels=px,
            bits_stored=bits,
            signed=signed,
            transfer_syntax=uid.JPEG2000Lossless,
        )
        ds = pydicom.dcmread(p)
        frame = dicom_io._first_frame_bytes(ds)
        params = dicom_io._j2k_params(frame)
        assert params is not None and params.levels >= 1
        out = dicom_io._decode_j2k_reduced(frame, 0, params, ds)
        np.testing.assert_array_equal(out, px.astype(np.int32))


def test_choose_reduce_level() -> None:
    assert choose_reduce_level(2000, 1955, 224, 5) == 3  # 1955 / 8 = 244 >= 224; / 16 < 224
    assert choose_reduce_level(2000, 1955, 224, 2) == 2  # capped at the codestream's levels
    assert choose_reduce_level(300, 300, 224, 5) == 0
    assert choose_reduce_level(448, 448, 224, 5) == 1


def test_j2k_reduced_decode_shape(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "j", rows=300, cols=277, transfer_syntax=uid.JPEG2000Lossless)
    img, info = read_image(p, target_size=32)
    # J2K_OVERSAMPLE = 2: need >= 64 px; 277 / 4 = 69.25 >= 64, 277 / 8 < 64 -> level 2; size ceil(n / 4).
    assert J2K_OVERSAMPLE == 2
    assert info.reduce_level == 2 and info.decoder == "pillow-openjpeg"
    assert img.shape == (75, 70) == info.decoded_shape and (info.original_rows, info.original_cols) == (
        300,
        277,
    )
    # Uncompressed files ignore target_size.
    _, iraw = read_image(make_dicom(tmp_path / "r", rows=300, cols=277), target_size=64)
    assert iraw.reduce_level == 0 and iraw.decoded_shape == (300, 277)


def test_j2k_lossy_reduced(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "l", rows=256, cols=256, transfer_syntax=uid.JPEG2000)
    img, info = read_image(p, target_size=32)  # x J2K_OVERSAMPLE = 64 px -> level 2
    full, _ = read_image(p)
    assert info.reduce_level == 2 and img.shape == (64, 64)
    # Low-pass band of the same image: same mean level within 1 % of the range.
    assert abs(float(img.mean()) - float(full.mean())) < 0.01 * 4095


# --- rejections ------------------------------------------------------------------------------------------


def test_colour_rejected_naming_file(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "rgb.dcm", samples_per_pixel=3, photometric="RGB", bits_stored=8)
    with pytest.raises(InputError, match=r"rgb\.dcm.*colour"):
        read_image(p)


def test_multiframe_rejected_naming_file(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "mf.dcm", number_of_frames=3)
    with pytest.raises(InputError, match=r"mf\.dcm.*multi-frame"):
        read_image(p)


def test_missing_pixel_data_rejected(tmp_path: Path) -> None:
    ds = make_dataset()
    del ds.PixelData
    p = tmp_path / "nopix.dcm"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(InputError, match=r"nopix\.dcm.*Pixel Data"):
        read_image(p)


def test_no_decoder_available_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_dicom(tmp_path / "j.dcm", rows=32, cols=32, transfer_syntax=uid.JPEG2000Lossless)
    from pydicom.pixels import get_decoder

    dec = get_decoder(uid.JPEG2000Lossless)
    monkeypatch.setattr(type(dec), "available_plugins", property(lambda self: ()))
    with pytest.raises(InputError, match=r"j\.dcm.*xbmd-batch\[jpeg\]"):
        read_image(p)


# --- malformed pixel data: accurate reason codes, checked before allocating --------------------------------


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("reader", ["read_image", "read_stored"])
def test_malformed_pixels_carry_accurate_reasons(tmp_path: Path, reader: str) -> None:
    from xbmd_batch.errors import ImageError

    read = getattr(dicom_io, reader)
    short = make_dataset(rows=64, cols=48)
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]
    bits = make_dataset(rows=64, cols=48)
    bits.BitsStored = 20  # > BitsAllocated 16
    huge = make_dataset(rows=64, cols=48)
    huge.Rows = huge.Columns = 60000  # 3.6 Gpixel claimed, a few kB present
    tiny = make_dataset(pixels=np.array([[7]], np.uint16))
    cases = {
        "short": (short, "pixel_data_length_mismatch", r"holds \d+ bytes"),
        "bits": (bits, "invalid_bit_depth", "BitsStored=20"),
        "huge": (huge, "image_too_large", "60000 x 60000"),
        "tiny": (tiny, "image_too_small", "1 x 1"),
    }
    for name, (ds, reason, text) in cases.items():
        p = _save(ds, tmp_path / f"{name}.dcm")
        with pytest.raises(ImageError, match=rf"{name}\.dcm.*{text}") as ei:
            read(p, target_size=64)
        assert ei.value.reason == reason, name


def test_image_too_large_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compressed image claiming 60000^2 is refused from the header: no decoder is ever called."""
    from xbmd_batch.errors import ImageError

    ds = make_dataset(rows=32, cols=32)
    p = make_dicom(tmp_path / "j.dcm", rows=32, cols=32, transfer_syntax=uid.JPEG2000Lossless)
    ds = pydicom.dcmread(p)
    ds.Rows = ds.Columns = 60000
    ds.save_as(p)

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("decoder called")

    monkeypatch.setattr(dicom_io, "_decode_full", boom)
    monkeypatch.setattr(dicom_io, "_decode_j2k_reduced", boom)
    with pytest.raises(ImageError) as ei:
        dicom_io.read_stored(p, target_size=16)
    assert ei.value.reason == "image_too_large"


def test_stored_view_masks_and_sign_extends_like_pydicom(tmp_path: Path) -> None:
    px = hip_phantom(40, 32, 12).astype(np.uint16)
    px[0, 0] |= 0xF000  # garbage above BitsStored
    p = make_dicom(tmp_path / "u.dcm", pixels=px, bits_stored=12)
    st, info = dicom_io.read_stored(p)
    assert info.decoder == "numpy-view"
    np.testing.assert_array_equal(st.pixels, pydicom.dcmread(p).pixel_array)
    sp = (hip_phantom(40, 32, 11).astype(np.int16) - 1000).astype(np.int16)
    p2 = make_dicom(tmp_path / "s.dcm", pixels=sp, bits_stored=12, signed=True)
    np.testing.assert_array_equal(dicom_io.read_stored(p2)[0].pixels, pydicom.dcmread(p2).pixel_array)
