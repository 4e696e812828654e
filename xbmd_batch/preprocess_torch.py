"""Steps 2-4 of preprocessing (resize with padding, grayscale affine, percentiles) for a whole batch in torch.

Used when ``--preprocess-device`` resolves to the runner's CUDA device: decode workers stop after step 1
(``preprocess.reduce_stored``: block means of the stored integers, the padding value and the grayscale affine)
and hand those over; this module finishes the batch on the device with two batched matrix products. The
weights are the very ones ``preprocess.finish`` uses (``preprocess.axis_weights``), so the CPU and device
paths are one definition; ``tests/test_preprocess_torch.py`` checks them against each other on CPU torch.
"""

from __future__ import annotations

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


def finish_batch(items: list[Reduced], cfg: PreprocessConfig, device: Any = "cpu") -> Any:
    """Reduced images -> model input torch.float32 [B, 1, S, S] on ``device``.

    ``Reduced.pixels`` may be numpy (uploaded here) or a torch tensor already on ``device``
    (``score.batcher.DeviceBatcher`` uploads each image as it arrives)."""
    import torch

    s = int(cfg.image_size)
    b = len(items)
    hmax = max(r.pixels.shape[0] for r in items)
    wmax = max(r.pixels.shape[1] for r in items)
    x = torch.zeros((b, hmax, wmax), dtype=torch.float32, device=device)
    wv = np.zeros((b, s, hmax), np.float32)
    wh = np.zeros((b, wmax, s), np.float32)
    pad = np.zeros((b, s, s), np.float32)  # the padding's share of each output pixel
    area = torch.zeros((b, s, s), dtype=torch.bool, device=device)
    for i, r in enumerate(items):
        h, w = r.pixels.shape
        rows, sv, cols, sh = axis_weights(r, cfg)
        wv[i, :, :h] = _dense(rows, h, s)
        wh[i, :w, :] = _dense(cols, w, s).T
        pad[i] = 1.0 - np.outer(sv, sh)
        px = r.pixels if torch.is_tensor(r.pixels) else torch.from_numpy(np.ascontiguousarray(r.pixels))
        x[i, :h, :w] = px.to(device).to(torch.float32)  # (uint16 / int16 / float32 block means)
        r0, r1, c0, c1 = geometry(r.full_shape, cfg).area
        area[i, r0:r1, c0:c1] = True
    fill = torch.tensor([r.fill for r in items], dtype=torch.float32, device=device)[:, None, None]
    scale = torch.tensor([r.scale for r in items], dtype=torch.float32, device=device)[:, None, None]
    offset = torch.tensor([r.offset for r in items], dtype=torch.float32, device=device)[:, None, None]
    y = torch.bmm(torch.bmm(torch.from_numpy(wv).to(device), x), torch.from_numpy(wh).to(device))  # (B, S, S)
    y = y + fill * torch.from_numpy(pad).to(device)
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
