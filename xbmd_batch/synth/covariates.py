"""Synthetic covariates and the femoral-neck BMD structural model (SYNTHETIC data, no real subject).

Why a structural equation: the generator must know which part of the measured BMD metadata can explain, which
part only the radiograph shows and which part is irreducible, so it can report the oracle R² of a cohort.

Per subject i (sex s, all BMD values Hologic femoral neck, g/cm²)::

    age_xray ~ N(mid, (hi - lo) / 5) truncated to [lo, hi];   gap ~ N(0.5, 1.0) clipped to [-2, 4] years
    age_dxa  = age_xray + gap
    height   ~ N(h_s, sd_h_s);   log BMI ~ N(log bmi_s, sd_lb_s);   weight = BMI * (height / 100)^2
    smoking  ~ Cat(never .50, former .38, current .12);   alcohol, activity, diet: see draw_covariates
    z_x      = standardised covariate x within sex (population parameters, not sample moments)

    meta    = mu_s + b_s * (age_dxa - 76.5) + c_bmi z_logbmi + c_h z_height + c_act z_act + c_diet z_diet
              + c_alc z_logalc + c_former [former] + c_current [current]          (known from metadata)
    L       = latent_sd * e_L      bone quality the radiograph shows but no metadata field predicts
    S       = silent_sd * e_S      DXA-ROI variation the radiograph does not show ("radiographically silent")
    bmd_true  = meta + L + S                                    (the subject's BMD at the DXA visit)
    bmd_image = bmd_true - S - b_s * gap           (what the X-ray, taken `gap` years before the DXA, shows)
    bmd_dxa   = bmd_true * (1 + dxa_cv * e_D)                   (the measured label; DXA precision error)

with e_L, e_S, e_D ~ N(0, 1) independent of everything else.

Oracle predictors of bmd_dxa (`oracle_r2` gives their R² from the variance components on the drawn cohort):
metadata only -> ``meta``; image only -> ``bmd_image + mean(b_s * gap)`` (the image is assumed to reveal
``bmd_image`` exactly, i.e. rendering noise, pose, soft tissue and scanner are ignored); both ->
``bmd_image + b_s * gap`` (metadata adds the bone lost between X-ray and DXA).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

SMOKING = ("never", "former", "current")
SEXES = ("F", "M")
AGE_REF = 76.5  # centre of the 72-81 window the DESIGN.md BMD means refer to


@dataclass(frozen=True)
class CovariateModel:
    """Population parameters of the synthetic cohort. Defaults follow DESIGN.md "Clinical facts"."""

    age_range: tuple[float, float] = (60.0, 85.0)
    female_fraction: float = 0.5
    # BMD at age 76.5 by sex (F, M), g/cm^2 (DESIGN: women 0.64-0.70, men 0.75-0.80 at 72-81)
    bmd_mean: tuple[float, float] = (0.68, 0.78)
    # loss per year (F: 1 %/year of 0.68; M: 0.005 g/cm^2/year), g/cm^2/year
    age_slope: tuple[float, float] = (-0.0068, -0.005)
    # effects in g/cm^2 per within-sex SD of the covariate (chosen so r(BMI) ~ 0.4, r(height) ~ 0.15, ...)
    c_bmi: float = 0.052
    c_height: float = 0.0195
    c_activity: float = 0.013
    c_diet: float = 0.0065
    c_alcohol: float = 0.004
    c_former: float = -0.005
    c_current: float = -0.0455  # about 1/3 of the within-sex SD
    latent_sd: float = 0.105  # image-only bone-quality term
    silent_sd: float = 0.055  # term neither metadata nor the radiograph reveals
    dxa_cv: float = 0.0175  # DXA precision (1.5-2 %)
    # anthropometry by sex (F, M): older UK adults
    height_mean: tuple[float, float] = (160.0, 173.5)
    height_sd: tuple[float, float] = (6.5, 7.0)
    bmi_median: tuple[float, float] = (27.0, 27.2)
    log_bmi_sd: tuple[float, float] = (0.17, 0.13)
    smoking_probs: tuple[float, float, float] = (0.50, 0.38, 0.12)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _truncated_normal(
    rng: np.random.Generator, n: int, mean: float, sd: float, lo: float, hi: float
) -> np.ndarray:
    """Rejection sampling keeps the draw deterministic given the generator state."""
    x = rng.normal(mean, sd, n)
    bad = (x < lo) | (x > hi)
    while bad.any():
        x[bad] = rng.normal(mean, sd, int(bad.sum()))
        bad = (x < lo) | (x > hi)
    return x


def draw_covariates(n: int, seed: int, model: CovariateModel | None = None) -> pl.DataFrame:
    """Draw n complete subjects (no missing values) with metadata and the BMD components.

    Deterministic in (n, seed, model): generate_cohort(n, seed) uses exactly these rows.
    """
    m = model or CovariateModel()
    if n < 1:
        raise ValueError("n must be >= 1")
    lo, hi = m.age_range
    if not hi > lo:
        raise ValueError(f"age_range must be (low, high) with high > low, got {m.age_range}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0F]))

    male = rng.random(n) >= m.female_fraction
    sx = male.astype(np.int64)  # 0 = F, 1 = M
    age_xray = _truncated_normal(rng, n, (lo + hi) / 2, (hi - lo) / 5, lo, hi)
    gap = np.clip(rng.normal(0.5, 1.0, n), -2.0, 4.0)

    h_mu, h_sd = np.array(m.height_mean)[sx], np.array(m.height_sd)[sx]
    z_h = rng.standard_normal(n)
    height = h_mu + h_sd * z_h
    lb_mu, lb_sd = np.log(np.array(m.bmi_median))[sx], np.array(m.log_bmi_sd)[sx]
    z_b = rng.standard_normal(n)
    bmi_exact = np.exp(lb_mu + lb_sd * z_b)
    weight = bmi_exact * (height / 100.0) ** 2

    smoke = rng.choice(3, size=n, p=np.array(m.smoking_probs) / sum(m.smoking_probs))
    # alcohol (UK units/week): abstainers, else log-normal; men drink more
    abst = rng.random(n) < np.where(male, 0.20, 0.35)
    alc_med = np.where(male, 10.0, 5.0)
    alcohol = np.where(abst, 0.0, np.minimum(alc_med * np.exp(0.8 * rng.standard_normal(n)), 120.0))
    la = np.log1p(alcohol)
    z_alc = (la - 1.57) / 1.15  # population mean/SD of log1p(alcohol) under this draw (female_fraction .5)
    z_act = rng.standard_normal(n)
    z_diet = rng.standard_normal(n)
    activity = np.clip(50.0 + 15.0 * z_act, 0, 100)
    diet = np.clip(50.0 + 15.0 * z_diet, 0, 100)

    e_l, e_s, e_d = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n)

    # Round the metadata as a clinic would record it; the model uses the recorded values.
    age_xray_r = np.round(age_xray, 1)
    age_dxa_r = np.round(age_xray + gap, 1)
    height_r = np.round(height, 1)
    weight_r = np.round(weight, 1)
    bmi_r = np.round(weight_r / (height_r / 100.0) ** 2, 1)
    gap_r = age_dxa_r - age_xray_r

    slope = np.array(m.age_slope)[sx]
    meta = (
        np.array(m.bmd_mean)[sx]
        + slope * (age_dxa_r - AGE_REF)
        + m.c_bmi * z_b
        + m.c_height * z_h
        + m.c_activity * z_act
        + m.c_diet * z_diet
        + m.c_alcohol * z_alc
        + m.c_former * (smoke == 1)
        + m.c_current * (smoke == 2)
    )
    latent = m.latent_sd * e_l
    silent = m.silent_sd * e_s
    bmd_true = meta + latent + silent
    bmd_image = bmd_true - silent - slope * gap_r
    bmd_dxa = bmd_true * (1.0 + m.dxa_cv * e_d)

    width = max(5, len(str(n)))
    return pl.DataFrame(
        {
            "subject_id": [f"SYN{i + 1:0{width}d}" for i in range(n)],
            "sex": np.array(SEXES)[sx],
            "age_xray": age_xray_r,
            "age_dxa": age_dxa_r,
            "height_cm": height_r,
            "weight_kg": weight_r,
            "bmi": bmi_r,
            "smoking": np.array(SMOKING)[smoke],
            "alcohol_units_week": np.round(alcohol, 1),
            "activity_score": np.round(activity, 0),
            "diet_score": np.round(diet, 0),
            "bmd_true": bmd_true,
            "bmd_dxa": bmd_dxa,
            "bmd_image": bmd_image,
            "bmd_meta": meta,
            "latent_quality": latent,
            "silent_term": silent,
            "dxa_error": bmd_dxa - bmd_true,
            "age_slope": slope,
        }
    )


META_COLUMNS: tuple[str, ...] = (
    "subject_id",
    "sex",
    "age_xray",
    "age_dxa",
    "height_cm",
    "weight_kg",
    "bmi",
    "smoking",
    "alcohol_units_week",
    "activity_score",
    "diet_score",
)


def apply_missing(df: pl.DataFrame, rate: float, seed: int) -> pl.DataFrame:
    """Blank each metadata cell (never subject_id) independently with probability `rate` (MCAR)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"missing rate must be in [0, 1), got {rate}")
    out = df.select(META_COLUMNS)
    if rate == 0.0:
        return out
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D155]))
    cols = []
    for name in META_COLUMNS[1:]:
        drop = pl.Series(rng.random(out.height) < rate)
        cols.append(pl.when(drop).then(None).otherwise(pl.col(name)).alias(name))
    return out.with_columns(cols)


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1.0 - np.mean((y - pred) ** 2) / np.var(y))


