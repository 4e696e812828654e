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


# float32 bytes of one geometry group converted at once (a bounded working set whatever the batch size:
# 128 x 2000^2 float32 would be 2 GB; 256 MiB holds 16 such images)
CHUNK_BYTES = 256 << 20


def finish_batch(items: list[Reduced], cfg: PreprocessConfig, device: Any = "cpu") -> Any:
    """Reduced images -> model input torch.float32 [B, 1, S, S] on ``device``.

    ``Reduced.pixels`` may be numpy (uploaded here) or a torch tensor already on ``device``
    (``score.batcher.DeviceBatcher`` uploads each image as it arrives).

    Items are finished by geometry group: those sharing (pixel shape, step, phase, full shape) share their
    weights, padding share and percentile area, so each group is converted to float32 (at most
    ``CHUNK_BYTES`` at a time) and resized with two broadcast matrix products; nothing is padded to the
    batch's largest image. Percentiles: numpy's default (linear interpolation between order statistics)
    over each image's area, from one sort per group; the order statistics are float32 (what the resize
    produced), the interpolation is float64 like numpy's.
    """
    import torch

    from xbmd_batch.infer.torch_runner import ieee_fp32

    s = int(cfg.image_size)
    dev = torch.device(device)
    dev_key = str(dev)
    groups: dict[tuple[tuple[int, int], int, float, tuple[int, int]], list[int]] = {}
    for i, r in enumerate(items):
        h, w = r.pixels.shape
        key = ((int(r.full_shape[0]), int(r.full_shape[1])), int(r.step), float(r.phase), (int(h), int(w)))
        groups.setdefault(key, []).append(i)
    order = [i for members in groups.values() for i in members]
    # per item (fill, scale, offset) in group order: one small host-to-device copy for the whole batch
    params = _to_device(
        torch.tensor([[items[i].fill, items[i].scale, items[i].offset] for i in order], dtype=torch.float32),
        dev,
    )
    out = torch.empty((len(items), 1, s, s), dtype=torch.float32, device=dev)
    start = 0
    for key, members in groups.items():
        gv, gh, gp, area = _geometry(*key, cfg, dev_key)
        # IEEE fp32 even if the process enabled TF32 (10-bit mantissa: ~5e-4 relative on 12-bit stored
        # values, i.e. up to ~2e-3 model-input units after the percentile stretch; the CPU path is exact fp32)
        with ieee_fp32(torch):
            y = _resize([items[i].pixels for i in members], gv, gh, key[3], dev)  # (g, S, S)
        p = params[start : start + len(members)]
        start += len(members)
        fill, scale, offset = (p[:, k, None, None] for k in range(3))
        y = scale * (y + fill * gp) + offset  # the padding's share, then stored units -> grayscale
        y = _stretch(y, area, cfg)
        for a, b, j in _runs(members):
            out[a:b, 0] = y[j : j + (b - a)]
    return out


def _to_device(t: Any, dev: Any) -> Any:
    if dev.type == "cpu":
        return t
    return t.pin_memory().to(dev, non_blocking=True)  # torch's pinned pool keeps it until the copy is done


def _resize(pixels: list[Any], gv: Any, gh: Any, shape: tuple[int, int], dev: Any) -> Any:
    """Images of one shape (stored integers or float32; numpy or tensors) -> float32 (g, S, S):
    ``gv @ x @ gh`` with the group's weights broadcast over the images."""
    import torch

    h, w = shape
    per = max(1, CHUNK_BYTES // (h * w * 4))
    ys = []
    for a in range(0, len(pixels), per):
        chunk = pixels[a : a + per]
        x = torch.empty((len(chunk), h, w), dtype=torch.float32, device=dev)
        for k, px in enumerate(chunk):
            x[k].copy_(px if torch.is_tensor(px) else torch.from_numpy(np.ascontiguousarray(px)))
        ys.append(torch.matmul(torch.matmul(gv, x), gh))
    return ys[0] if len(ys) == 1 else torch.cat(ys)


def _stretch(y: Any, area: tuple[int, int, int, int], cfg: PreprocessConfig) -> Any:
    """Percentile stretch to [0, 1] (over the image area, numpy's linear definition) and normalisation."""
    import torch

    r0, r1, c0, c1 = area
    g = y.shape[0]
    v = torch.sort(y[:, r0:r1, c0:c1].reshape(g, -1), dim=1).values
    n = v.shape[1]
    bounds = []
    for pct in cfg.clip_percentiles:
        pos = float(pct) / 100.0 * (n - 1)
        i0 = int(np.floor(pos))
        i1 = min(i0 + 1, n - 1)
        t = pos - i0
        a, b = v[:, i0].to(torch.float64), v[:, i1].to(torch.float64)
        # numpy's _lerp: a + (b - a) * t, from the upper end when t >= 0.5
        bounds.append((a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)).to(torch.float32))
    lo, hi = (x[:, None, None] for x in bounds)
    span = hi - lo
    ok = span > 0
    y = torch.where(ok, ((y - lo) / torch.where(ok, span, torch.ones_like(span))).clamp(0.0, 1.0), 0.0)
    return (y - cfg.norm_mean) / cfg.norm_std


def _runs(members: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive stretches of ``members`` (ascending batch positions): (first, end, offset in members)."""
    runs: list[tuple[int, int, int]] = []
    j = 0
    while j < len(members):
        k = j
        while k + 1 < len(members) and members[k + 1] == members[k] + 1:
            k += 1
        runs.append((members[j], members[k] + 1, j))
        j = k + 1
    return runs
