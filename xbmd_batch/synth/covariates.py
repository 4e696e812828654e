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

Generator version 2 (the default; `GeneratorV2`) draws the same subjects as v1 for the same seed (same
covariates and e_L, e_S, e_D) with latent_sd 0.1168 and silent_sd 0.02 (`V2_VARIANCE`: the same total
variance, more of it visible), and adds, from a second random stream (so v1 draws are untouched)::

    site terms   log(B_site / 0.75) = c_site log(bmd_image / 0.75) + sqrt(1 - c_site^2) sd_site e_site
                 for the pelvis (c = pelvis_share) and the femoral shaft (c = shaft_share); e_site ~ N(0, 1)
    body fat     BF = 1.2 BMI + 0.23 age_xray - 10.8 [male] - 5.4        (%, Deurenberg et al. 1991)
    contrast     m = exp(-fat_coef (BF - bf_ref))     bone-to-soft-tissue contrast per unit BMD (renderer)
    radiographic rho = m * bmd_image                  what the neck's image density encodes

The renderer multiplies every bone's attenuation by m, so the same BMD looks fainter under a fattier
soft-tissue path (beam hardening, scatter, a lower-attenuating baseline); the image shows thickness, not
composition, while BMI, age and sex give m exactly. Oracles (v2): metadata -> bmd_meta; both -> rho / m +
b_s gap (as v1); image -> E[bmd_dxa | rho], a cubic in log rho fitted on a fixed 100,000-subject reference
draw of the same model.
"""

from __future__ import annotations

import functools
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

    @classmethod
    def for_version(cls, version: int = 2, **changes: Any) -> CovariateModel:
        """The defaults of a generator version (v2 moves variance from the silent to the latent term)."""
        base: dict[str, Any] = dict(V2_VARIANCE) if version == 2 else {}
        base.update(changes)
        return cls(**base)


# Generator v2: the radiograph shows more of the bone (latent 0.105 -> 0.1168, silent 0.055 -> 0.02; the total
# variance, hence every DESIGN.md correlation and SD, stays), because v2's nuisance (vendor processing, site
# terms, the bone-contrast factor) takes more of what a realistic reader can get from the image.
V2_VARIANCE = {"latent_sd": 0.1168, "silent_sd": 0.02}


@dataclass(frozen=True)
class GeneratorV2:
    """What generator version 2 adds (docs/synth.md "Generator version 2"). SYNTHETIC choices throughout."""

    pelvis_share: float = 0.55  # correlation of log pelvic density with log femoral-neck density
    shaft_share: float = 0.7  # the same for the femoral shaft (cortex)
    site_log_sd: float = 0.19  # SD of log site density (about that of log bmd_image)
    fat_coef: float = 0.013  # m = exp(-fat_coef (BF - bf_ref)), per body-fat percentage point
    bf_ref: float = 38.0
    # magnification from the AP depth (object-detector distance): mag_ref + mag_per_mm (D - 170) + jitter
    mag_ref: float = 1.15
    mag_per_mm: float = 0.0025
    # vendor processing ranges, one draw per scanner (render.make_processing)
    drc_strength: tuple[float, float] = (0.25, 0.5)  # fraction of the low-pass signal removed
    drc_sigma_mm: tuple[float, float] = (40.0, 80.0)
    usm_gain: tuple[float, float] = (0.3, 1.2)  # unsharp-mask boost of the high-pass signal
    usm_sigma_mm: tuple[float, float] = (1.5, 4.0)

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


def draw_covariates(
    n: int,
    seed: int,
    model: CovariateModel | None = None,
    version: int = 2,
    v2: GeneratorV2 | None = None,
) -> pl.DataFrame:
    """Draw n complete subjects (no missing values) with metadata and the BMD components.

    Deterministic in (n, seed, model, version, v2): generate_cohort(n, seed) uses exactly these rows.
    Version 2 draws the same subjects as version 1 with its own variance split, plus the v2 columns.
    """
    if version not in (1, 2):
        raise ValueError(f"generator version must be 1 or 2, got {version}")
    m = model or CovariateModel.for_version(version)
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
    cols: dict[str, Any] = {}
    if version == 2:
        g = v2 or GeneratorV2()
        rng2 = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0F, 2]))
        e_p, e_f = rng2.standard_normal(n), rng2.standard_normal(n)
        lr = np.log(np.maximum(bmd_image, 0.05) / 0.75)
        pel = 0.75 * np.exp(g.pelvis_share * lr + math.sqrt(1 - g.pelvis_share**2) * g.site_log_sd * e_p)
        sha = 0.75 * np.exp(g.shaft_share * lr + math.sqrt(1 - g.shaft_share**2) * g.site_log_sd * e_f)
        bf = body_fat_pct(bmi_r, age_xray_r, male)
        contrast = np.exp(-g.fat_coef * (bf - g.bf_ref))
        cols = {
            "bmd_pelvis": pel,
            "bmd_shaft": sha,
            "body_fat_pct": bf,
            "bone_contrast": contrast,
            "bmd_radiographic": contrast * bmd_image,
        }
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
            **cols,
        }
    )


def body_fat_pct(bmi: np.ndarray, age: np.ndarray, male: np.ndarray) -> np.ndarray:
    """Adult body fat % from BMI, age and sex (Deurenberg, Weststrate & Seidell 1991, Br J Nutr 65:105)."""
    return 1.2 * bmi + 0.23 * age - 10.8 * male.astype(np.float64) - 5.4


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


_REF_N = 100_000
_REF_SEED = 0x0AC1E


@functools.lru_cache(maxsize=8)
def _image_oracle_fit(model: CovariateModel, v2: GeneratorV2) -> tuple[np.ndarray, float, float, float]:
    """E[bmd_dxa | rho], a cubic in standardised log rho fitted on a fixed reference draw (v2 image oracle).

    Returns (polynomial coefficients, centre, scale, residual variance on the reference draw).
    """
    ref = draw_covariates(_REF_N, _REF_SEED, model, version=2, v2=v2)
    x = np.log(ref["bmd_radiographic"].to_numpy())
    c, s = float(x.mean()), float(x.std())
    y = ref["bmd_dxa"].to_numpy()
    coef = np.polyfit((x - c) / s, y, 3)
    res = y - np.polyval(coef, (x - c) / s)
    return coef, c, s, float(np.mean(res**2))


def image_oracle_prediction(df: pl.DataFrame, model: CovariateModel, v2: GeneratorV2) -> np.ndarray:
    """v2 image-only oracle prediction E[bmd_dxa | rho] for each row (needs the bmd_radiographic column)."""
    coef, c, s, _ = _image_oracle_fit(model, v2)
    return np.polyval(coef, (np.log(df["bmd_radiographic"].to_numpy()) - c) / s)


def oracle_r2(
    df: pl.DataFrame,
    model: CovariateModel | None = None,
    version: int = 2,
    v2: GeneratorV2 | None = None,
) -> dict[str, float]:
    """Oracle R² of bmd_dxa from the known variance components on this drawn cohort (module docstring).

    R²_X = 1 - E[Var(bmd_dxa | X)] / Var(bmd_dxa), with Var(bmd_dxa) the drawn cohort's variance and the
    conditional variances known from the model: metadata leaves latent² + silent² + DXA noise; the image
    leaves silent² + Var(loss over the X-ray-to-DXA gap) + DXA noise; both leave silent² + DXA noise.
    So the values move with latent_sd / silent_sd / dxa_cv and both >= each single one by construction.
    """
    m = model or CovariateModel.for_version(version)
    y = df["bmd_dxa"].to_numpy()
    var_y = float(np.var(y))
    noise = float(np.mean((m.dxa_cv * df["bmd_true"].to_numpy()) ** 2))
    loss = df["age_slope"].to_numpy() * (df["age_dxa"].to_numpy() - df["age_xray"].to_numpy())
    lat2, sil2 = m.latent_sd**2, m.silent_sd**2
    if version == 2 and "bmd_radiographic" in df.columns:
        image = 1.0 - _image_oracle_fit(m, v2 or GeneratorV2())[3] / var_y
    else:
        image = 1.0 - (sil2 + float(np.var(loss)) + noise) / var_y
    return {
        "metadata": 1.0 - (lat2 + sil2 + noise) / var_y,
        "image": image,
        "both": 1.0 - (sil2 + noise) / var_y,
        "true_bmd": 1.0 - noise / var_y,  # DXA precision ceiling
    }


def oracle_r2_empirical(
    df: pl.DataFrame,
    model: CovariateModel | None = None,
    version: int = 2,
    v2: GeneratorV2 | None = None,
) -> dict[str, float]:
    """The same oracles scored as 1 - MSE / Var on the drawn cohort (sampling noise included)."""
    y = df["bmd_dxa"].to_numpy()
    img = df["bmd_image"].to_numpy()
    loss = df["age_slope"].to_numpy() * (df["age_dxa"].to_numpy() - df["age_xray"].to_numpy())
    if version == 2 and "bmd_radiographic" in df.columns:
        m = model or CovariateModel.for_version(version)
        image_pred = image_oracle_prediction(df, m, v2 or GeneratorV2())
    else:
        image_pred = img + loss.mean()
    return {
        "metadata": _r2(y, df["bmd_meta"].to_numpy()),
        "image": _r2(y, image_pred),
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
