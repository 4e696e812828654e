"""DICOM reading for xbmd-batch: content sniffing, header-only reads, pixel decode to grayscale float32.

Knows nothing about models. The grayscale order follows the DICOM standard (PS3.3 C.11, PS3.4 N.2):
stored values -> modality LUT (rescale) -> optional VOI (window / VOI LUT) -> MONOCHROME1 / Presentation LUT
inversion, so that bone is bright in every output. See docs/dicom.md for the decisions and timings.

Resolution-aware JPEG 2000: when the caller only needs ``target_size`` pixels, the wavelet codestream is
decoded at reduced resolution (openjpeg's ``reduce`` = ``opj_set_decoded_resolution_factor``, reached through
Pillow's bundled openjpeg because pylibjpeg-openjpeg 2.6 has no reduce parameter). Full decodes use pydicom's
plugins.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as _uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from xbmd_batch.errors import ImageError, InputError

__all__ = [
    "HeaderInfo",
    "DecodeInfo",
    "is_dicom",
    "read_header",
    "read_image",
    "read_stored",
    "StoredImage",
    "Codestream",
    "read_for_device",
    "MIN_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "choose_reduce_level",
    "decoder_preference",
    "JPEG_EXTRA_HINT",
]

JPEG_EXTRA_HINT = "pip install 'xbmd-batch[jpeg]'"

_J2K_SYNTAXES = frozenset(str(u) for u in _uid.JPEG2000TransferSyntaxes)
_JPEG_LOSSLESS_SYNTAXES = frozenset(
    str(u) for u in (_uid.JPEGLossless, _uid.JPEGLosslessSV1, _uid.JPEGLSLossless, _uid.JPEGLSNearLossless)
)
_JPEG_LOSSY_SYNTAXES = frozenset(str(u) for u in (_uid.JPEGBaseline8Bit, _uid.JPEGExtended12Bit))
_RLE_SYNTAXES = frozenset(str(u) for u in _uid.RLETransferSyntaxes)

# Group-0008 tags whose presence makes a preamble-less byte stream a plausible DICOM dataset.
_PLAUSIBLE_TAGS = ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID")


# ----------------------------------------------------------------------------------------------------
# Sniffing
# ----------------------------------------------------------------------------------------------------


class _CappedReader(io.BufferedReader):
    """A file whose ``read(n)`` never asks for more than the bytes left in it.

    pydicom reads an element with ``fp.read(declared_length)``; CPython allocates ``declared_length`` bytes
    before reading: a corrupt length (0xFFFFFFF0) in a 2 kB file means a 4 GB allocation (found by
    benchmarks/fuzz_reader.py). Capping the request at the file's size keeps memory bounded by the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(io.FileIO(os.fspath(path), "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n > 0:
            n = min(n, max(0, self._size - self.tell()))
            if n == 0:
                return b""
        return super().read(n)


def _dcmread(path: str | os.PathLike[str], **kw: Any) -> Dataset:
    """``pydicom.dcmread`` through a size-capped reader (see ``_CappedReader``)."""
    with _CappedReader(path) as fh:
        return pydicom.dcmread(fh, **kw)


def _looks_like_dataset_start(head: bytes) -> bool:
    """Cheap pre-check for a preamble-less dataset: it must start with a group 0002/0008 element tag."""
    if len(head) < 8:
        return False
    group_le, elem_le = struct.unpack("<HH", head[:4])
    group_be = struct.unpack(">H", head[:2])[0]
    if group_le in (0x0002, 0x0008) and elem_le < 0x2000:
        return True
    return group_be == 0x0008  # explicit VR big endian (retired, still seen)


