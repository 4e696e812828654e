"""Preprocessing definition version 2 (xbmd-batch <= issue 11), kept verbatim.

Why it is kept: model cards written with ``PreprocessConfig.version == 2`` are scored with exactly the
preprocessing they were trained with, and tests compare version 3 (``xbmd_batch.preprocess``) against it.
It converts the full-resolution image to float32 grayscale first, pads the full matrix and resizes it with
Pillow's 'F'-mode BILINEAR (antialiased triangle) filter: exact, but 50-90 ms per 2000-px image.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.dicom_io import DecodeInfo, read_image

__all__ = ["preprocess_image", "load_and_preprocess", "pad_to_square", "resize"]


def pad_to_square(img: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Centre ``img`` on a square canvas filled with its edge value; returns (canvas, (top, left, h, w)).

    The fill is the median of the outermost rows and columns: the background (collimation / air) of the
    radiograph, so the padding looks like more background rather than a hard black or white band, and keeps
    the aspect ratio of the anatomy.
    """
    h, w = img.shape
    if h == w:
        return img, (0, 0, h, w)
    m = max(h, w)
    out = np.full((m, m), _edge_value(img, _band(img.shape, 1)), dtype=np.float32)
    top, left = (m - h) // 2, (m - w) // 2
    out[top : top + h, left : left + w] = img
    return out, (top, left, h, w)


def resize(img: np.ndarray, size: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Antialiased resize of a float32 2-D array (or its ``box`` region, Pillow area coords) to size x size.

    Pillow's BILINEAR filter in 'F' mode: the triangle support widens with the downscale factor (antialiased).
    """
    if box is None and img.shape == (size, size):
        return img.astype(np.float32, copy=True)
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box), dtype=np.float32)


def _edge_value(img: np.ndarray, band: int = 1) -> np.float32:
    """Median of the outer ``band`` rows and columns: the radiograph's background (air / collimation).

    A band of ~1 % of the short side (not the single outermost line) so that a full-resolution and a
    wavelet-reduced decode of the same image give nearly the same value.
    """
    b = max(1, min(band, img.shape[0] // 2, img.shape[1] // 2))
    parts = [img[:b, :].ravel(), img[-b:, :].ravel(), img[:, :b].ravel(), img[:, -b:].ravel()]
    border = np.concatenate(parts)
    step = max(1, border.size // 20000)  # cap the median's cost on 4-Mpixel images
    return np.float32(np.median(border[::step]))


def _band(full_shape: tuple[int, int], subsample: int) -> int:
    return max(1, round(0.01 * min(full_shape) / subsample))


def preprocess_image(
    img2d: np.ndarray,
    cfg: PreprocessConfig,
    *,
    subsample: int = 1,
    full_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Grayscale image (bone bright, any size) -> model input float32 [1, S, S], deterministically.

    Steps (cfg = PreprocessConfig): pad to square with the edge value (if cfg.pad_to_square) -> antialiased
    resize to cfg.image_size -> percentiles cfg.clip_percentiles computed over the image area (padding
    excluded) -> clip and map to [0, 1] -> (x - cfg.norm_mean) / cfg.norm_std. A constant image maps to 0.

    ``subsample`` / ``full_shape`` describe a reduced-resolution decode (JPEG 2000 wavelet level r:
    subsample = 2**r, sample k of the decoded image sits at full-resolution pixel ``subsample * k``;
    full_shape = the stored Rows, Columns). The output grid is then defined on the full-resolution geometry,
    so a reduced decode lands on the same pixels as full decode + resize (no half-pixel drift per level and
    no error from the rounded-up reduced size). Defaults = the image is at full resolution.
    """
    x = np.asarray(img2d, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"preprocess_image expects a non-empty 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    s = int(cfg.image_size)
    f = int(subsample)
    h, w = x.shape
    fh, fw = full_shape if full_shape is not None else (h * f, w * f)
    if cfg.pad_to_square:
        mh = mw = max(fh, fw)
        top, left = (mh - fh) // 2, (mw - fw) // 2
    else:
        mh, mw, top, left = fh, fw, 0, 0
    fill = _edge_value(x, _band((fh, fw), f))
    if f == 1 and (fh, fw) == (h, w):
        # Full resolution: pad with the edge value, then resize the whole canvas.
        if (mh, mw) != (h, w):
            canvas = np.full((mh, mw), fill, dtype=np.float32)
            canvas[top : top + h, left : left + w] = x
            x = canvas
        y = resize(x, s)
    else:
        # Output pixel j's centre is at full-res coordinate (j + 0.5) * m / S - 0.5 - offset; decoded sample k
        # at full-res f * k, i.e. Pillow area coordinate c / f + 0.5. Hence the box below, on a canvas padded
        # with the edge value far enough to contain it.
        y0, x0 = (-0.5 - top) / f + 0.5, (-0.5 - left) / f + 0.5
        y1, x1 = y0 + mh / f, x0 + mw / f
        # The last decoded row/column stands for up to f full-res pixels: the image ends at area coordinate
        # (n - 0.5) / f + 0.5, which can lie beyond the decoded array; replicate the edge there (as image).
        oy = max(0, int(np.ceil((fh - 0.5) / f + 0.5 - h)))
        ox = max(0, int(np.ceil((fw - 0.5) / f + 0.5 - w)))
        if oy or ox:
            x = np.pad(x, ((0, oy), (0, ox)), mode="edge")
            h, w = x.shape
        pt, pl = max(0, int(np.ceil(-y0))), max(0, int(np.ceil(-x0)))
        pb, pr = max(0, int(np.ceil(y1 - h))), max(0, int(np.ceil(x1 - w)))
        if pt or pl or pb or pr:
            canvas = np.full((h + pt + pb, w + pl + pr), fill, dtype=np.float32)
            canvas[pt : pt + h, pl : pl + w] = x
            x = canvas
        box = (x0 + pl, y0 + pt, min(x1 + pl, x.shape[1]), min(y1 + pt, x.shape[0]))
        y = resize(x, s, box=box)
    # Image area in output pixels (the padding must not shift the percentiles).
    r0, r1 = int(round(top * s / mh)), int(round((top + fh) * s / mh))
    c0, c1 = int(round(left * s / mw)), int(round((left + fw) * s / mw))
    r1, c1 = max(r1, r0 + 1), max(c1, c0 + 1)
    lo, hi = np.percentile(y[r0:r1, c0:c1], cfg.clip_percentiles)
    if hi > lo:
        y = np.clip((y - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    else:
        y = np.zeros_like(y)
    y = (y - np.float32(cfg.norm_mean)) / np.float32(cfg.norm_std)
    return y.astype(np.float32, copy=False)[None, :, :]  # (1, S, S)


def load_and_preprocess(path: str | os.PathLike[str], cfg: PreprocessConfig) -> tuple[np.ndarray, DecodeInfo]:
    """Version-2 path from a DICOM file to a model input (float32 full-resolution grayscale first)."""
    img, info = read_image(path, target_size=cfg.image_size, apply_voi=cfg.apply_voi)
    arr = preprocess_image(
        img, cfg, subsample=2**info.reduce_level, full_shape=(info.original_rows, info.original_cols)
    )
    return arr, info