def oracle_r2(df: pl.DataFrame, model: CovariateModel | None = None) -> dict[str, float]:
    """Oracle R² of bmd_dxa from the known variance components on this drawn cohort (module docstring).

    R²_X = 1 - E[Var(bmd_dxa | X)] / Var(bmd_dxa), with Var(bmd_dxa) the drawn cohort's variance and the
    conditional variances known from the model: metadata leaves latent² + silent² + DXA noise; the image
    leaves silent² + Var(loss over the X-ray-to-DXA gap) + DXA noise; both leave silent² + DXA noise.
    So the values move with latent_sd / silent_sd / dxa_cv and both >= each single one by construction.
    """
    m = model or CovariateModel()
    y = df["bmd_dxa"].to_numpy()
    var_y = float(np.var(y))
    noise = float(np.mean((m.dxa_cv * df["bmd_true"].to_numpy()) ** 2))
    loss = df["age_slope"].to_numpy() * (df["age_dxa"].to_numpy() - df["age_xray"].to_numpy())
    lat2, sil2 = m.latent_sd**2, m.silent_sd**2
    return {
        "metadata": 1.0 - (lat2 + sil2 + noise) / var_y,
        "image": 1.0 - (sil2 + float(np.var(loss)) + noise) / var_y,
        "both": 1.0 - (sil2 + noise) / var_y,
        "true_bmd": 1.0 - noise / var_y,  # DXA precision ceiling
    }


