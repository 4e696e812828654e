"""Build small, valid DICOM files for tests and benchmarks (the one DICOM factory; not used by scoring).

``make_dicom`` writes one file with the chosen photometric interpretation, rescale, VOI, bit depth and
transfer syntax; ``hip_phantom`` gives a realistic-looking image (anatomy + texture + noise) so that
resize/decode parity is tested on something closer to an X-ray than random noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import uid as _uid
from pydicom.dataset import Dataset, FileMetaDataset

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def hip_phantom(rows: int = 256, cols: int = 256, bits_stored: int = 12, seed: int = 0) -> np.ndarray:
    """Unsigned stored values in [0, 2**bits_stored): a femur-like bright shape on soft tissue + texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    yy /= rows
    xx /= cols
    soft = 0.25 + 0.15 * np.exp(-((xx - 0.5) ** 2) / 0.15)
    head = np.exp(-(((yy - 0.3) ** 2 + (xx - 0.45) ** 2) / (2 * 0.07**2)))
    shaft = np.exp(-((xx - 0.6 - 0.25 * (yy - 0.5)) ** 2) / (2 * 0.05**2)) * (yy > 0.35)
    bone = np.clip(head + 0.8 * shaft, 0, 1)
    # Trabecular texture: white noise low-passed in the Fourier domain (correlation length ~1 % of size),
    # as the detector's MTF would; hard-edged block textures would be unrealistically sharp.
    white = rng.normal(0, 1, (rows, cols))
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    sigma_f = 1.0 / (0.01 * min(rows, cols) * 2 * np.pi)
    lp = np.exp(-(fy**2 + fx**2) / (2 * sigma_f**2))
    tex = np.fft.irfft2(np.fft.rfft2(white) * lp, s=(rows, cols))
    tex = (tex / (tex.std() + 1e-12)).astype(np.float32)
    img = soft + 0.5 * bone * (1 + 0.15 * tex)
    img += rng.normal(0, 0.01, (rows, cols)).astype(np.float32)
    img = np.clip(img, 0, 1) * (2**bits_stored - 1) * 0.9
    return img.astype(np.uint16 if bits_stored > 8 else np.uint8)


def make_dataset(
    pixels: np.ndarray | None = None,
    *,
    rows: int = 64,
    cols: int = 48,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    bits_allocated: int | None = None,
    signed: bool = False,
    rescale: tuple[float, float] | None = None,
    rescale_slope_only: float | None = None,
    window: tuple[float, float] | None = None,
    presentation_lut_shape: str | None = None,
    samples_per_pixel: int = 1,
    number_of_frames: int | None = None,
    patient_id: str = "SUBJ0001",
    modality: str = "DX",
    seed: int = 0,
) -> Dataset:
    """An uncompressed dataset (Explicit VR Little Endian) with file meta; compress it with ``compress``."""
    if bits_allocated is None:
        bits_allocated = 8 if bits_stored <= 8 else 16
    if pixels is None:
        if samples_per_pixel == 3:
            pixels = np.random.default_rng(seed).integers(0, 255, (rows, cols, 3), dtype=np.uint8)
        else:
            pixels = hip_phantom(rows, cols, bits_stored if not signed else bits_stored - 1, seed=seed)
            if number_of_frames and number_of_frames > 1:
                pixels = np.stack([pixels] * number_of_frames)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
    pixels = np.ascontiguousarray(pixels).astype(dtype)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = _uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = _uid.ExplicitVRLittleEndian
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid.generate_uid()
    ds.SeriesInstanceUID = _uid.generate_uid()
    ds.PatientID = patient_id
    ds.Modality = modality
    ds.BodyPartExamined = "HIP"
    ds.ViewPosition = "AP"
    ds.ImageLaterality = "L"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.SamplesPerPixel = samples_per_pixel
    ds.PhotometricInterpretation = photometric
    if samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
    if number_of_frames is not None:
        ds.NumberOfFrames = number_of_frames
    ds.Rows, ds.Columns = (pixels.shape[-3], pixels.shape[-2]) if samples_per_pixel > 1 else pixels.shape[-2:]
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if rescale_slope_only is not None:
        ds.RescaleSlope = rescale_slope_only
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if presentation_lut_shape is not None:
        ds.PresentationLUTShape = presentation_lut_shape
    ds.PixelData = pixels.tobytes()
    return ds


def compress(ds: Dataset, transfer_syntax: str, **kwargs: object) -> Dataset:
    """Compress in place with pydicom's encoders (J2K via pylibjpeg-openjpeg, RLE via pydicom/pylibjpeg)."""
    ts = _uid.UID(transfer_syntax)
    if ts == _uid.JPEG2000:
        kwargs.setdefault("j2k_psnr", [80])  # lossy, but close
    ds.compress(ts, **kwargs)
    return ds


def make_dicom(
    path: str | Path,
    *,
    transfer_syntax: str = _uid.ExplicitVRLittleEndian,
    preamble: bool = True,
    **kwargs: object,
) -> Path:
    """Write a DICOM file built by ``make_dataset(**kwargs)``; ``preamble=False`` writes a bare dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = make_dataset(**kwargs)  # type: ignore[arg-type]
    if str(transfer_syntax) != str(_uid.ExplicitVRLittleEndian):
        compress(ds, transfer_syntax)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path