def _plausible(ds: Dataset) -> bool:
    for kw in _PLAUSIBLE_TAGS:
        try:
            v = ds.get(kw)
        except Exception:  # noqa: BLE001 - a malformed value means "not plausible", not a crash
            continue
        if v is None:
            continue
        s = str(v).strip()
        if kw == "Modality" and s.isalnum() and 1 <= len(s) <= 16:
            return True
        if kw != "Modality" and s and all(c.isdigit() or c == "." for c in s) and len(s) <= 64:
            return True
    return False


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds a DICOM file, judged by content (never by extension).

    Part 10 files are recognised by 'DICM' at offset 128 (132 bytes read). Preamble-less datasets are
    accepted only if they start with a group 0002/0008 tag and parse into a dataset with a plausible
    group-0008 element.
    Hidden files (name starting with '.') are never DICOM inputs.
    """
    p = Path(path)
    if p.name.startswith("."):
        return False
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    if not _looks_like_dataset_start(head):
        return False
    try:
        with warnings.catch_warnings():  # junk parsed as a dataset makes pydicom warn about every value
            warnings.simplefilter("ignore")
            ds = _dcmread(p, force=True, stop_before_pixels=True, specific_tags=list(_PLAUSIBLE_TAGS))
            return _plausible(ds)
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return False


def _open_dataset(path: str | os.PathLike[str], *, stop_before_pixels: bool) -> Dataset:
    """dcmread with content sniffing; every failure becomes an InputError naming the file."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError as e:
        raise InputError(f"{p}: cannot open file ({e.strerror or e})") from e
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    if not has_preamble and not _looks_like_dataset_start(head):
        raise InputError(
            f"{p}: not a DICOM file (no 'DICM' marker at offset 128 and no dataset at the start)"
        )
    try:
        ds = _dcmread(p, force=not has_preamble, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as e:
        raise InputError(f"{p}: unreadable DICOM file ({type(e).__name__}: {e})") from e
    if not has_preamble and not _plausible(ds):
        raise InputError(f"{p}: not a DICOM file (no plausible SOP Class/Instance UID or Modality)")
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Preamble-less files may lack File Meta; pydicom's decoders need a Transfer Syntax UID."""
    fm = ds.file_meta
    if "TransferSyntaxUID" in fm:
        return
    implicit, little = ds.original_encoding
    if little is False:
        fm.TransferSyntaxUID = _uid.ExplicitVRBigEndian
    elif implicit is False:
        fm.TransferSyntaxUID = _uid.ExplicitVRLittleEndian
    else:
        fm.TransferSyntaxUID = _uid.ImplicitVRLittleEndian


# ----------------------------------------------------------------------------------------------------
# Headers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderInfo:
    """What the score pipeline needs before any pixel is decoded. Absent or malformed tags are None."""

    path: str
    patient_id: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    body_part: str | None
    view_position: str | None
    laterality: str | None
    photometric: str | None
    transfer_syntax_uid: str | None
    rows: int | None
    columns: int | None
    bits_stored: int | None
    bits_allocated: int | None
    pixel_representation: int | None
    samples_per_pixel: int | None
    number_of_frames: int | None
    pixel_spacing: tuple[float, float] | None  # PixelSpacing, else ImagerPixelSpacing (mm, row then column)
    has_rescale: bool
    has_voi: bool
    file_size: int
    presentation_lut_shape: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pixel_spacing"] = list(self.pixel_spacing) if self.pixel_spacing else None
        return d


def _get_str(ds: Dataset, kw: str) -> str | None:
    try:
        v = ds.get(kw)
    except Exception:  # noqa: BLE001 - malformed value -> None (contract: no exceptions for bad tags)
        return None
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _get_int(ds: Dataset, kw: str) -> int | None:
    try:
        v = ds.get(kw)
        return None if v is None or v == "" else int(v)
    except Exception:  # noqa: BLE001
        return None


def _get_spacing(ds: Dataset) -> tuple[float, float] | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            v = ds.get(kw)
            if v is not None and len(v) == 2:
                return (float(v[0]), float(v[1]))
        except Exception:  # noqa: BLE001
            continue
    return None


def read_header(path: str | os.PathLike[str]) -> HeaderInfo:
    """Header-only read (stop_before_pixels): fast enough to run on every file before planning."""
    p = Path(path)
    ds = _open_dataset(p, stop_before_pixels=True)
    laterality = _get_str(ds, "ImageLaterality") or _get_str(ds, "Laterality")
    return HeaderInfo(
        path=str(p),
        patient_id=_get_str(ds, "PatientID"),
        sop_instance_uid=_get_str(ds, "SOPInstanceUID"),
        study_instance_uid=_get_str(ds, "StudyInstanceUID"),
        series_instance_uid=_get_str(ds, "SeriesInstanceUID"),
        sop_class_uid=_get_str(ds, "SOPClassUID"),
        modality=_get_str(ds, "Modality"),
        body_part=_get_str(ds, "BodyPartExamined"),
        view_position=_get_str(ds, "ViewPosition"),
        laterality=laterality,
        photometric=_get_str(ds, "PhotometricInterpretation"),
        transfer_syntax_uid=_get_str(ds.file_meta, "TransferSyntaxUID"),
        rows=_get_int(ds, "Rows"),
        columns=_get_int(ds, "Columns"),
        bits_stored=_get_int(ds, "BitsStored"),
        bits_allocated=_get_int(ds, "BitsAllocated"),
        pixel_representation=_get_int(ds, "PixelRepresentation"),
        samples_per_pixel=_get_int(ds, "SamplesPerPixel"),
        number_of_frames=_get_int(ds, "NumberOfFrames"),
        pixel_spacing=_get_spacing(ds),
        has_rescale=any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence")),
        has_voi=any(k in ds for k in ("WindowCenter", "VOILUTSequence")),
        file_size=p.stat().st_size,
        presentation_lut_shape=_get_str(ds, "PresentationLUTShape"),
    )


# ----------------------------------------------------------------------------------------------------
# Pixel decode
# ----------------------------------------------------------------------------------------------------


@dataclass
class DecodeInfo:
    """Provenance of one decode: plugin, resolution level and the grayscale steps applied (provenance)."""

    decoder: str
    reduce_level: int
    original_rows: int
    original_cols: int
    decoded_shape: tuple[int, int]
    photometric: str
    transfer_syntax_uid: str
    steps: list[str] = field(default_factory=list)
    ms: float = 0.0
    fallbacks: list[str] = field(default_factory=list)  # "plugin: error" for plugins that failed first

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoded_shape"] = list(self.decoded_shape)
        return d


def decoder_preference(transfer_syntax_uid: str) -> list[str]:
    """Plugin order per transfer syntax (pydicom 3 plugin names); '' means pydicom's native decoder.

    gdcm first for JPEG lossless / JPEG-LS (faster than pylibjpeg there, and pylibjpeg-libjpeg is GPL and
    not in our extra); pylibjpeg (openjpeg) first for JPEG 2000; pylibjpeg-rle first for RLE (much faster
    than pydicom's pure-numpy RLE decoder).
    """
    ts = str(transfer_syntax_uid)
    if ts in _JPEG_LOSSLESS_SYNTAXES:
        return ["gdcm", "pylibjpeg", "pillow"]
    if ts in _J2K_SYNTAXES:
        return ["pylibjpeg", "gdcm", "pillow"]
    if ts in _RLE_SYNTAXES:
        return ["pylibjpeg", "gdcm", "pydicom"]
    if ts in _JPEG_LOSSY_SYNTAXES:
        return ["pylibjpeg", "pillow", "gdcm"]
    return ["pydicom"]


# Resolution-aware JPEG 2000 keeps one wavelet level of margin: decode at the coarsest level whose short side
# is still >= J2K_OVERSAMPLE x the model's input size, so that the final antialiased resize (not the wavelet
# low-pass) sets the image's blur. Measured on a 2000 px image at 224 px (docs/dicom.md): margin 2x (r=2)
# halves the difference to full decode + resize vs no margin (r=3), mean |d| 0.0064 -> 0.0023 in model-input
# units, for ~25 ms instead of ~8 ms per decode (full decode: ~450 ms).
J2K_OVERSAMPLE = 2


def choose_reduce_level(rows: int, cols: int, target_size: int, max_level: int) -> int:
    """Largest r with min(rows, cols) / 2**r >= target_size, capped at the codestream's DWT levels."""
    if target_size <= 0:
        return 0
    r = 0
    while r < max_level and min(rows, cols) / 2 ** (r + 1) >= target_size:
        r += 1
    return r


@dataclass(frozen=True)
class _J2KParams:
    width: int
    height: int
    x0: int
    y0: int
    ncomp: int
    precision: int
    signed: bool
    levels: int


def _j2k_params(frame: bytes) -> _J2KParams | None:
    """Parse SIZ and COD from the main header of a JPEG 2000 codestream (raw or JP2-wrapped)."""
    start = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0:
        return None
    p = start + 2  # SIZ marker
    try:
        xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[p + 6 : p + 22])
        ncomp = struct.unpack(">H", frame[p + 38 : p + 40])[0]
        ssiz = frame[p + 40]
        lsiz = struct.unpack(">H", frame[p + 2 : p + 4])[0]
        q = p + 2 + lsiz
        levels = None
        while q + 4 <= len(frame):
            marker = struct.unpack(">H", frame[q : q + 2])[0]
            if marker in (0xFF90, 0xFFD9):  # SOT / EOC: end of main header
                break
            length = struct.unpack(">H", frame[q + 2 : q + 4])[0]
            if marker == 0xFF52:  # COD
                levels = frame[q + 9]
                break
            q += 2 + length
    except (struct.error, IndexError):
        return None
    if levels is None:
        return None
    return _J2KParams(xsiz - x0, ysiz - y0, x0, y0, ncomp, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels)


