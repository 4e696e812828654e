"""Write one SYNTHETIC hip radiograph as a DICOM Part 10 file (pydicom 3).

Why these choices: the scoring pipeline must meet what real exports contain — CR and DX SOP classes, 12-16
bits stored in 16 allocated, RescaleSlope/Intercept on some scanners, MONOCHROME1 on some files (stored values
inverted so the displayed image is unchanged), JPEG 2000 lossless or RLE lossless on some — and the bytes must
be identical for a given seed (UIDs derived from the seed, fixed dates, no wall-clock values).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from xbmd_batch.synth.scanners import Scanner

CR_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage
DX_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation


def _uid_from(*parts: str) -> UID:
    """2.25.<128-bit int> (ISO/IEC 9834-8 UUID form), the int being a SHA-256 prefix of the parts."""
    h = hashlib.sha256("\x1f".join(parts).encode()).digest()[:16]
    return UID(f"2.25.{int.from_bytes(h, 'big')}")


IMPLEMENTATION_UID = _uid_from("xbmd-batch-synth-implementation")
TRANSFER_SYNTAXES = {"explicit": ExplicitVRLittleEndian, "j2k": JPEG2000Lossless, "rle": RLELossless}
BASE_DATE = _dt.date(2019, 1, 7)
SYNTHETIC_NOTE = "SYNTHETIC IMAGE from xbmd-batch synth - not a real patient"


@dataclass(frozen=True)
class DicomSpec:
    """Everything the writer needs besides pixels; all fields deterministic given (seed, subject)."""

    seed: int
    index: int
    subject_id: str
    sex: str  # F / M
    age_years: float
    scanner: Scanner
    photometric: str  # MONOCHROME1 / MONOCHROME2
    codec: str  # explicit / j2k / rle
    pixel_spacing_mm: float
    kvp: float
    mas: float


def uid_for(seed: int, *parts: object) -> UID:
    """Deterministic 2.25 UID from the seed and the object it names."""
    return _uid_from("xbmd-synth", str(seed), *map(str, parts))


def stored_for_file(stored_mono2: np.ndarray, photometric: str, max_value: int) -> np.ndarray:
    """MONOCHROME1 stores max - v so that a viewer's inversion shows the same image."""
    if photometric == "MONOCHROME1":
        return (max_value - stored_mono2.astype(np.int32)).astype(np.uint16)
    return stored_mono2


def window_for(
    stored_mono2: np.ndarray, scanner: Scanner, photometric: str, max_value: int
) -> tuple[float, float]:
    """Window (centre, width) in modality-LUT output units covering the body (0.5-99.5 % of non-air)."""
    sub = stored_mono2[::8, ::8].astype(np.float64)
    body = sub[sub > np.percentile(sub, 30)]
    lo, hi = np.percentile(body if body.size else sub, [0.5, 99.5])
    if photometric == "MONOCHROME1":
        lo, hi = max_value - hi, max_value - lo
    slope, intercept = scanner.rescale or (1.0, 0.0)
    lo, hi = slope * lo + intercept, slope * hi + intercept
    return round((lo + hi) / 2, 1), round(max(hi - lo, 1.0), 1)


def build_dataset(spec: DicomSpec, stored_mono2: np.ndarray, max_value: int) -> Dataset:
    """The full dataset (uncompressed pixel data); `write_dicom` compresses if the spec asks."""
    sc = spec.scanner
    rows, cols = stored_mono2.shape
    study_date = BASE_DATE + _dt.timedelta(days=(spec.index * 3) % 1800)
    birth = study_date - _dt.timedelta(days=round(spec.age_years * 365.25))
    sop_class = CR_SOP_CLASS if sc.modality == "CR" else DX_SOP_CLASS
    sop_uid = uid_for(spec.seed, spec.subject_id, "sop")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "XBMD_SYNTH_1"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{9 + spec.index % 8:02d}{(spec.index * 7) % 60:02d}00"
    ds.AccessionNumber = f"SYNACC{spec.index + 1:07d}"
    ds.Modality = sc.modality
    ds.Manufacturer = sc.manufacturer
    ds.InstitutionName = f"Synthetic site {sc.index + 1:02d}"
    ds.ManufacturerModelName = sc.model_name
    ds.StationName = sc.site
    ds.StudyDescription = "XR HIP AP (SYNTHETIC)"
    ds.SeriesDescription = "HIP AP"
    ds.PatientName = f"SYNTHETIC^{spec.subject_id}"
    ds.PatientID = spec.subject_id
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = spec.sex
    ds.PatientAge = f"{int(spec.age_years):03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic data, no real subject"
    ds.BodyPartExamined = "HIP"
    ds.KVP = f"{spec.kvp:.0f}"
    ds.Exposure = round(spec.mas)
    ds.ExposureInuAs = round(spec.mas * 1000)
    ds.DistanceSourceToDetector = "1150"
    ds.ImagerPixelSpacing = [f"{spec.pixel_spacing_mm:.6f}"] * 2
    ds.ViewPosition = "AP"
    ds.StudyInstanceUID = uid_for(spec.seed, spec.subject_id, "study")
    ds.SeriesInstanceUID = uid_for(spec.seed, spec.subject_id, "series")
    ds.StudyID = f"{spec.index + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    if sc.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "R"
        ds.DetectorType = "SCINTILLATOR"
    else:
        ds.Laterality = "R"
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = SYNTHETIC_NOTE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [f"{spec.pixel_spacing_mm:.6f}"] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = sc.bits_stored
    ds.HighBit = sc.bits_stored - 1
    ds.PixelRepresentation = 0
    if sc.rescale is not None:
        ds.RescaleIntercept = f"{sc.rescale[1]:g}"
        ds.RescaleSlope = f"{sc.rescale[0]:g}"
        ds.RescaleType = "US"
    wc, ww = window_for(stored_mono2, sc, spec.photometric, max_value)
    ds.WindowCenter = f"{wc:g}"
    ds.WindowWidth = f"{ww:g}"
    ds.VOILUTFunction = "LINEAR"
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(stored_for_file(stored_mono2, spec.photometric, max_value)).tobytes()
    return ds


def write_dicom(path: Path, spec: DicomSpec, stored_mono2: np.ndarray, max_value: int) -> None:
    """Write the file (preamble + file meta); compress losslessly when spec.codec asks for it."""
    ds = build_dataset(spec, stored_mono2, max_value)
    if spec.codec != "explicit":
        arr = stored_for_file(stored_mono2, spec.photometric, max_value)
        ds.compress(
            TRANSFER_SYNTAXES[spec.codec], arr, encoding_plugin="pylibjpeg", generate_instance_uid=False
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
