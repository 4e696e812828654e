"""Forward model of a SYNTHETIC AP hip radiograph (numpy, vectorised).

Why a physical forward model: per-image intensity normalisation downstream is affine, so BMD must be
recoverable from affine-invariant structure (bone-minus-soft-tissue contrast relative to soft-tissue-minus-
air contrast, cortical thickness relative to bone width, trabecular texture), and the confounders a clinician
knows about (soft tissue from BMI, exposure, positioning, scanner) must act on exactly those features.

Geometry (canonical frame at the patient, mm; u to the image right = medial for a right hip, v down; the
femoral-head centre is the origin). Head radius R = (24 mm men / 21 mm women) * (height / sex mean) * N(1,
0.04); sa = R / 22.5 scales the pelvis and soft tissue. Femur: shaft axis descending medially at alpha ~ N(7°,
1°) (5-9°) from vertical, outer radius 0.66 R; neck-shaft angle NSA ~ N(130°, 2.8°) (123-137°); the neck
points anteriorly by psi = anteversion N(12°, 7°) - internal rotation of the limb N(10°, 8°), so the projected
neck is foreshortened to L_p = 2.45 R sqrt(cos² NSA + sin² NSA cos² psi) (head centre -> J, the neck-axis /
shaft-axis intersection) and its projected angle opens (valgus look in external rotation). Neck half-width at
its narrowest U(0.65, 0.75) R (= neck width / head diameter), flaring towards the base, more on the calcar
side. Greater trochanter: ellipse lateral to the neck base, tip at the head-centre level (-0.05..+0.3 R
below); lesser trochanter: ellipse on the medial shaft 2.05 R below the head centre that juts out more with
external rotation; intertrochanteric mass: ellipse. Outlines are 2D signed distances joined by smooth minima
(small blend at the trochanteric fossa, wide blend for the calcar curve into the medial shaft); the projected
path through a solid of outline distance s and local half-depth rd is 2 sqrt(q (2 rd - q)), q = min(-s, rd),
and its inner (cancellous / marrow) path is the same with s + c, rd - c for the local cortical thickness c;
the head is a sphere (2 sqrt(R² - rho²)). Cortical path = outer - inner, trabecular path = inner.

Pelvis (folded about the midline u_m = 100 sa, so the symphysis and the near contralateral pubis appear):
ilium bounded by a lateral border leaving the acetabular rim upwards and laterally (centre-edge angle
N(32°, 5°)), the pelvic inlet (ellipse, its lateral edge at Koehler's line) and the sacro-iliac joint, thick
over the acetabulum (supra-acetabular bone) and thin in the wing; acetabular cavity radius R + joint space
U(3.5, 5) sa, the head covered there only by the anterior / posterior walls (rims drawn as lines); ischium,
superior / inferior pubic rami and pubic body around an oval obturator foramen; a sacrum medial to the SI
joint. Dense lines where cortex runs tangential: the sourcil (acetabular roof), the iliopectineal and
ilioischial lines, the teardrop.

Bone from the image-visible BMD B (`bmd_image`, incl. the latent bone-quality term), r = B / 0.75::

    cortical thickness  c_neck = 1.9 mm * sa * r^1.1 (calcar side x1.5, superior x0.5),
                        c_shaft = 0.34 R_shaft r^0.8, elsewhere 0.9 mm r^0.9
    trabecular fraction f = f_region * r^1.6 * (1 + k_tex(r) * T(u, v)),  k_tex = 0.45 r^-0.7
        f_region = 0.24 (head x1.35, Ward's triangle x0.65, compressive group x1.3, medullary canal x0.2)
    T = unit-variance oriented band-pass noise (compressive + tensile trabecular groups), sampled in the
        canonical frame so it rotates and scales with the pose
    pelvis (weaker): cortex 1.3 mm sa r^0.6, path scaled by r^0.5, trabecular fraction 0.30 r^0.8

Soft tissue (BMI): body cross-section a superellipse (exponent 4) about the midline u_c = 95 sa; lateral
extent at the trochanters W_lat = sa (105 + 3.5 (BMI - 25)) + N(0, 6) mm beyond the head centre (at least
15 sa beyond the greater trochanter), narrowing towards the waist and slightly down the thigh (curved skin
edge); AP depth D = 170 + 6 (BMI - 27) + N(0, 10) mm, 12 % less in the thigh; subcutaneous fat
6 + 2 (BMI - 22) mm attenuating 12 % less than muscle. The head is placed so that a strip of air
(5-12 % of the width, more when the head centre would fall medial of 47 % of the width; >= 3 %,
W_lat trimmed if needed) remains lateral to the skin.

Image formation (kVp-dependent effective attenuation, mu_s = 0.021 (75/kVp)^0.3 /mm,
dmu = mu_bone - mu_s = 0.040 (75/kVp)^0.8 /mm)::

    A   = mu_s (T_s - 0.12 T_fat) + dmu (cortical + f * trabecular + pelvis)   line integral
    P   = exp(-A)                                                      primary (unattenuated = 1)
    S   = SPR(T_s) * G_30mm * P,  SPR = grid * T_s / 200 mm  scatter haze (contrast falls with BMI)
    E   = G_mtf * (P + S)                                              detector blur (scanner MTF)
    E_n = E + sqrt(E / (Phi * a_px)) * z                               quantum noise; Phi set by mAs (AEC)
    l   = ln(E_n * mAs / 20)                                           log detector signal
    d   = ((ln(mAs / 20) + N(0, .05) - l) / 8 + 0.02)^gamma             display value, bone bright
                                                                       (exposure recognition puts air near 0)
    stored = round(offset + gain * d + sigma_w * z_full)                 bits stored 12-16 (scanner)

The anatomy, scatter, blur and quantum noise are computed on a working grid of about 640 rows (an integer
factor k below the output); the result is upsampled bilinearly (which acts as part of the MTF) and a white
full-resolution noise term is added before quantisation. Each bone is evaluated only inside its bounding
box on the working grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from xbmd_batch.synth.scanners import Processing, Scanner, V2Subject
from xbmd_batch.synth.sdf import chord, circle3, ellipse_sdf, line, seg_sdf, smin

WORK_ROWS = 640  # working-grid rows; anatomy, scatter, blur and quantum noise live here
_GAUSS_TABLE = np.random.default_rng(20240611).standard_normal(65536).astype(np.float32)


def _lowpass(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Wide Gaussian low-pass on a 4x-coarser grid (pooled, blurred, bilinearly upsampled)."""
    b = 4 if min(a.shape) >= 64 else 1
    r, c = a.shape[0] // b, a.shape[1] // b
    coarse = a[: r * b, : c * b].reshape(r, b, c, b).mean(axis=(1, 3))
    low = upsample_bilinear(_gauss_blur_fft(coarse, sigma_px / b), b)
    return np.pad(low, ((0, a.shape[0] - low.shape[0]), (0, a.shape[1] - low.shape[1])), mode="edge")