def _decode_j2k_reduced(frame: bytes, level: int, params: _J2KParams, ds: Dataset) -> np.ndarray:
    """Decode a single-component J2K codestream at resolution 1/2**level through Pillow's openjpeg.

    Pillow rounds the reduced size (``int((n + 2**(r-1)) / 2**r)``) while openjpeg produces
    ``ceil(n / 2**r)``; they disagree for many sizes and Pillow then fails with "broken data stream". We
    therefore set the tile extent to openjpeg's size ourselves (the plugin attributes ``tile`` / ``_size``).
    Pillow returns N-bit data level-shifted to unsigned and scaled up to 8/16 bits (Jpeg2KDecode.c
    j2ku_gray_*); undone here exactly as pydicom's own pillow plugin does.
    """
    from PIL import Image, ImageFile

    if params.x0 or params.y0 or params.ncomp != 1 or params.precision > 16:
        raise ValueError("reduced decode supports single-component, zero-origin, <=16-bit codestreams only")
    im = Image.open(io.BytesIO(frame), formats=("JPEG2000",))
    w = math.ceil(params.width / 2**level)
    h = math.ceil(params.height / 2**level)
    t0 = im.tile[0]
    args = tuple(t0[3])
    new_args = (args[0], level, *args[2:])
    im._size = (w, h)  # noqa: SLF001 - see docstring: Pillow's rounded size breaks decoding
    if hasattr(t0, "_replace"):
        im.tile = [t0._replace(extents=(0, 0, w, h), args=new_args)]
    else:  # Pillow < 11 used plain tuples
        im.tile = [(t0[0], (0, 0, w, h), t0[2], new_args)]
    ImageFile.ImageFile.load(im)
    if im.mode == "L":
        arr = np.asarray(im, dtype=np.uint8).astype(np.int32)
        container = 8
    elif im.mode in ("I;16", "I;16L"):
        arr = np.frombuffer(im.tobytes(), dtype="<u2").reshape(h, w).astype(np.int32)
        container = 16
    else:
        raise ValueError(f"unexpected Pillow mode {im.mode!r} for a {params.precision}-bit codestream")
    if shift := container - params.precision:
        arr >>= shift
    if params.signed:
        arr -= 1 << (params.precision - 1)
    elif _get_int(ds, "PixelRepresentation") == 1:
        # Codestream unsigned, dataset signed: reinterpret as two's complement (as pydicom does).
        bs = _get_int(ds, "BitsStored") or params.precision
        arr = np.where(arr >= 1 << (bs - 1), arr - (1 << bs), arr)
    if arr.shape != (h, w):
        raise ValueError(f"reduced decode gave shape {arr.shape}, expected {(h, w)}")
    return arr


