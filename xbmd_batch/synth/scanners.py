"""The SYNTHETIC scanner park: one `Scanner` (X-ray system, site) per site, its vendor-style `Processing`
(generator version 2), and a subject's generator-v2 inputs (`V2Subject`). Deterministic per seed; the
renderer (`render.py`) applies them and the DICOM writer records the scanner's tags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Scanner:
    """One simulated X-ray system (site). All values are synthetic choices, spread like real CR/DX units."""

    index: int
    site: str
    modality: str  # "CR" or "DX"
    manufacturer: str
    model_name: str
    fov_mm: float  # detector height covered by the rows
    aspect: float  # columns / rows
    row_factor: float  # matrix rows = round(size * row_factor)
    bits_stored: int
    rescale: tuple[float, float] | None  # (slope, intercept) written as RescaleSlope/Intercept, or None
    gamma: float
    offset_frac: float  # stored offset as a fraction of the max value
    gain_frac: float  # stored gain as a fraction of the max value
    white_noise: float  # full-resolution noise, display units (fraction of the display range)
    mtf_sigma_mm: float  # detector blur
    grid: float  # scatter factor (anti-scatter grid quality: lower is better)
    quanta: float  # relative detector efficiency (quanta per mm² scale)
    kvp: float

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rescale"] = list(self.rescale) if self.rescale else None
        return d


def make_scanners(n_scanners: int, seed: int) -> list[Scanner]:
    """Deterministic scanner park; CR and DX alternate, bit depth and rescale tags vary by scanner."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5CA]))
    bits = (12, 14, 16, 12, 15, 14, 16, 12)
    rescales: tuple[tuple[float, float] | None, ...] = (
        None,
        (0.5, -1024.0),
        None,
        (2.0, -100.0),
        (1.0, -4096.0),
    )
    out = []
    for i in range(n_scanners):
        modality = "CR" if i % 2 == 0 else "DX"
        out.append(
            Scanner(
                index=i,
                site=f"SITE{i + 1:02d}",
                modality=modality,
                manufacturer="SynthRay (synthetic)",
                model_name=f"SYNTH-{modality}-{i + 1}",
                fov_mm=float(rng.uniform(330, 380)),
                aspect=float(rng.choice([0.8, 0.82, 0.85, 0.9, 1.0])),
                row_factor=float(rng.uniform(0.9, 1.1)) if n_scanners > 1 else 1.0,
                bits_stored=bits[i % len(bits)],
                rescale=rescales[i % len(rescales)],
                gamma=float(rng.uniform(0.92, 1.08)),
                offset_frac=float(rng.uniform(0.02, 0.10)),
                gain_frac=float(rng.uniform(0.95, 1.15)),
                white_noise=float(rng.uniform(0.002, 0.006)),
                mtf_sigma_mm=float(rng.uniform(0.15, 0.45)),
                grid=float(rng.uniform(0.2, 0.5)),
                quanta=float(rng.uniform(0.6, 1.4)),
                kvp=float(rng.choice([70.0, 75.0, 77.0, 81.0, 85.0])),
            )
        )
    return out


@dataclass(frozen=True)
class Processing:
    """Vendor-style image processing of one scanner (generator version 2; SYNTHETIC parameters).

    Applied to the display image d on the working grid, then mapped back to d's range::

        d1 = d - drc_strength * G_drc * d                   dynamic-range compression (flattens soft tissue)
        d2 = d1 + usm_gain * (d1 - G_usm * d1)              unsharp masking (edge enhancement)
        d' = min(d) + (d2 - min(d2)) (max(d) - min(d)) / (max(d2) - min(d2))
    """

    index: int
    drc_strength: float
    drc_sigma_mm: float
    usm_gain: float
    usm_sigma_mm: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def make_processing(n_scanners: int, seed: int, v2: Any = None) -> list[Processing]:
    """One processing setting per scanner, from its own random stream (the v1 scanner park is unchanged)."""
    from xbmd_batch.synth.covariates import GeneratorV2

    g = v2 or GeneratorV2()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5CA, 2]))
    return [
        Processing(
            index=i,
            drc_strength=float(rng.uniform(*g.drc_strength)),
            drc_sigma_mm=float(rng.uniform(*g.drc_sigma_mm)),
            usm_gain=float(rng.uniform(*g.usm_gain)),
            usm_sigma_mm=float(rng.uniform(*g.usm_sigma_mm)),
        )
        for i in range(n_scanners)
    ]


@dataclass(frozen=True)
class V2Subject:
    """Per-subject inputs of generator version 2 (covariates.py): site densities, contrast, processing."""

    bmd_pelvis: float
    bmd_shaft: float
    bone_contrast: float
    processing: Processing
    mag_ref: float = 1.15
    mag_per_mm: float = 0.0025
