"""Reference predictors fitted on each fold's training part and scored on its test part (no network).

They say what the network adds (issue 10):
- ``baseline-train-mean``: the training-part mean (beating it shows learning);
- ``baseline-metadata-ridge``: ridge on the encoded metadata (values + presence mask);
- ``baseline-pixel-ridge``: ridge on the preprocessed image's pixels, average-pooled to at most
  ``MAX_PIXEL_SIDE``² (a linear model of the very input the network sees);
- ``baseline-pixel-metadata-ridge``: ridge on pixels and metadata together, every column standardised on the
  training part. A network that cannot beat this one is not using its capacity.

Ridge penalties are chosen inside the training part by scikit-learn's efficient leave-one-out (``RidgeCV``).
"""

from __future__ import annotations

import numpy as np

MAX_PIXEL_SIDE = 64
ALPHAS = np.logspace(-2, 5, 15)
NAMES: tuple[str, ...] = (
    "baseline-train-mean",
    "baseline-metadata-ridge",
    "baseline-pixel-ridge",
    "baseline-pixel-metadata-ridge",
)


def pixel_features(images: np.ndarray, max_side: int = MAX_PIXEL_SIDE) -> np.ndarray:
    """[N, 1, S, S] images -> [N, s*s] float32, average-pooled by an integer factor to s <= max_side."""
    x = np.asarray(images, dtype=np.float32)
    n, _, s, _ = x.shape
    f = int(np.ceil(s / max_side))
    if f > 1:
        s2 = (s // f) * f
        x = x[:, :, :s2, :s2].reshape(n, 1, s2 // f, f, s2 // f, f).mean(axis=(3, 5))
    return x.reshape(n, -1)


def reference_predictions(
    pixels: np.ndarray | None,
    meta: np.ndarray,
    mask: np.ndarray,
    y: np.ndarray,
    tr: np.ndarray,
    te: np.ndarray,
) -> dict[str, np.ndarray]:
    """Test-part predictions of each reference (``pixels`` row-aligned with ``meta``; None: no pixel ones)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xm = np.concatenate([meta, mask], axis=1)
    out = {
        "baseline-train-mean": np.full(len(te), float(y[tr].mean())),
        "baseline-metadata-ridge": RidgeCV(alphas=ALPHAS).fit(xm[tr], y[tr]).predict(xm[te]),
    }
    if pixels is not None:
        for name, x in (
            ("baseline-pixel-ridge", pixels),
            ("baseline-pixel-metadata-ridge", np.concatenate([pixels, xm], axis=1)),
        ):
            model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS))
            out[name] = model.fit(x[tr], y[tr]).predict(x[te])
    return out
