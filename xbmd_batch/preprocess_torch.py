"""Steps 2-4 of preprocessing (resize with padding, grayscale affine, percentiles) for a whole batch in torch.

Used when ``--preprocess-device`` resolves to the runner's CUDA device: decode workers stop after step 1
(``preprocess.reduce_stored``: the stored integers -- a version-3 card's block means --, the padding value and
the grayscale affine)
and hand those over; this module finishes the batch on the device with two batched matrix products. The
weights are the very ones ``preprocess.finish`` uses (``preprocess.axis_weights``), so the CPU and device
paths are one definition; ``tests/test_preprocess_torch.py`` checks them against each other on CPU torch.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from xbmd_batch.config import PreprocessConfig
from xbmd_batch.preprocess import Reduced, axis_weights, geometry

__all__ = ["finish_batch"]


def _dense(chunks: Any, n_in: int, s: int) -> np.ndarray:
    """Band chunks -> dense [S, n_in] float32 weight matrix."""
    w = np.zeros((s, n_in), np.float32)
    for a, b, lo, hi, blk in chunks:
        w[a:b, lo:hi] = blk
    return w


@functools.lru_cache(maxsize=64)
def _geometry(
    full_shape: tuple[int, int],
    step: int,
    phase: float,
    shape: tuple[int, int],
    cfg: PreprocessConfig,
    device: str,
) -> tuple[Any, Any, Any, tuple[int, int, int, int]]:
    """Per image geometry, on ``device`` and cached (a cohort has a handful of detector sizes, so building
    and uploading the dense weights per image would cost more than the resize itself):
    (row weights [S, h], column weights [w, S], the padding's share [S, S], image area in output pixels)."""
    import torch

    s = int(cfg.image_size)
    probe = Reduced(_Shape(shape), 0.0, 1.0, 0.0, step, phase, full_shape)  # type: ignore[arg-type]
    rows, sv, cols, sh = axis_weights(probe, cfg)
    h, w = shape
    wv = torch.from_numpy(_dense(rows, h, s)).to(device)
    wh = torch.from_numpy(np.ascontiguousarray(_dense(cols, w, s).T)).to(device)
    pad = torch.from_numpy((1.0 - np.outer(sv, sh)).astype(np.float32)).to(device)
    return wv, wh, pad, geometry(full_shape, cfg).area


class _Shape:
    """Stands in for a pixel array where only ``.shape`` is read."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape


def finish_batch(items: list[Reduced], cfg: PreprocessConfig, device: Any = "cpu") -> Any:
    """Reduced images -> model input torch.float32 [B, 1, S, S] on ``device``.

    ``Reduced.pixels`` may be numpy (uploaded here) or a torch tensor already on ``device``
    (``score.batcher.DeviceBatcher`` uploads each image as it arrives)."""
    import torch

    s = int(cfg.image_size)
    b = len(items)
    dev_key = str(torch.device(device))
    hmax = max(r.pixels.shape[0] for r in items)
    wmax = max(r.pixels.shape[1] for r in items)
    x = torch.zeros((b, hmax, wmax), dtype=torch.float32, device=device)
    wv = torch.zeros((b, s, hmax), dtype=torch.float32, device=device)
    wh = torch.zeros((b, wmax, s), dtype=torch.float32, device=device)
    pad = torch.empty((b, s, s), dtype=torch.float32, device=device)  # the padding's share of each pixel
    area = torch.zeros((b, s, s), dtype=torch.bool, device=device)
    for i, r in enumerate(items):
        h, w = r.pixels.shape
        gv, gh, gp, (r0, r1, c0, c1) = _geometry(
            tuple(r.full_shape), int(r.step), float(r.phase), (int(h), int(w)), cfg, dev_key
        )
        wv[i, :, :h] = gv
        wh[i, :w, :] = gh
        pad[i] = gp
        px = r.pixels if torch.is_tensor(r.pixels) else torch.from_numpy(np.ascontiguousarray(r.pixels))
        x[i, :h, :w] = px.to(device).to(torch.float32)  # (uint16 / int16 stored values or float32)
        area[i, r0:r1, c0:c1] = True
    fill = torch.tensor([r.fill for r in items], dtype=torch.float32, device=device)[:, None, None]
    scale = torch.tensor([r.scale for r in items], dtype=torch.float32, device=device)[:, None, None]
    offset = torch.tensor([r.offset for r in items], dtype=torch.float32, device=device)[:, None, None]
    # IEEE fp32 even if the process enabled TF32 (10-bit mantissa: ~5e-4 relative on 12-bit stored values,
    # i.e. up to ~2e-3 model-input units after the percentile stretch; the CPU path is exact fp32)
    from xbmd_batch.infer.torch_runner import ieee_fp32

    with ieee_fp32(torch):
        y = torch.bmm(torch.bmm(wv, x), wh)  # (B, S, S)
    y = y + fill * pad
    y = scale * y + offset
    q = torch.tensor([p / 100.0 for p in cfg.clip_percentiles], dtype=torch.float32, device=device)
    # Percentiles over each image's area only: NaN elsewhere, nanquantile (linear, as numpy's default).
    # float64 for the quantile so the order statistics match numpy's to the last bit that matters.
    masked = torch.where(area, y, torch.full_like(y, float("nan"))).reshape(b, -1).to(torch.float64)
    lo, hi = torch.nanquantile(masked, q.to(torch.float64), dim=1).to(torch.float32)  # each (B,)
    lo, hi = lo[:, None, None], hi[:, None, None]
    span = hi - lo
    ok = span > 0
    y = torch.where(ok, ((y - lo) / torch.where(ok, span, torch.ones_like(span))).clamp(0.0, 1.0), 0.0)
    y = (y - cfg.norm_mean) / cfg.norm_std
    return y[:, None, :, :]  # (B, 1, S, S)