def _first_frame_bytes(ds: Dataset) -> bytes:
    from pydicom.encaps import generate_frames

    nframes = _get_int(ds, "NumberOfFrames") or 1
    return next(generate_frames(ds.PixelData, number_of_frames=nframes))


_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})


def _jpeg_frame_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG / JPEG-LS frame's SOF segment, or None when not found before the scan."""
    if frame[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(frame) and frame[i] == 0xFF:
        m = frame[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in _JPEG_SOF:
            return struct.unpack(">H", frame[i + 5 : i + 7])[0], struct.unpack(">H", frame[i + 7 : i + 9])[0]
        if m == 0xDA:
            return None
        i += 2 + struct.unpack(">H", frame[i + 2 : i + 4])[0]
    return None


def _check_codestream(ds: Dataset, path: Path, ts: str) -> bool:
    """Refuse a JPEG / JPEG 2000 frame whose size disagrees with Rows/Columns before a decoder sees it, and
    say whether gdcm may see it: gdcm aborts the whole process on such files (a C++ exception reaching
    std::terminate; found by benchmarks/fuzz_reader.py), so a J2K frame without a readable SIZ/COD main
    header is left to the other decoders."""
    is_j2k = ts in _J2K_SYNTAXES
    if not is_j2k and ts not in _JPEG_LOSSLESS_SYNTAXES and ts not in _JPEG_LOSSY_SYNTAXES:
        return True
    try:
        frame = _first_frame_bytes(ds)
    except Exception as e:  # noqa: BLE001 - unreadable encapsulation: the decoders report it
        del e
        return False
    if is_j2k:
        params = _j2k_params(frame)
        size = None if params is None else (params.height, params.width)
    else:
        size = _jpeg_frame_size(frame)
    rows, cols = _get_int(ds, "Rows"), _get_int(ds, "Columns")
    if size is not None and size[0] and (size[0], size[1]) != (rows, cols):
        raise InputError(
            f"{path}: compressed frame is {size[0]}x{size[1]} pixels but Rows/Columns say {rows}x{cols}"
        )
    return size is not None or not is_j2k


def _decode_full(ds: Dataset, path: Path, ts: str) -> tuple[np.ndarray, str, list[str]]:
    """Decode frame 0 with pydicom, trying plugins in preference order; returns (array, plugin, failures)."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise ImageError(
            f"{path}: transfer syntax {ts} is not supported by pydicom ({e})", "unsupported_transfer_syntax"
        ) from e
    available = list(decoder.available_plugins) if decoder.is_encapsulated else ["pydicom"]
    if not available:
        raise ImageError(
            f"{path}: no decoder installed for transfer syntax {ts} ({_uid.UID(ts).name}); "
            f"install the JPEG plugins: {JPEG_EXTRA_HINT}",
            "unsupported_transfer_syntax",
        )
    gdcm_ok = _check_codestream(ds, path, ts)
    order = [p for p in decoder_preference(ts) if p in available] + [
        p for p in available if p not in decoder_preference(ts)
    ]
    order = [p for p in order if gdcm_ok or p != "gdcm"]
    failures: list[str] = []
    for plugin in order:
        try:
            kw = {} if plugin == "pydicom" and not decoder.is_encapsulated else {"decoding_plugin": plugin}
            arr, _ = decoder.as_array(ds, index=0, **kw)
            return arr, plugin, failures
        except Exception as e:  # noqa: BLE001 - try the next plugin, keep the reason
            failures.append(f"{plugin}: {type(e).__name__}: {e}")
    # Decoders for the syntax are installed and each rejected the data: the file's pixel data is at fault
    # (corrupt or truncated codestream, or a variant none of them handles), not a missing plugin.
    raise ImageError(
        f"{path}: every decoder failed for transfer syntax {ts}: " + " | ".join(failures),
        "undecodable_pixel_data",
    )


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bs = _get_int(ds, "BitsStored") or _get_int(ds, "BitsAllocated") or 16
    if _get_int(ds, "PixelRepresentation") == 1:
        return (-(2.0 ** (bs - 1)), 2.0 ** (bs - 1) - 1)
    return (0.0, 2.0**bs - 1)


def _apply_modality(arr: np.ndarray, ds: Dataset, steps: list[str]) -> tuple[np.ndarray, tuple[float, float]]:
    """Modality LUT; returns float32 values and their nominal output range (for the later inversion).

    A Modality LUT Sequence goes through pydicom's apply_modality_lut. Rescale is written here instead because
    pydicom only rescales when *both* tags are present (we default the missing one: slope 1, intercept 0) and
    computes in float64 (2x the memory traffic of float32 on a 4-Mpixel image).
    """
    lo, hi = _stored_range(ds)
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        out = apply_modality_lut(arr, ds).astype(np.float32)
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        steps.append("modality_lut")
        return out, (0.0, 2.0**depth - 1)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    out = arr.astype(np.float32, copy=False)
    if slope is None and intercept is None:
        steps.append("modality_lut:default(1,0)")
        return out, (lo, hi)
    s = float(slope) if slope not in (None, "") else 1.0
    b = float(intercept) if intercept not in (None, "") else 0.0
    if s != 1.0:
        out = out * np.float32(s)
    if b != 0.0:
        out = out + np.float32(b)
    steps.append(f"modality_lut:rescale({s:g},{b:g})")
    a, c = lo * s + b, hi * s + b
    return out, (min(a, c), max(a, c))


def _apply_voi(
    arr: np.ndarray, ds: Dataset, rng: tuple[float, float], steps: list[str]
) -> tuple[np.ndarray, tuple[float, float]]:
    """VOI through pydicom's apply_voi_lut (LUT preferred over window); output range for the inversion."""
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence"):
        out = apply_voi_lut(arr, ds, prefer_lut=True)
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        steps.append("voi_lut")
        return out.astype(np.float32, copy=False), (0.0, 2.0**depth - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        out = apply_voi_lut(arr, ds, prefer_lut=True)
        steps.append("voi_window")
        return out.astype(np.float32, copy=False), rng
    steps.append("voi:none_in_header")
    return arr, rng


# Size limits checked from the header before any pixel buffer is allocated (reasons image_too_small /
# image_too_large). The smallest side of a hip radiograph is hundreds of pixels; a 16-pixel side is already
# far below anything a model could use. The largest detectors in use are ~4300 x 4300 (18.5 Mpixel) and
# full-field mammography ~4100 x 5600 (23 Mpixel); 64 Mpixel leaves room and caps one decode at ~256 MB of
# float32.
MIN_IMAGE_SIDE = 16
MAX_IMAGE_PIXELS = 64 * 1024 * 1024

_NATIVE_LE_SYNTAXES = frozenset(str(u) for u in (_uid.ExplicitVRLittleEndian, _uid.ImplicitVRLittleEndian))


@dataclass(frozen=True)
class _Checked:
    """What read_image / read_stored need after the header checks."""

    ds: Dataset
    path: Path
    photometric: str
    rows: int
    cols: int
    ts: str
    bits_allocated: int
    bits_stored: int
    signed: bool


def _check_image(p: Path) -> _Checked:
    """Open the file and check everything that can be checked before allocating pixels, each failure with
    its own reason code (errors.ImageError.reason)."""
    ds = _open_dataset(p, stop_before_pixels=False)
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = f"only {other[0]} (float pixel data is not supported)" if other else "no Pixel Data element"
        raise ImageError(f"{p}: {what}")
    photometric = (_get_str(ds, "PhotometricInterpretation") or "").upper()
    spp = _get_int(ds, "SamplesPerPixel") or 1
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(
            f"{p}: colour image (PhotometricInterpretation={photometric or 'missing'}, "
            f"SamplesPerPixel={spp}); "
            "only single-sample MONOCHROME1/MONOCHROME2 X-rays are supported"
        )
    nframes = _get_int(ds, "NumberOfFrames") or 1
    if nframes > 1:
        raise ImageError(
            f"{p}: multi-frame image ({nframes} frames); only single-frame radiographs are supported"
        )
    rows = _get_int(ds, "Rows")
    cols = _get_int(ds, "Columns")
    if not rows or not cols or rows < 0 or cols < 0:
        raise ImageError(f"{p}: missing or zero Rows/Columns")
    if min(rows, cols) < MIN_IMAGE_SIDE:
        raise ImageError(
            f"{p}: image is {rows} x {cols} pixels; the smallest side must be >= {MIN_IMAGE_SIDE}",
            "image_too_small",
        )
    if rows * cols > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{p}: image is {rows} x {cols} pixels ({rows * cols / 2**20:.0f} Mpixel); at most "
            f"{MAX_IMAGE_PIXELS // 2**20} Mpixel are decoded",
            "image_too_large",
        )
    ba = _get_int(ds, "BitsAllocated")
    bs = _get_int(ds, "BitsStored")
    bs = ba if bs is None else bs
    if ba not in (8, 16, 32) or bs is None or not 1 <= bs <= ba:
        raise ImageError(
            f"{p}: BitsAllocated={ba}, BitsStored={bs}; need BitsAllocated 8/16/32 and "
            "1 <= BitsStored <= BitsAllocated",
            "invalid_bit_depth",
        )
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts in _NATIVE_LE_SYNTAXES or ts == str(_uid.ExplicitVRBigEndian):
        need = rows * cols * (ba // 8)
        have = len(ds.PixelData)
        if have < need:
            raise ImageError(
                f"{p}: Pixel Data holds {have} bytes; {rows} x {cols} x {ba // 8} bytes = {need} needed",
                "pixel_data_length_mismatch",
            )
    signed = _get_int(ds, "PixelRepresentation") == 1
    return _Checked(ds, p, photometric, rows, cols, ts, ba, bs, signed)


def _native_view(c: _Checked) -> np.ndarray:
    """Stored values of an uncompressed little-endian frame as a numpy view of the Pixel Data bytes, with
    what pydicom does to them: unsigned values above BitsStored masked off, signed values sign-extended."""
    dtype = np.dtype(f"<{'i' if c.signed else 'u'}{c.bits_allocated // 8}")
    arr = np.frombuffer(c.ds.PixelData, dtype=dtype, count=c.rows * c.cols).reshape(c.rows, c.cols)
    if c.bits_stored < c.bits_allocated:
        shift = c.bits_allocated - c.bits_stored
        if c.signed:
            arr = (arr << shift) >> shift  # copy; sign-extend from the stored high bit
        elif int(arr.max()) >> c.bits_stored:  # overlay/garbage bits above BitsStored (one cheap pass)
            arr = arr & dtype.type((1 << c.bits_stored) - 1)
    return arr


def _decode_stored(c: _Checked, target_size: int | None) -> tuple[np.ndarray, str, int, list[str]]:
    """Frame 0's stored values: (array, decoder, J2K reduce level, fallbacks). Uncompressed little endian is a
    numpy view; JPEG 2000 is decoded at reduced resolution when ``target_size`` allows; else pydicom."""
    ds, p, ts = c.ds, c.path, c.ts
    failures: list[str] = []
    if ts in _NATIVE_LE_SYNTAXES:
        return _native_view(c), "numpy-view", 0, failures
    arr: np.ndarray | None = None
    decoder_name = ""
    level = 0
    if target_size and ts in _J2K_SYNTAXES:
        try:
            frame = _first_frame_bytes(ds)
            params = _j2k_params(frame)
            if params is None:
                raise ValueError("no SIZ/COD marker found in the codestream main header")
            level = choose_reduce_level(
                params.height, params.width, int(target_size) * J2K_OVERSAMPLE, params.levels
            )
            if level > 0:
                arr = _decode_j2k_reduced(frame, level, params, ds)
                decoder_name = "pillow-openjpeg"
        except Exception as e:  # noqa: BLE001 - fall back to a full decode, keep the reason
            failures.append(f"pillow-openjpeg reduce={level}: {type(e).__name__}: {e}")
            arr, level = None, 0
    if arr is None:
        arr, decoder_name, more = _decode_full(ds, p, ts)
        failures.extend(more)
    if arr.ndim != 2:
        raise ImageError(f"{p}: decoded pixel array has shape {arr.shape}; expected a 2-D grayscale image")
    return arr, decoder_name, level, failures


def _inverts(c: _Checked) -> bool:
    # DX/MG convention: MONOCHROME1 images carry Presentation LUT Shape INVERSE to describe the *same*
    # inversion, so we invert once if either says so (never twice).
    shape_lut = (_get_str(c.ds, "PresentationLUTShape") or "").upper()
    return c.photometric == "MONOCHROME1" or shape_lut == "INVERSE"


def _grayscale_exact(c: _Checked, arr: np.ndarray, apply_voi: bool, steps: list[str]) -> np.ndarray:
    """The DICOM grayscale chain on every pixel, in float32 (definition; non-linear LUTs need it)."""
    img, rng = _apply_modality(arr, c.ds, steps)
    if apply_voi:
        img, rng = _apply_voi(img, c.ds, rng, steps)
    if _inverts(c):
        img = np.float32(rng[0] + rng[1]) - img
        steps.append("invert_monochrome1" if c.photometric == "MONOCHROME1" else "invert_presentation_lut")
    return np.ascontiguousarray(img, dtype=np.float32)


def _info(
    c: _Checked,
    decoder: str,
    level: int,
    shape: tuple[int, ...],
    steps: list[str],
    t0: float,
    failures: list[str],
) -> DecodeInfo:
    return DecodeInfo(
        decoder=decoder,
        reduce_level=level,
        original_rows=c.rows,
        original_cols=c.cols,
        decoded_shape=(int(shape[0]), int(shape[1])),
        photometric=c.photometric,
        transfer_syntax_uid=c.ts,
        steps=steps,
        ms=(time.perf_counter() - t0) * 1e3,
        fallbacks=failures,
    )


def read_image(
    path: str | os.PathLike[str],
    target_size: int | None = None,
    apply_voi: bool = False,
) -> tuple[np.ndarray, DecodeInfo]:
    """Decode frame 0 to a float32 2-D grayscale image with bone bright, plus what was done to get it.

    ``target_size``: the smallest side the caller needs; JPEG 2000 is then decoded only to the wavelet level
    that still gives at least that many pixels on the shorter side. Everything else decodes at full size.
    Every pixel goes through the grayscale chain in float32; ``read_stored`` is the fast path that defers it.
    """
    t_start = time.perf_counter()
    c = _check_image(Path(path))
    arr, decoder_name, level, failures = _decode_stored(c, target_size)
    steps: list[str] = []
    img = _grayscale_exact(c, arr, apply_voi, steps)
    return img, _info(c, decoder_name, level, img.shape, steps, t_start, failures)


@dataclass(frozen=True)
class StoredImage:
    """Pixels still in stored units plus the affine that makes them grayscale (bone bright).

    grayscale = ``scale * pixels + offset``. The affine is the modality rescale followed by the MONOCHROME1 /
    INVERSE inversion, which are linear, so they may be applied after any weighted average with weights
    summing to 1 (resampling) without changing the result. Non-linear steps (Modality LUT Sequence, VOI
    window or VOI LUT when ``apply_voi``) are applied to every pixel instead: ``pixels`` is then float32
    grayscale and the affine is the identity (``exact`` = True).

    Geometry: sample ``j`` stands for the full-resolution interval ``[j * subsample - phase, (j + 1) *
    subsample - phase)`` (pixel-edge coordinates, pixel p spans [p, p + 1)) of the stored ``full_shape``,
    clipped to the image: ``subsample`` 1 and phase 0 for a full decode; ``2**r`` and phase
    ``2**(r-1) - 0.5`` for a JPEG 2000 level-r decode (the low-pass sample is centred on pixel ``2**r * j``).
    """

    pixels: np.ndarray
    scale: float
    offset: float
    subsample: int
    phase: float
    full_shape: tuple[int, int]
    exact: bool
    bits_stored: int


def _affine(c: _Checked, apply_voi: bool, steps: list[str]) -> tuple[float, float] | None:
    """The grayscale affine ``scale * stored + offset`` (rescale, then the MONOCHROME1 / INVERSE inversion)
    with its step names, or None (nothing recorded) when the chain is not linear for this file (Modality LUT
    Sequence; VOI window or VOI LUT with ``apply_voi``): every pixel must then go through it."""
    ds = c.ds
    nonlinear = bool(ds.get("ModalityLUTSequence")) or (
        apply_voi and (bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds))
    )
    if nonlinear:
        return None
    lo, hi = _stored_range(ds)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and intercept is None:
        s, b = 1.0, 0.0
        steps.append("modality_lut:default(1,0)")
    else:
        s = float(slope) if slope not in (None, "") else 1.0
        b = float(intercept) if intercept not in (None, "") else 0.0
        steps.append(f"modality_lut:rescale({s:g},{b:g})")
        lo, hi = sorted((lo * s + b, hi * s + b))
    if apply_voi:
        steps.append("voi:none_in_header")
    if _inverts(c):  # x -> (lo + hi) - (s * v + b)
        s, b = -s, (lo + hi) - b
        steps.append("invert_monochrome1" if c.photometric == "MONOCHROME1" else "invert_presentation_lut")
    return s, b


def read_stored(
    path: str | os.PathLike[str],
    target_size: int | None = None,
    apply_voi: bool = False,
) -> tuple[StoredImage, DecodeInfo]:
    """Decode frame 0 without touching its values more than the DICOM grayscale chain demands.

    Uncompressed little-endian pixels come back as a read-only numpy view of the file's Pixel Data (no copy,
    no float conversion); the rescale and inversion come back as an affine to apply on the small image.
    ``DecodeInfo.steps`` names the same steps as ``read_image`` (with ``:deferred`` when only recorded).
    """
    t_start = time.perf_counter()
    return _stored(_check_image(Path(path)), target_size, apply_voi, t_start)


def _stored(
    c: _Checked, target_size: int | None, apply_voi: bool, t_start: float
) -> tuple[StoredImage, DecodeInfo]:
    arr, decoder_name, level, failures = _decode_stored(c, target_size)
    steps: list[str] = []
    f = 2**level
    geometry = {"subsample": f, "phase": f / 2 - 0.5 if level else 0.0, "full_shape": (c.rows, c.cols)}
    affine = _affine(c, apply_voi, steps)
    if affine is None:
        img = _grayscale_exact(c, arr, apply_voi, steps)
        st = StoredImage(img, 1.0, 0.0, exact=True, bits_stored=32, **geometry)
        return st, _info(c, decoder_name, level, img.shape, steps, t_start, failures)
    s, b = affine
    st = StoredImage(arr, s, b, exact=False, bits_stored=c.bits_stored, **geometry)
    return st, _info(c, decoder_name, level, arr.shape, steps, t_start, failures)


@dataclass(frozen=True)
class Codestream:
    """Frame 0 of a JPEG 2000 file, not decoded: what a decode worker hands over when the run decodes JPEG
    2000 on the GPU (``gpu_j2k``). Every check ``read_stored`` makes before decoding has passed; the affine
    is the one ``read_stored`` would return for this file (grayscale = ``scale * stored + offset``).

    ``signed_bits``: the dataset is signed (PixelRepresentation 1) but the codestream is not: the decoded
    samples are two's complement of that many bits (as pydicom and ``_decode_j2k_reduced`` read them).
    ``cpu_level``: the wavelet level the CPU path would have decoded at (provenance: the GPU decodes at full
    resolution, nvImageCodec having no resolution level).
    """

    data: Any  # bytes (a worker hands it over through a slot; the main process holds its own copy)
    scale: float
    offset: float
    full_shape: tuple[int, int]
    bits_stored: int
    precision: int
    codestream_signed: bool
    signed_bits: int | None
    cpu_level: int
    transfer_syntax_uid: str


def read_for_device(
    path: str | os.PathLike[str],
    target_size: int | None = None,
    apply_voi: bool = False,
) -> tuple[StoredImage | Codestream, DecodeInfo]:
    """``read_stored``, except that a JPEG 2000 file the GPU decoder can take comes back undecoded
    (``Codestream``), after the same checks. Everything else -- other syntaxes, a non-linear grayscale chain,
    a codestream whose main header is unreadable, multi-component, offset or deeper than 16 bits, or whose
    size disagrees with Rows/Columns -- is decoded here exactly as ``read_stored`` does."""
    t_start = time.perf_counter()
    c = _check_image(Path(path))
    if c.ts in _J2K_SYNTAXES:
        steps: list[str] = []
        cs = _codestream(c, target_size, apply_voi, steps)
        if cs is not None:
            return cs, _info(c, "nvimgcodec", 0, cs.full_shape, steps, t_start, [])
    return _stored(c, target_size, apply_voi, t_start)


def _codestream(c: _Checked, target_size: int | None, apply_voi: bool, steps: list[str]) -> Codestream | None:
    try:
        frame = _first_frame_bytes(c.ds)
    except Exception:  # noqa: BLE001 - the CPU path reports what is wrong with the encapsulation
        return None
    params = _j2k_params(frame)
    if (
        params is None
        or params.ncomp != 1
        or params.x0
        or params.y0
        or not 1 <= params.precision <= 16
        or (params.height, params.width) != (c.rows, c.cols)
    ):
        return None
    affine = _affine(c, apply_voi, steps)
    if affine is None:
        return None
    signed_bits = None
    if not params.signed and c.signed:
        signed_bits = c.bits_stored or params.precision
    level = choose_reduce_level(
        params.height, params.width, int(target_size or 0) * J2K_OVERSAMPLE, params.levels
    )
    return Codestream(
        data=bytes(frame),
        scale=affine[0],
        offset=affine[1],
        full_shape=(c.rows, c.cols),
        bits_stored=c.bits_stored,
        precision=params.precision,
        codestream_signed=params.signed,
        signed_bits=signed_bits,
        cpu_level=level,
        transfer_syntax_uid=c.ts,
    )
