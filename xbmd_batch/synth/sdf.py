"""2-D signed distances and profiles the renderer draws the anatomy with (numpy, vectorised, mm).

Outlines are signed distances (negative inside) joined by smooth minima; `chord` turns an outline and a
half-depth into the projected path length through the solid (docs/synth.md, render.py's docstring).
"""

from __future__ import annotations

import math

import numpy as np


def seg_sdf(
    pu: np.ndarray, pv: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], r0: float, r1: float
) -> np.ndarray:
    """Signed distance (approx.) to a tapered capsule p0 (radius r0) -> p1 (radius r1)."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    x, y = pu - p0[0], pv - p0[1]
    t = np.clip((x * du + y * dv) / (du * du + dv * dv), 0.0, 1.0)
    x = x - t * du
    y = y - t * dv
    return np.sqrt(x * x + y * y) - (r0 + (r1 - r0) * t)


def ellipse_sdf(
    pu: np.ndarray, pv: np.ndarray, cu: float, cv: float, a: float, b: float, ang: float = 0.0
) -> np.ndarray:
    """Signed distance (first-order approximation, exact on the boundary) to an ellipse rotated by `ang`."""
    x, y = pu - cu, pv - cv
    if ang:
        ca, sa = math.cos(ang), math.sin(ang)
        x, y = ca * x + sa * y, -sa * x + ca * y
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    k1 = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two signed distances (polynomial smooth minimum, blend width k)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def chord(sdf: np.ndarray, rd: np.ndarray | float) -> np.ndarray:
    """Projected path through a solid whose outline has signed distance `sdf` and half-depth `rd`.

    Rounded edge (a cylinder of radius rd seen side-on: 2 sqrt(q (2 rd - q)), q = depth inside the outline),
    flat 2 rd once more than rd inside — bone as deep as it is wide near its edges, no deeper in the middle.
    """
    q = np.clip(-sdf, 0.0, rd)
    return 2.0 * np.sqrt(q * (2.0 * rd - q))


def line(d: np.ndarray, w: float) -> np.ndarray:
    """Gaussian line profile of half-width w at signed distance d."""
    return np.exp(-((d / w) ** 2))


def circle3(
    p1: tuple[float, float], p2: tuple[float, float], p3: tuple[float, float]
) -> tuple[float, float, float]:
    """Centre and radius of the circle through three points."""
    (x1, y1), (x2, y2), (x3, y3) = p1, p2, p3
    d = 2 * (x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    s1, s2, s3 = x1 * x1 + y1 * y1, x2 * x2 + y2 * y2, x3 * x3 + y3 * y3
    cx = (s1 * (y2 - y3) + s2 * (y3 - y1) + s3 * (y1 - y2)) / d
    cy = (s1 * (x3 - x2) + s2 * (x1 - x3) + s3 * (x2 - x1)) / d
    return cx, cy, math.hypot(x1 - cx, y1 - cy)