def oracle_r2_empirical(df: pl.DataFrame) -> dict[str, float]:
    """The same oracles scored as 1 - MSE / Var on the drawn cohort (sampling noise included)."""
    y = df["bmd_dxa"].to_numpy()
    img = df["bmd_image"].to_numpy()
    loss = df["age_slope"].to_numpy() * (df["age_dxa"].to_numpy() - df["age_xray"].to_numpy())
    return {
        "metadata": _r2(y, df["bmd_meta"].to_numpy()),
        "image": _r2(y, img + loss.mean()),
        "both": _r2(y, img + loss),
        "true_bmd": _r2(y, df["bmd_true"].to_numpy()),
    }


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def realised_stats(df: pl.DataFrame, reference: str = "nhanes3-hologic") -> dict[str, Any]:
    """Correlations (within sex averaged over sexes; pooled), smoking shift, sex means, WHO prevalence."""
    from xbmd_batch.clinical import get_reference, who_class

    y = df["bmd_dxa"].to_numpy()
    sex = df["sex"].to_numpy()
    smoke = df["smoking"].to_numpy()
    fields = {"weight_kg": "weight", "bmi": "bmi", "height_cm": "height", "age_xray": "age"}
    within: dict[str, float] = {}
    pooled: dict[str, float] = {}
    for col, name in fields.items():
        x = df[col].to_numpy()
        rs = [_corr(x[sex == s], y[sex == s]) for s in SEXES if (sex == s).sum() > 2]
        within[name] = float(np.mean(rs)) if rs else math.nan
        pooled[name] = _corr(x, y)
    shifts = []
    for s in SEXES:
        k = sex == s
        sd = y[k].std()
        cur, nev = y[k & (smoke == "current")], y[k & (smoke == "never")]
        if len(cur) > 1 and len(nev) > 1:
            shifts.append((cur.mean() - nev.mean()) / sd)
    ref = get_reference(reference)
    cls = who_class(ref.t_score(y))
    prev = {}
    for s in SEXES:
        k = sex == s
        prev[s] = {
            c: float(np.mean(cls[k] == c)) if k.any() else math.nan for c in ("osteopenia", "osteoporosis")
        }
    return {
        "n": int(df.height),
        "corr_within_sex_mean": within,
        "corr_pooled": pooled,
        "current_vs_never_smoker_shift_sd": float(np.mean(shifts)) if shifts else math.nan,
        "bmd_dxa_mean_by_sex": {
            s: float(y[sex == s].mean()) if (sex == s).any() else math.nan for s in SEXES
        },
        "bmd_dxa_sd_by_sex": {
            s: float(y[sex == s].std()) if (sex == s).sum() > 1 else math.nan for s in SEXES
        },
        "who_prevalence_by_sex": prev,
        "t_score_reference": reference,
    }
