"""T-scores, WHO classes and screening thresholds for femoral-neck BMD.

Reference: NHANES III femoral neck, white women aged 20-29, mean 0.858 g/cm^2, SD 0.120 (Hologic scale).
T = (BMD - mean) / SD. WHO: T >= -1 normal; -2.5 < T < -1 osteopenia; T <= -2.5 osteoporosis.
The Lunar reference is the same population converted with Lunar = (1.087 * Hologic + 0.042) / 0.939, which
gives the paper poster's 0.899 g/cm^2 at T = -1. Model predictions are on the scale of the training labels;
pick the reference that matches the DXA scanner the labels came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def hologic_to_lunar(bmd_hologic: float | np.ndarray) -> float | np.ndarray:
    return (1.087 * bmd_hologic + 0.042) / 0.939


@dataclass(frozen=True)
class TScoreReference:
    name: str
    mean: float  # young-adult reference mean, g/cm^2
    sd: float  # young-adult reference SD, g/cm^2
    description: str

    def t_score(self, bmd: float | np.ndarray) -> float | np.ndarray:
        return (np.asarray(bmd, dtype=np.float64) - self.mean) / self.sd

    def bmd_at(self, t: float) -> float:
        return self.mean + t * self.sd

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "mean": self.mean, "sd": self.sd, "description": self.description}


_H_MEAN, _H_SD = 0.858, 0.120
REFERENCES: dict[str, TScoreReference] = {
    "nhanes3-hologic": TScoreReference(
        "nhanes3-hologic", _H_MEAN, _H_SD, "NHANES III femoral neck, white women 20-29, Hologic scale"
    ),
    "lunar": TScoreReference(
        "lunar",
        float(hologic_to_lunar(_H_MEAN)),
        float(1.087 * _H_SD / 0.939),
        "NHANES III femoral neck converted to the GE Lunar scale: (1.087*Hologic + 0.042)/0.939",
    ),
}
DEFAULT_REFERENCE = "nhanes3-hologic"

WHO_CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
SCREEN_THRESHOLDS: tuple[float, ...] = (-1.0, -2.5)  # screening flags: T <= threshold


def get_reference(name: str) -> TScoreReference:
    try:
        return REFERENCES[name]
    except KeyError:
        raise ValueError(f"unknown T-score reference {name!r}; choose one of {sorted(REFERENCES)}") from None


def who_class(t: float | np.ndarray) -> np.ndarray:
    """WHO class per T-score: 'normal' (T >= -1), 'osteopenia' (-2.5 < T < -1), 'osteoporosis' (T <= -2.5)."""
    t = np.asarray(t, dtype=np.float64)
    out = np.full(t.shape, "normal", dtype=object)
    out[t < -1.0] = "osteopenia"
    out[t <= -2.5] = "osteoporosis"
    return out