def apply_processing(d: np.ndarray, proc: Processing, wpx: float) -> np.ndarray:
    """Vendor-style dynamic-range compression and unsharp masking (see `Processing`)."""
    d1 = d - np.float32(proc.drc_strength) * _lowpass(d, proc.drc_sigma_mm / wpx)
    d2 = d1 + np.float32(proc.usm_gain) * (d1 - _gauss_blur_fft(d1, proc.usm_sigma_mm / wpx))
    lo, hi, lo2, hi2 = float(d.min()), float(d.max()), float(d2.min()), float(d2.max())
    return (lo + (d2 - lo2) * ((hi - lo) / max(hi2 - lo2, 1e-9))).astype(np.float32)


@dataclass
class Rendered:
    """One rendered image: the stored MONOCHROME2 values and the float display image they quantise."""

    stored: np.ndarray  # uint16 (rows, cols), MONOCHROME2, bone bright
    display: np.ndarray  # float32 (rows, cols), stored before rounding/clipping (the intended image)
    max_value: int
    thumb: np.ndarray  # float32 small display image for previews
    info: dict[str, float] = field(default_factory=dict)


def _gauss_blur_fft(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur by FFT (reflect-free, edge-padded) — cheap on the working grid, no scipy needed."""
    if sigma_px < 0.3:
        return a
    pad = int(math.ceil(3 * sigma_px))
    ap = np.pad(a, pad, mode="edge")
    fy = np.fft.fftfreq(ap.shape[0]).astype(np.float32)
    fx = np.fft.rfftfreq(ap.shape[1]).astype(np.float32)
    g = np.exp(-2 * (math.pi * sigma_px) ** 2 * (fy[:, None] ** 2 + fx[None, :] ** 2))
    out = np.fft.irfft2(np.fft.rfft2(ap) * g, s=ap.shape)
    # a sampled frequency-domain Gaussian rings slightly when sigma is large for the grid; a blur stays
    # within the input's range, so clip (keeps exposure positive)
    return np.clip(out[pad:-pad, pad:-pad], a.min(), a.max()).astype(np.float32)


def upsample_bilinear(a: np.ndarray, k: int) -> np.ndarray:
    """Integer-factor bilinear upsampling (pixel-centre aligned) with contiguous slices, no gathers."""
    if k == 1:
        return a.astype(np.float32, copy=False)
    wr, wc = a.shape
    ap = np.pad(a.astype(np.float32, copy=False), 1, mode="edge")
    tmp = np.empty((wr * k, wc + 2), np.float32)
    tv = tmp.reshape(wr, k, wc + 2)
    phases = []
    for p in range(k):
        x = (p + 0.5) / k - 0.5
        o = math.floor(x)
        phases.append((o, np.float32(x - o)))
    for p, (o, f) in enumerate(phases):
        tv[:, p, :] = ap[1 + o : 1 + o + wr] * (1 - f) + ap[2 + o : 2 + o + wr] * f
    out = np.empty((wr * k, wc * k), np.float32)
    ov = out.reshape(wr * k, wc, k)
    for p, (o, f) in enumerate(phases):
        ov[:, :, p] = tmp[:, 1 + o : 1 + o + wc] * (1 - f) + tmp[:, 2 + o : 2 + o + wc] * f
    return out


def _texture_tile(rng: np.random.Generator, neck_dir: float, n: int = 256) -> np.ndarray:
    """Unit-variance oriented band-pass noise: compressive (near vertical) + tensile (along neck) groups."""
    w = rng.standard_normal((n, n)).astype(np.float32)
    f = np.fft.rfft2(w)
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    px = 0.45  # mm per tile pixel
    resp = np.zeros(f.shape, np.float64)
    for ang, weight in ((math.radians(80.0), 1.0), (neck_dir, 0.6)):
        # elongated along `ang`: narrow in frequency along the trabecula, wide across it
        ca, sa = math.cos(ang), math.sin(ang)
        f_al = (fx * ca + fy * sa) / px  # cycles/mm along the trabecular direction
        f_ac = (-fx * sa + fy * ca) / px
        band = np.exp(-((f_al / 0.06) ** 2)) * np.exp(-(((np.abs(f_ac) - 0.45) / 0.22) ** 2))
        resp += weight * band
    t = np.fft.irfft2(f * resp, s=(n, n)).astype(np.float32)
    t -= t.mean()
    t /= t.std() + 1e-12
    return t


def render_subject(
    *,
    bmd_image: float,
    male: bool,
    height_cm: float,
    bmi: float,
    scanner: Scanner,
    rows: int,
    cols: int,
    rng: np.random.Generator,
    thumb_rows: int = 192,
    v2: V2Subject | None = None,
) -> Rendered:
    """Render one AP right-hip radiograph; every random choice comes from `rng` (one stream per subject).

    v2=None renders generator version 1 exactly; with v2 the pelvis and shaft follow their own densities,
    every bone's attenuation is scaled by the bone-contrast factor, the magnification follows the AP depth
    and the scanner's vendor processing is applied (docs/synth.md "Generator version 2").
    """
    k = max(1, math.ceil(rows / WORK_ROWS))
    wr, wc = math.ceil(rows / k), math.ceil(cols / k)
    spacing = scanner.fov_mm / rows  # detector mm per output pixel
    wpx = spacing * k  # detector mm per working pixel

    # ---- pose and anatomy (canonical mm at the patient; u medial, v down, femoral-head centre = origin) ----
    a = (24.0 if male else 21.0) * (height_cm / (173.5 if male else 160.0)) * rng.normal(1.0, 0.04)
    r_h = a
    sa = a / 22.5  # pelvis / soft-tissue scale
    nsa = math.radians(float(np.clip(rng.normal(130.0, 2.8), 123.0, 137.0)))
    alpha = math.radians(float(np.clip(rng.normal(7.0, 1.0), 5.0, 9.0)))  # anatomical axis from vertical
    antev = math.radians(float(np.clip(rng.normal(12.0, 7.0), -5.0, 30.0)))
    rot_int = math.radians(rng.normal(10.0, 8.0))  # internal rotation of the limb at exposure
    psi = float(np.clip(antev - rot_int, math.radians(-15.0), math.radians(40.0)))  # neck out of plane
    up, med = -math.cos(nsa), math.sin(nsa) * math.cos(psi)
    nsa_p = math.pi / 2 + math.atan2(up, med)  # projected neck-shaft angle (rotation makes it look valgus)
    l_n = 2.45 * r_h  # head centre -> neck axis / shaft axis intersection J
    l_p = l_n * math.hypot(up, med)  # projected (foreshortened) length
    w_n = r_h * rng.uniform(0.65, 0.75)  # neck half-width at its narrowest: width / head diameter
    r_s = 0.66 * r_h  # shaft outer radius
    d_u, d_v = math.sin(alpha), math.cos(alpha)  # shaft axis, distal: descends medially
    p_u, p_v = math.cos(alpha), -math.sin(alpha)  # perpendicular to the shaft, medial
    cn, sn = math.cos(nsa_p), math.sin(nsa_p)
    n_u, n_v = cn * d_u + sn * d_v, -sn * d_u + cn * d_v  # neck axis, J -> head
    m_u, m_v = -n_v, n_u  # perpendicular to the neck, inferior
    jx, jy = -l_p * n_u, -l_p * n_v
    head_al = -(jx * d_u + jy * d_v)  # head centre on the shaft-axis coordinate (< 0: above J)
    gt_top = head_al + rng.uniform(-0.05, 0.3) * r_h  # greater trochanter tip near the head-centre level
    gt_lat, gt_al = -(r_s + 0.33 * r_h) + 0.47 * r_h, gt_top + 0.8 * r_h
    lt_vis = float(np.clip(0.6 + psi / 0.6, 0.2, 1.2))  # external rotation shows the lesser trochanter
    lt_lat, lt_al = r_s + (0.34 * lt_vis - 0.12) * r_h, head_al + 2.05 * r_h
    # pelvis (right hemipelvis and the pubic symphysis; folded about the midline u_m)
    js = rng.uniform(3.5, 5.0) * sa  # joint space
    r_a = r_h + js  # acetabular (subchondral) surface
    ce = math.radians(float(np.clip(rng.normal(32.0, 5.0), 20.0, 42.0)))  # centre-edge angle
    pl_u, pl_v = -(r_a + 1.5) * math.sin(ce), -(r_a + 1.5) * math.cos(ce)  # lateral acetabular rim
    u_m = 100.0 * sa * rng.normal(1.0, 0.03)  # midline (symphysis)
    v_in, b_in = -32.0 * sa, 46.0 * sa  # pelvic inlet: centre height and vertical semi-axis
    a_in = u_m - r_a - 12.0 * sa  # inlet lateral edge just medial to the teardrop (Koehler's line)
    v_sym = v_in + b_in  # top of the symphysis
    bb = math.radians(rng.uniform(22.0, 34.0))  # lateral iliac border leaves the rim up and laterally
    rho_b = 260.0 * sa
    cb_u, cb_v = pl_u + rho_b * math.cos(bb), pl_v - rho_b * math.sin(bb)

    # soft tissue (BMI): lateral extent at the trochanter level, AP depth, subcutaneous fat
    gt_edge = -(jx + gt_al * d_u - (r_s + 0.33 * r_h) * p_u)
    w_lat = max(gt_edge + 15.0 * sa, sa * (105.0 + 3.5 * (bmi - 25.0)) + rng.normal(0.0, 6.0))
    depth = float(np.clip(170.0 + 6.0 * (bmi - 27.0) + rng.normal(0.0, 10.0), 110.0, 330.0))
    t_fat = float(np.clip(6.0 + 2.0 * (bmi - 22.0), 4.0, 45.0)) * sa

    mag = rng.uniform(1.08, 1.22)
    if v2 is not None:  # hip farther from the detector in a deeper body; the v1 draw becomes the jitter
        mag = float(np.clip(v2.mag_ref + v2.mag_per_mm * (depth - 170.0) + 0.5 * (mag - 1.15), 1.05, 1.4))
    theta = math.radians(rng.normal(0.0, 5.0))
    ct, st = math.cos(theta), math.sin(theta)
    width_mm, height_mm = wc * wpx, wr * wpx
    hy = height_mm * rng.normal(0.40, 0.025)
    # a strip of air lateral to the skin (exposure recognition and the per-image normalisation need it)
    tilt = abs(st) * 0.6 * height_mm
    hx = float(
        np.clip(rng.uniform(0.05, 0.12) * width_mm + mag * w_lat + tilt, 0.47 * width_mm, 0.64 * width_mm)
    )
    w_lat = min(w_lat, (hx - 0.03 * width_mm - tilt) / mag)

    yy = ((np.arange(wr, dtype=np.float32) + 0.5) * wpx - hy)[:, None]
    xx = ((np.arange(wc, dtype=np.float32) + 0.5) * wpx - hx)[None, :]
    u = (ct * xx + st * yy) / mag  # (wr, wc)
    v = (-st * xx + ct * yy) / mag
    v_lo, v_hi = float(v.min()), float(v.max())

    def box(umin: float, umax: float, vmin: float, vmax: float) -> tuple[slice, slice] | None:
        """Working-grid slices covering a canonical box (None when it misses the image)."""
        cu = np.array([umin, umax, umin, umax])
        cv = np.array([vmin, vmin, vmax, vmax])
        j = (mag * (ct * cu - st * cv) + hx) / wpx - 0.5
        i = (mag * (st * cu + ct * cv) + hy) / wpx - 0.5
        i0, i1 = max(0, math.floor(i.min()) - 1), min(wr, math.ceil(i.max()) + 2)
        j0, j1 = max(0, math.floor(j.min()) - 1), min(wc, math.ceil(j.max()) + 2)
        return (slice(i0, i1), slice(j0, j1)) if i0 < i1 and j0 < j1 else None

    r = bmd_image / 0.75
    c_neck = 1.9 * (a / 22.5) * r**1.1
    r_pel = r if v2 is None else v2.bmd_pelvis / 0.75  # pelvic density (v2: only partly shared with the neck)
    r_sha = r if v2 is None else v2.bmd_shaft / 0.75
    c_shaft = 0.34 * r_s * r_sha**0.8
    c_thin = 0.9 * r**0.9
    f0 = 0.24 * r**1.6
    k_tex = 0.45 * r**-0.7
    # principal compressive trabecular group: calcar (inferior neck near its base) -> superior head dome
    c1u, c1v = -(l_p - 0.7 * r_h) * n_u + 0.75 * w_n * m_u, -(l_p - 0.7 * r_h) * n_v + 0.75 * w_n * m_v
    cg_u, cg_v = 0.15 * r_h, -0.85 * r_h
    cg_l = math.hypot(cg_u - c1u, cg_v - c1v)
    cg_nu, cg_nv = -(cg_v - c1v) / cg_l, (cg_u - c1u) / cg_l
    tile = _texture_tile(rng, math.atan2(-n_v, -n_u))
    n_t = tile.shape[0]
    bone = np.zeros((wr, wc), np.float32)

    # proximal femur: sphere head + smooth union (signed distances) of neck, intertrochanteric mass, greater
    # and lesser trochanter and shaft, each a solid of local half-depth rd with a cortex of thickness c
    fb = box(jx - 2.1 * r_h, max(1.1 * r_h, jx + (v_hi - jy) * d_u + r_s + 0.8 * r_h), -1.5 * r_h, v_hi + 1)
    if fb is not None:
        uu, vv = u[fb], v[fb]
        s = -(uu * n_u + vv * n_v)  # distance from the head centre along the neck towards J
        w = uu * m_u + vv * m_v  # across the neck, + inferior
        s_w = max(0.9 * r_h, 1.3 * r_h * l_p / l_n)  # narrowest neck
        g = np.minimum(np.clip((s - s_w) / (l_p - s_w), 0.0, None) ** 2, 1.6)  # flare towards the base
        neck = np.where(w > 0, w - (w_n + 0.55 * r_h * g), -w - (w_n + 0.22 * r_h * g))
        neck = np.maximum(neck, np.maximum(0.3 * r_h - s, s - (l_p + 0.2 * r_h)))
        du, dv = uu - jx, vv - jy
        along = du * d_u + dv * d_v  # along the shaft axis from J, + distal
        lat = du * p_u + dv * p_v  # across the shaft, + medial
        shaft = np.maximum(np.abs(lat) - r_s, -0.2 * r_h - along)
        it = ellipse_sdf(lat, along, -0.15 * r_h, -0.2 * r_h, 0.8 * r_h, 0.8 * r_h)
        gt = ellipse_sdf(lat, along, gt_lat, gt_al, 0.47 * r_h, 0.8 * r_h, -0.14)
        sdf = smin(smin(neck, it, 0.4 * r_h), gt, 0.18 * r_h)  # small blend: trochanteric fossa notch
        sdf = smin(sdf, shaft, 0.7 * r_h)  # calcar (inferior neck -> medial shaft), lateral trochanter flare
        sdf = smin(sdf, ellipse_sdf(lat, along, lt_lat, lt_al, 0.32 * r_h, 0.48 * r_h, 0.35), 0.25 * r_h)
        t1 = np.clip((s - (l_p - 0.8 * r_h)) / (0.6 * r_h), 0.0, 1.0)  # neck -> trochanteric region
        t2 = np.clip((along - (lt_al - 0.2 * r_h)) / (0.9 * r_h), 0.0, 1.0)  # -> shaft
        rd_n = 0.85 * w_n
        rd = rd_n + (0.78 * r_h - rd_n) * t1
        rd = rd + (r_s - rd) * t2
        c_n = c_neck * (1.0 + 0.5 * np.clip(w / w_n, -1.0, 1.0))  # calcar side thicker than the superior
        c = c_n + (c_thin - c_n) * t1
        c = c + (c_shaft - c) * np.clip((along - lt_al) / r_h, 0.0, 1.0)
        t_out = chord(sdf, rd)
        t_in = chord(sdf + c, rd - c)
        rho2 = uu * uu + vv * vv
        head_o = 2 * np.sqrt(np.maximum(0.0, r_h**2 - rho2))
        head_i = 2 * np.sqrt(np.maximum(0.0, (r_h - c_thin) ** 2 - rho2))
        t_out = np.maximum(t_out, head_o)
        t_in = np.maximum(t_in, head_i)
        # trabecular fraction: head > neck, trochanters > Ward's triangle > shaft marrow (medullary canal);
        # the principal compressive group runs from the calcar to the head's weight-bearing dome
        canal = 1.0 / (1.0 + np.exp((along - (lt_al + 0.6 * r_h)) / (0.25 * r_h)))
        ward = np.exp(
            -(((s - (l_p - 0.55 * r_h)) / (0.35 * r_h)) ** 2 + ((w - 0.1 * r_h) / (0.3 * r_h)) ** 2)
        )
        cg = np.exp(-((((uu - cg_u) * cg_nu + (vv - cg_v) * cg_nv) / (0.28 * r_h)) ** 2))
        f_reg = f0 * (0.2 + 0.8 * canal) * (1.0 + 0.35 * (head_o > 0)) * (1.0 - 0.35 * ward)
        f_reg = f_reg * (1.0 + 0.3 * cg * (s < l_p - 0.5 * r_h))
        tex = tile[np.floor(vv / 0.45).astype(np.int32) % n_t, np.floor(uu / 0.45).astype(np.int32) % n_t]
        frac = np.clip(f_reg * (1.0 + k_tex * tex), 0.0, 1.0)
        bone[fb] += np.maximum(t_out - t_in, 0.0) + frac * t_in

    # pelvis: one projected-thickness map (pieces combined by max) + dense lines where cortex runs tangential
    pel_out = np.zeros((wr, wc), np.float32)
    pel_in = np.zeros((wr, wc), np.float32)
    lines = np.zeros((wr, wc), np.float32)
    c_p = 1.3 * sa * r_pel**0.6  # pelvic cortex
    # acetabular walls over the head: bone medial to the posterior / anterior rim (circles through 3 points)
    rims = [
        circle3((pl_u, pl_v), (-0.4 * r_h, 0.2 * r_h), (0.0, 1.0 * r_h)),
        circle3((0.1 * r_h, -r_a + 0.5), (-0.1 * r_h, 0.2 * r_h), (0.45 * r_h, 0.95 * r_h)),
    ]

    def acet_cover(uu: np.ndarray, vv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rr = np.sqrt(uu * uu + vv * vv)
        cav = np.clip((r_a - rr) / (1.5 * sa) + 0.5, 0.0, 1.0)
        cover = np.zeros_like(uu)
        for ru, rv, rho in rims:
            dd = np.sqrt((uu - ru) ** 2 + (vv - rv) ** 2) - rho
            cover = cover + 0.3 * np.clip(-dd / (1.5 * sa), 0.0, 1.0)
        return 1.0 - cav * (1.0 - cover), rr

    ext = [wr, 0, wc, 0]  # row / column extent of everything drawn into the pelvis maps

    def mark(sl: tuple[slice, slice]) -> None:
        ext[:] = [
            min(ext[0], sl[0].start),
            max(ext[1], sl[0].stop),
            min(ext[2], sl[1].start),
            max(ext[3], sl[1].stop),
        ]

    def put(sl: tuple[slice, slice], out: np.ndarray, inn: np.ndarray) -> None:
        mark(sl)
        np.maximum(pel_out[sl], out, out=pel_out[sl])
        np.maximum(pel_in[sl], inn, out=pel_in[sl])

    # ilium (lateral border, pelvic inlet, sacro-iliac joint) + acetabular body and columns around the head
    sl = box(pl_u - 70 * sa, u_m, v_lo - 1, 1.6 * r_h)
    if sl is not None:
        uu, vv = u[sl], v[sl]
        inlet = ellipse_sdf(uu, vv, u_m, v_in, a_in, b_in)
        ilium = np.maximum(np.sqrt((uu - cb_u) ** 2 + (vv - cb_v) ** 2) - rho_b, -inlet)
        ilium = np.maximum(ilium, uu - (u_m - 42.0 * sa + 0.15 * (vv + 50.0 * sa)))
        ilium = np.maximum(ilium, vv - 0.3 * r_h)
        body = ellipse_sdf(uu, vv, 0.7 * r_h, 0.45 * r_h, 0.95 * r_h, 1.05 * r_h)
        sdf = smin(ilium, body, 8.0 * sa)
        factor, rr = acet_cover(uu, vv)
        rd = 3.5 * sa + 14.0 * sa * np.exp(-np.maximum(rr - r_a, 0.0) / (18.0 * sa))
        put(sl, chord(sdf, rd) * factor, chord(sdf + c_p, rd - c_p) * factor)
        # iliopectineal line (pelvic brim) on the inlet's lower-lateral arc
        lines[sl] += 5.0 * sa * line(inlet, 1.2 * sa) * (vv > v_in - 0.6 * b_in) * (uu < u_m - 8.0 * sa)
        # rims of the acetabular walls across the head
        for ru, rv, rho in rims:
            dd = np.sqrt((uu - ru) ** 2 + (vv - rv) ** 2) - rho
            lines[sl] += 2.5 * sa * line(dd, 0.9 * sa) * (rr < r_a)
    # ischium and pubic rami around the obturator foramen (smooth union, folded about the midline)
    of_l, of_r = 1.6 * r_h, u_m - 27.0 * sa  # obturator foramen: lateral / medial extent
    of_u, of_v, of_a, of_b = 0.5 * (of_l + of_r), v_sym + 1.15 * r_h, 0.5 * (of_r - of_l), 1.2 * r_h
    of_t = math.radians(rng.normal(-25.0, 4.0))  # long axis tilted (upper end lateral)
    sl = box(0.0, 2 * u_m, 0.2 * r_h, 3.8 * r_h)
    if sl is not None:
        uu, vv = u[sl], v[sl]
        uf = u_m - np.abs(uu - u_m)
        isch = seg_sdf(uf, vv, (0.55 * r_h, 0.9 * r_h), (0.9 * r_h, 2.9 * r_h), 0.68 * r_h, 0.55 * r_h)
        sup = seg_sdf(uf, vv, (0.9 * r_h, 0.55 * r_h), (u_m - 15 * sa, v_sym + 8 * sa), 10 * sa, 8 * sa)
        pub = seg_sdf(
            uf, vv, (u_m - 13 * sa, v_sym + 10 * sa), (u_m - 14 * sa, v_sym + 40 * sa), 12 * sa, 12 * sa
        )
        inf = seg_sdf(uf, vv, (u_m - 16 * sa, v_sym + 40 * sa), (1.15 * r_h, 3.1 * r_h), 8 * sa, 9 * sa)
        sdf = smin(smin(smin(isch, sup, 8 * sa), pub, 8 * sa), inf, 8 * sa)
        sdf = smin(sdf, ellipse_sdf(uf, vv, of_u, of_v, of_a + 9 * sa, of_b + 9 * sa, of_t), 6 * sa)
        sdf = np.maximum(sdf, -ellipse_sdf(uf, vv, of_u, of_v, of_a, of_b, of_t))  # obturator foramen
        gap = np.clip((np.abs(uu - u_m) - 1.5 * sa) / sa, 0.0, 1.0)  # symphysis
        rd = 8.0 * sa + 6.0 * sa * np.clip((1.6 * r_h - uf) / (0.8 * r_h), 0.0, 1.0)  # ischium thicker
        put(sl, chord(sdf, rd) * gap, chord(sdf + c_p, rd - c_p) * gap)
    # sacrum (an inverted triangle) medial to the sacro-iliac joint
    sl = box(u_m - 60 * sa, u_m + 60 * sa, v_lo - 1, -20 * sa)
    if sl is not None:
        uu, vv = u[sl], v[sl]
        uf = u_m - np.abs(uu - u_m)
        sdf = np.maximum(
            seg_sdf(uf, vv, (u_m, -165 * sa), (u_m, -45 * sa), 50 * sa, 20 * sa),
            (u_m - 39.0 * sa + 0.15 * (vv + 50.0 * sa)) - uf,
        )
        put(sl, chord(sdf, 3.0 * sa), chord(sdf + c_p, 3.0 * sa - c_p))
    # sourcil (dense subchondral roof), teardrop, ilioischial line
    sl = box(pl_u - 5, r_a, -r_a - 8 * sa, -0.1 * r_h)
    if sl is not None:
        uu, vv = u[sl], v[sl]
        mark(sl)
        phi = np.arctan2(uu, -vv)  # 0 = straight up, + medial
        ph_c, ph_h = (math.radians(50.0) - ce) / 2, (math.radians(50.0) + ce) / 2
        win = np.sqrt(np.clip(1.0 - ((phi - ph_c) / ph_h) ** 2, 0.0, 1.0))
        rr = np.sqrt(uu * uu + vv * vv)
        lines[sl] += 9.0 * sa * win * line(rr - (r_a + 2.0 * sa), 1.6 * sa)
    td_u, td_v, td_a, td_b = r_a + 5.0 * sa, 0.5 * r_h, 4.0 * sa, 0.45 * r_h
    sl = box(td_u - 8 * sa, td_u + 8 * sa, td_v - td_b, td_v + td_b + 5 * sa)
    if sl is not None:
        uu, vv = u[sl], v[sl]
        mark(sl)
        e = ellipse_sdf(uu, vv, td_u, td_v, td_a, td_b)
        lines[sl] += (5.0 * sa * line(e, 1.0 * sa) + 3.0 * sa * (e < 0)) * (vv > td_v - 0.3 * r_h)
    x_ii = r_a + 11.0 * sa
    sl = box(x_ii - 6 * sa, x_ii + 6 * sa, v_in, 2.2 * r_h)
    if sl is not None:
        uu, vv = u[sl], v[sl]
        mark(sl)
        ends = np.clip((vv - v_in) / (10 * sa), 0.0, 1.0) * np.clip((0.9 * r_h - vv) / (8 * sa), 0.0, 1.0)
        lines[sl] += 4.0 * sa * line(uu - x_ii, 1.0 * sa) * ends
    f_p = 0.30 * r_pel**0.8  # pelvic trabecular fraction: follows BMD, more weakly than the femur
    if ext[0] < ext[1]:
        sl = (slice(ext[0], ext[1]), slice(ext[2], ext[3]))
        uu, vv, p_in = u[sl], v[sl], pel_in[sl]
        tex = tile[
            (np.floor(vv / 0.45).astype(np.int32) + n_t // 2) % n_t,
            np.floor(uu / 0.45).astype(np.int32) % n_t,
        ]
        bone[sl] += (
            r_pel**0.5 * (np.maximum(pel_out[sl] - p_in, 0.0) + lines[sl])
            + np.clip(f_p * (1.0 + 0.5 * k_tex * tex), 0.0, 1.0) * p_in
        )

    # soft tissue (BMI): body section an ellipse about the midline whose lateral (skin) edge curves with v
    # (waist above, widest at the trochanters, thigh below); subcutaneous fat attenuates a little less
    u_c = 95.0 * sa
    v_gt = 0.5 * jy
    lat_ext = w_lat * (
        1.0
        - 0.22 * np.clip((v_gt - v) / 130.0, 0.0, 1.6) ** 2
        - 0.10 * np.clip((v - v_gt) / 150.0, 0.0, 1.5) ** 2
    )
    x_b = (u - u_c) / (u_c + lat_ext)
    dep_v = depth * (1.0 - 0.12 * np.clip((v - 60.0 * sa) / 100.0, 0.0, 1.0))
    x_b = x_b * x_b
    soft = dep_v * np.sqrt(np.sqrt(np.maximum(0.0, 1.0 - x_b * x_b)))
    x_m = (u - u_c) / (u_c + lat_ext - t_fat)
    x_m = x_m * x_m
    muscle = np.maximum(dep_v - 2 * t_fat, 0.0) * np.sqrt(np.sqrt(np.maximum(0.0, 1.0 - x_m * x_m)))

    kvp = scanner.kvp
    mu_s = 0.021 * (75.0 / kvp) ** 0.3
    dmu = 0.040 * (75.0 / kvp) ** 0.8
    if v2 is not None:  # bone-to-soft-tissue contrast per unit BMD falls with body fat (covariates.py)
        dmu *= v2.bone_contrast
    att = (mu_s * (0.88 * soft + 0.12 * muscle) + dmu * bone).astype(np.float32)
    primary = np.exp(-att)

    # scatter: low-pass primary on a coarse grid, scaled by the scatter-to-primary ratio of the thickness
    b = max(1, round(4.0 / wpx))
    cr_, cc_ = wr // b, wc // b
    coarse = primary[: cr_ * b, : cc_ * b].reshape(cr_, b, cc_, b).mean(axis=(1, 3))
    coarse = _gauss_blur_fft(coarse, 30.0 / (b * wpx))
    sc = np.repeat(np.repeat(coarse, b, axis=0), b, axis=1)
    sc = np.pad(sc, ((0, wr - sc.shape[0]), (0, wc - sc.shape[1])), mode="edge")
    spr = scanner.grid * (soft / 200.0)
    expo = primary + spr * sc
    expo = _gauss_blur_fft(expo, scanner.mtf_sigma_mm / wpx)

    # exposure (AEC keeps the detector dose roughly constant behind the soft tissue) and quantum noise
    mas = 20.0 * math.exp(mu_s * (depth - 170.0)) * rng.uniform(0.8, 1.25)
    phi = 2.5e5 * (mas / 20.0) * scanner.quanta  # quanta / mm² unattenuated
    expo = np.maximum(expo, 1e-7)
    expo_n = expo + np.sqrt(expo / (phi * wpx * wpx)) * rng.standard_normal((wr, wc), dtype=np.float32)
    logsig = np.log(np.maximum(expo_n, 1e-6) * (mas / 20.0))

    # exposure recognition (as CR/DX processing does): the air level maps near 0 whatever the mAs
    l_ref = math.log(mas / 20.0) + rng.normal(0.0, 0.05)
    d = np.clip((l_ref - logsig) / 8.0 + 0.02, 1e-4, None) ** scanner.gamma
    max_value = (1 << scanner.bits_stored) - 1
    gain = scanner.gain_frac * max_value
    offset = scanner.offset_frac * max_value
    if v2 is not None:
        d = apply_processing(d.astype(np.float32), v2.processing, wpx)
    dw = (offset + gain * d).astype(np.float32)

    # ---- full resolution ----
    full = upsample_bilinear(dw, k)[:rows, :cols]
    sigma_w = scanner.white_noise * max_value
    idx = rng.integers(0, 65536, size=(rows, cols), dtype=np.uint16)
    full += _GAUSS_TABLE[idx] * np.float32(sigma_w)
    stored = np.clip(full, 0, max_value)
    stored = np.rint(stored, out=stored).astype(np.uint16)

    tb = max(1, wr // thumb_rows)
    thumb = dw[: (wr // tb) * tb, : (wc // tb) * tb].reshape(wr // tb, tb, wc // tb, tb).mean(axis=(1, 3))

    # landmark positions in output pixels (row, col) for checks and feature extraction
    def to_px(pu: float, pv: float) -> tuple[float, float]:
        xm, ym = mag * (ct * pu - st * pv) + hx, mag * (st * pu + ct * pv) + hy
        return ym / spacing - 0.5, xm / spacing - 0.5

    head_rc = to_px(0.0, 0.0)
    j_rc = to_px(jx, jy)
    info = {
        "pixel_spacing_mm": spacing,
        "work_factor": float(k),
        "magnification": mag,
        "rotation_deg": math.degrees(theta),
        "head_radius_mm": r_h,
        "neck_shaft_angle_deg": math.degrees(nsa),
        "neck_cortex_mm": c_neck,
        "shaft_cortex_mm": c_shaft,
        "trabecular_fraction": f0,
        "soft_tissue_depth_mm": depth,
        "lateral_soft_tissue_mm": w_lat,
        "mas": mas,
        "kvp": kvp,
        "head_row": head_rc[0],
        "head_col": head_rc[1],
        "head_radius_px": r_h * mag / spacing,
        "junction_row": j_rc[0],
        "junction_col": j_rc[1],
    }
    return Rendered(
        stored=stored, display=full, max_value=max_value, thumb=thumb.astype(np.float32), info=info
    )
