"""Image preprocessing shared by training and scoring: pure array functions (MONAI style), no torch.

One code path for both, so they cannot drift: ``load_and_preprocess`` = ``dicom_io.read_stored`` (stored
values, DICOM grayscale order as an affine, resolution-aware JPEG 2000) + ``preprocess_stored``. Exact steps
and the measured parity with version 2: docs/dicom.md.

Definition (``PreprocessConfig.version`` 4). The image is the DICOM grayscale image ``g`` (bone bright).
1. (Version 3 only: block means -- ``g`` averaged over k x k blocks, k = the largest power of two that keeps
   the short side >= 2 x ``image_size``, a partial last block the mean of the pixels it holds. Version 4
   dropped them: the block approximation moved an image-sensitive model's predictions by up to 0.005 g/cm2
   against version 2, for 1 ms per image; docs/dicom.md.)
2. Pad to square (if ``pad_to_square``) with the edge value: the median of a border band 1 % of the short
   side wide, taken on the decoded pixels (full resolution unless the JPEG 2000 decode was reduced).
3. Antialiased resize to ``image_size``: Pillow's BILINEAR (triangle) weights on the full-resolution padded
   canvas (a reduced JPEG 2000 sample, or a version-3 block mean, gets the summed weight of the pixels it
   stands for, so the grid is exactly that of a full-resolution resize, with no half-pixel drift). On a
   full-resolution image this is version 2's Pillow resize, computed as a banded matrix product.
4. Percentiles ``clip_percentiles`` over the image area (padding excluded), clip, map to [0, 1],
   ``(x - norm_mean) / norm_std``. A constant image maps to ``-norm_mean / norm_std``.

Why it is fast and equal to computing on ``g``: the rescale and MONOCHROME1 inversion are affine, and every
step before the percentiles is a weighted mean with weights summing to 1 (or a median), so they are applied
on the 224 x 224 result instead of on 4 Mpixel, and the resize reads the stored integers (version 3's block
means are taken on them by OpenCV's ``INTER_AREA``: uint16 in, uint16 out, rounded to the nearest integer,
<= 0.5 stored units, used only for >= 10-bit data; fewer bits go through float32). Non-linear LUTs
(Modality LUT Sequence; VOI window or VOI LUT when ``apply_voi``) are applied to every pixel first
(``StoredImage.exact``).

Version-2 model cards are scored with ``xbmd_batch.preprocess_v2`` (that definition, unchanged); version-3
cards with this module and block means (``reduce_factor``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.dicom_io import DecodeInfo, StoredImage, read_stored

__all__ = [
    "preprocess_image",
    "preprocess_stored",
    "load_and_preprocess",
    "preprocess_fingerprint",
    "block_factor",
    "block_reduce",
    "reduce_stored",
    "finish",
    "Reduced",
    "LEGACY_VERSIONS",
]

LEGACY_VERSIONS = (1, 2)  # versions served by xbmd_batch.preprocess_v2
BLOCK_MEAN_VERSIONS = (3,)  # versions whose step 1 averages k x k blocks (reduce_factor)
KNOWN_VERSIONS = (*LEGACY_VERSIONS, *BLOCK_MEAN_VERSIONS, PreprocessConfig.version)


def _edge_value(img: np.ndarray, band: int = 1) -> np.float64:
    """Median of the outer ``band`` rows and columns: the radiograph's background (air / collimation)."""
    b = max(1, min(band, img.shape[0] // 2, img.shape[1] // 2))
    parts = [img[:b, :].ravel(), img[-b:, :].ravel(), img[:, :b].ravel(), img[:, -b:].ravel()]
    border = np.concatenate(parts)
    step = max(1, border.size // 20000)  # cap the median's cost on 4-Mpixel images
    return np.float64(np.median(border[::step]))


def _band(full_shape: tuple[int, int], subsample: int) -> int:
    return max(1, round(0.01 * min(full_shape) / subsample))


def block_factor(shape: tuple[int, int], image_size: int) -> int:
    """Largest power of two k with min(shape) / k >= 2 * image_size (1 if the image is already small)."""
    k = 1
    while min(shape) / (2 * k) >= 2 * image_size:
        k *= 2
    return k


def reduce_factor(shape: tuple[int, int], cfg: PreprocessConfig) -> int:
    """Step 1's block size for this definition version: ``block_factor`` for version 3, else 1 (none)."""
    return block_factor(shape, int(cfg.image_size)) if cfg.version in BLOCK_MEAN_VERSIONS else 1


def block_reduce(x: np.ndarray, k: int, bits_stored: int = 32, keep_integers: bool = False) -> np.ndarray:
    """k x k block means of a 2-D array; the last partial block row/column is the mean of what it has.

    uint16/int16 with >= 10 stored bits are averaged by OpenCV in integers, every mean rounded to the
    nearest stored value (returned as that integer type with ``keep_integers``: half the bytes to hand over);
    other inputs in float32.
    """
    import cv2

    integer = x.dtype in (np.uint16, np.int16) and bits_stored >= 10
    if k == 1:
        return x if integer and keep_integers else np.asarray(x, dtype=np.float32)
    h, w = x.shape
    hb, wb = h // k, w // k
    if not integer:
        x = np.asarray(x, dtype=np.float32)
    out = np.empty((-(-h // k), -(-w // k)), np.float32)
    if hb and wb:
        main = x[: hb * k, : wb * k]
        out[:hb, :wb] = cv2.resize(main, (wb, hb), interpolation=cv2.INTER_AREA)
    if w % k and hb:
        out[:hb, wb] = x[: hb * k, wb * k :].reshape(hb, k, -1).mean((1, 2), dtype=np.float64)
    if h % k:
        tail = x[hb * k :].astype(np.float64)
        pad = (-w) % k
        sums = np.add.reduceat(tail.sum(0), np.arange(0, w, k)) if w else np.zeros(0)
        counts = np.full(out.shape[1], k * tail.shape[0], np.float64)
        if pad:
            counts[-1] = (w % k) * tail.shape[0]
        out[hb, :] = sums / counts
    if integer:
        if h % k or w % k:  # partial blocks: rounded like OpenCV's (identical result on every path)
            out[hb:, :] = np.rint(out[hb:, :])
            out[:, wb:] = np.rint(out[:, wb:])
        if keep_integers:
            return out.astype(x.dtype)
    return out


_CHUNK = 16  # output rows per matmul in _resample
_Chunks = tuple[tuple[int, int, int, int, np.ndarray], ...]


@functools.lru_cache(maxsize=64)
def _axis_weights(
    canvas: int, out: int, offset: int, n: int, step: int, phase: float, samples: int
) -> tuple[_Chunks, np.ndarray]:
    """Banded resampling weights of one axis: (chunks (row0, row1, in0, in1, weights), image weight sum).

    Pillow's BILINEAR coefficients (Resample.c precompute_coeffs) over a ``canvas``-pixel axis resized to
    ``out``; the image occupies canvas pixels [offset, offset + n); sample j stands for the image interval
    [j * step - phase, (j + 1) * step - phase) in pixel-edge coordinates (pixel p spans [p, p + 1)), clipped
    to [0, n) (the last one up to n), and gets the weight of the pixels it covers (a pixel cut by a
    fractional bound is shared pro rata). The rest of each row's weight (1 - sum) belongs to the padding.
    """
    scale = canvas / out
    support = max(scale, 1.0)
    centers = (np.arange(out) + 0.5) * scale
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C (int) truncation; >= 0 here
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), canvas)
    width = int((xmax - xmin).max())
    x = xmin[:, None] + np.arange(width)[None, :]
    valid = x < xmax[:, None]
    w = np.where(valid, np.maximum(0.0, 1.0 - np.abs((x - centers[:, None] + 0.5) / support)), 0.0)
    w /= w.sum(1, keepdims=True)
    # Cumulative weight over image pixels: cum[i, p] = sum of row i's weights on image pixels < p.
    img_x = x - offset
    inside = valid & (img_x >= 0) & (img_x < n)
    dense = np.zeros((out, n + 1), np.float64)
    rows = np.broadcast_to(np.arange(out)[:, None], x.shape)
    np.add.at(dense, (rows[inside], img_x[inside] + 1), w[inside])
    cum = np.cumsum(dense, axis=1)
    bounds = np.clip(np.arange(samples + 1) * step - phase, 0.0, float(n))
    bounds[-1] = n
    lo_i = np.floor(bounds).astype(np.int64)
    frac = bounds - lo_i
    hi_i = np.minimum(lo_i + 1, n)
    cb = cum[:, lo_i] * (1.0 - frac) + cum[:, hi_i] * frac  # fractional bounds share a pixel's weight
    ws = cb[:, 1:] - cb[:, :-1]  # [out, samples]
    # Band-diagonal: cut the output rows into chunks of _CHUNK; each chunk is a small dense matmul over the
    # inputs its rows touch (~16 x 80 instead of 224 x 1000: the dense product costs 10x more).
    chunks = []
    for c0 in range(0, out, _CHUNK):
        blk = ws[c0 : c0 + _CHUNK]
        nz = np.flatnonzero((blk > 1e-12).any(0))
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        chunks.append((c0, c0 + blk.shape[0], lo, hi, np.ascontiguousarray(blk[:, lo:hi], dtype=np.float32)))
    return tuple(chunks), ws.sum(1)


def _resample(r: np.ndarray, rows: _Chunks, cols: _Chunks, out: int) -> np.ndarray:
    """Separable banded resample of ``r``: rows then columns, one small matmul per chunk. Integer input is
    converted to float32 one band at a time into a reused buffer: converting a whole 2000-px image costs a
    fresh 12 MB allocation (page faults) per image, more than the matmuls."""
    y1 = np.empty((out, r.shape[1]), np.float32)
    if r.dtype == np.float32:
        for a, b, lo, hi, w in rows:
            np.matmul(w, r[lo:hi], out=y1[a:b])  # (chunk, w)
    else:
        band = np.empty((max(hi - lo for _, _, lo, hi, _ in rows), r.shape[1]), np.float32)
        for a, b, lo, hi, w in rows:
            x = band[: hi - lo]
            x[...] = r[lo:hi]  # exact: integers up to 2**24 are float32
            np.matmul(w, x, out=y1[a:b])  # (chunk, w)
    y = np.empty((out, out), np.float32)
    for a, b, lo, hi, w in cols:
        np.matmul(y1[:, lo:hi], w.T, out=y[:, a:b])  # (S, chunk)
    return y


@dataclass(frozen=True)
class Reduced:
    """A decoded image after step 1 (block means): what is left is the same for every image of a batch, so
    it can run batched on the model's device (``preprocess_torch.finish_batch``) or here (``finish``)."""

    pixels: np.ndarray  # [h, w] block means; uint16/int16 (OpenCV-rounded) or float32
    fill: float  # padding value, stored units
    scale: float  # grayscale = scale * stored + offset
    offset: float
    step: int  # full-resolution pixels per sample (subsample * k)
    phase: float
    full_shape: tuple[int, int]


@dataclass(frozen=True)
class _Geometry:
    mh: int  # canvas (padded) rows, columns and the image's offset in it
    mw: int
    top: int
    left: int
    area: tuple[int, int, int, int]  # image area in output pixels (r0, r1, c0, c1): percentiles only there


def geometry(full_shape: tuple[int, int], cfg: PreprocessConfig) -> _Geometry:
    s = int(cfg.image_size)
    fh, fw = full_shape
    if cfg.pad_to_square:
        mh = mw = max(fh, fw)
        top, left = (mh - fh) // 2, (mw - fw) // 2
    else:
        mh, mw, top, left = fh, fw, 0, 0
    r0, r1 = int(round(top * s / mh)), int(round((top + fh) * s / mh))
    c0, c1 = int(round(left * s / mw)), int(round((left + fw) * s / mw))
    return _Geometry(mh, mw, top, left, (r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)))


def reduce_stored(st: StoredImage, cfg: PreprocessConfig) -> Reduced:
    """Step 1 and the padding value: the CPU part (runs in the decode workers)."""
    x = st.pixels
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"preprocess expects a non-empty 2-D array, got shape {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    fill = float(_edge_value(x, _band(st.full_shape, st.subsample)))
    k = reduce_factor(x.shape, cfg)
    r = block_reduce(x, k, st.bits_stored, keep_integers=True)
    return Reduced(r, fill, st.scale, st.offset, st.subsample * k, st.phase, st.full_shape)


def axis_weights(red: Reduced, cfg: PreprocessConfig) -> tuple[_Chunks, np.ndarray, _Chunks, np.ndarray]:
    """(row chunks, row image-weight sums, column chunks, column sums) for ``red`` (cached per geometry)."""
    s = int(cfg.image_size)
    g = geometry(red.full_shape, cfg)
    fh, fw = red.full_shape
    rows, sv = _axis_weights(g.mh, s, g.top, fh, red.step, red.phase, red.pixels.shape[0])
    cols, sh = _axis_weights(g.mw, s, g.left, fw, red.step, red.phase, red.pixels.shape[1])
    return rows, sv, cols, sh


def finish(red: Reduced, cfg: PreprocessConfig) -> np.ndarray:
    """Steps 2-4 on the CPU: resize (with the padding's share), affine to grayscale, percentiles, scale."""
    s = int(cfg.image_size)
    rows, sv, cols, sh = axis_weights(red, cfg)
    px = np.asarray(red.pixels)
    if not (px.dtype.kind in "iu" and px.itemsize <= 2):  # 8/16-bit integers are converted band by band
        px = np.asarray(px, dtype=np.float32)
    y = _resample(px, rows, cols, s).astype(np.float64)
    y += red.fill * (1.0 - np.outer(sv, sh))  # the padding's share of each output pixel
    y = red.scale * y + red.offset  # stored units -> grayscale (affine: commutes with the weighted means)
    r0, r1, c0, c1 = geometry(red.full_shape, cfg).area
    lo, hi = np.percentile(y[r0:r1, c0:c1], cfg.clip_percentiles)
    if hi > lo:
        y = np.clip((y - lo) / (hi - lo), 0.0, 1.0)
    else:
        y = np.zeros_like(y)
    y = (y - cfg.norm_mean) / cfg.norm_std
    return y.astype(np.float32)[None, :, :]  # (1, S, S)


def preprocess_stored(st: StoredImage, cfg: PreprocessConfig) -> np.ndarray:
    """A decoded image (``dicom_io.StoredImage``) -> model input float32 [1, S, S] (module doc)."""
    return finish(reduce_stored(st, cfg), cfg)


def preprocess_image(
    img2d: np.ndarray,
    cfg: PreprocessConfig,
    *,
    subsample: int = 1,
    full_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Grayscale image (bone bright, any size and dtype) -> model input float32 [1, S, S].

    ``subsample`` / ``full_shape`` describe a JPEG 2000 level-r decode (subsample = 2**r, sample k centred on
    full-resolution pixel ``subsample * k``; full_shape = the stored Rows, Columns). Version <= 2 configs use
    the previous definition (``preprocess_v2.preprocess_image``).
    """
    if cfg.version in LEGACY_VERSIONS:
        from xbmd_batch import preprocess_v2

        return preprocess_v2.preprocess_image(img2d, cfg, subsample=subsample, full_shape=full_shape)
    x = np.asarray(img2d)
    if x.ndim != 2:
        raise ValueError(f"preprocess_image expects a non-empty 2-D array, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        x = x.astype(np.float32)
    f = int(subsample)
    st = StoredImage(
        pixels=x,
        scale=1.0,
        offset=0.0,
        subsample=f,
        phase=f / 2 - 0.5 if f > 1 else 0.0,
        full_shape=tuple(full_shape) if full_shape is not None else (x.shape[0] * f, x.shape[1] * f),  # type: ignore[arg-type]
        exact=True,
        bits_stored=32 if x.dtype.kind == "f" else 8 * x.dtype.itemsize,
    )
    return preprocess_stored(st, cfg)


def load_and_preprocess(path: str | os.PathLike[str], cfg: PreprocessConfig) -> tuple[np.ndarray, DecodeInfo]:
    """The one path from a DICOM file to a model input, used by both training and scoring."""
    if cfg.version in LEGACY_VERSIONS:
        from xbmd_batch import preprocess_v2

        return preprocess_v2.load_and_preprocess(path, cfg)
    if cfg.version not in KNOWN_VERSIONS:
        raise ValueError(
            f"preprocessing version {cfg.version} is not known to this xbmd-batch (knows "
            f"{', '.join(map(str, KNOWN_VERSIONS))}); upgrade xbmd-batch"
        )
    st, info = read_stored(path, target_size=cfg.image_size, apply_voi=cfg.apply_voi)
    return preprocess_stored(st, cfg), info


def preprocess_fingerprint(cfg: PreprocessConfig) -> str:
    """sha256 of the config's canonical JSON: the cache key part that changes whenever preprocessing does."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
