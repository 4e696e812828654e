"""Parity inputs: real preprocessed feeds from a synthetic cohort, for checking one backend against another.

Parity on random noise would test a distribution the model never sees, so the checks (``python -m export``,
a TensorRT engine build inside ``score``) run on a small synthetic cohort's DICOMs through the card's
preprocessing and its metadata through the card's schema. This lives outside ``xbmd_batch.infer`` on
purpose: the inference layer never renders data; callers pass these feeds (or ``make_reference_feeds``
itself, as a ``(card, n) -> feeds`` callable, so a cohort is rendered only when an engine is really built).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xbmd_batch.defaults import DEFAULT_BATCH_SIZE
from xbmd_batch.errors import InputError, XbmdError

if TYPE_CHECKING:
    from xbmd_batch.modelcard import ModelCard


def make_reference_feeds(
    card: ModelCard,
    n: int = DEFAULT_BATCH_SIZE,
    cohort_dir: str | os.PathLike[str] | None = None,
    *,
    n_subjects: int = 8,
    synth_size: int = 256,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Real preprocessed inputs for parity checks: a synthetic cohort's DICOMs through the card's
    preprocessing and its metadata through the card's schema, repeated to ``n`` rows.

    ``cohort_dir`` is an existing ``xbmd-batch synth`` output; without it a tiny cohort (``n_subjects``
    subjects rendered at ``synth_size`` pixels) is generated in a temporary directory. Parity on random
    noise would test a distribution the model never sees.
    """
    import tempfile

    if cohort_dir is not None:
        return _feeds_from_cohort(Path(cohort_dir), card, n, n_subjects)
    from xbmd_batch.synth import SynthConfig, generate_cohort

    with tempfile.TemporaryDirectory(prefix="xbmd-parity-") as tmp:
        generate_cohort(
            Path(tmp),
            # no JPEG 2000: the check must not depend on the optional decoders being installed
            SynthConfig(n=n_subjects, size=synth_size, seed=seed, workers=1, j2k_fraction=0.0),
            progress=False,
        )
        return _feeds_from_cohort(Path(tmp), card, n, n_subjects)


def _feeds_from_cohort(root: Path, card: ModelCard, n: int, limit: int) -> dict[str, np.ndarray]:
    from xbmd_batch.dicom_io import is_dicom, read_header
    from xbmd_batch.metadata import read_table, validate_and_encode
    from xbmd_batch.preprocess import load_and_preprocess

    meta_path = root / "meta.csv"
    if not meta_path.is_file():
        raise InputError(f"{root}: not a synthetic cohort (no meta.csv)")
    files = sorted(p for p in (root / "dicom").rglob("*") if p.is_file() and is_dicom(p))[: max(limit, 1)]
    if not files:
        raise InputError(f"{root}: no DICOM files under dicom/")
    enc = validate_and_encode(read_table(meta_path, subject_key=card.schema.subject_key), card.schema)
    row_of = {k: i for i, k in enumerate(enc.subject_keys) if k is not None}
    images, metas, masks = [], [], []
    skipped: list[str] = []
    for p in files:
        sid = read_header(p).patient_id
        if sid not in row_of:
            continue
        try:
            arr, _ = load_and_preprocess(p, card.preprocess)
        except (XbmdError, ValueError, RuntimeError) as e:  # e.g. J2K without its optional decoder
            skipped.append(f"{p.name}: {e}")
            continue
        images.append(arr)
        metas.append(enc.values[row_of[sid]])
        masks.append(enc.mask[row_of[sid]])
    if not images:
        raise InputError(f"{root}: no usable DICOM matching a meta.csv row ({'; '.join(skipped) or 'none'})")
    reps = -(-n // len(images))
    idx = np.tile(np.arange(len(images)), reps)[:n]
    image, meta, mask = card.input_names
    return {
        image: np.ascontiguousarray(np.stack(images)[idx], dtype=np.float32),
        meta: np.ascontiguousarray(np.stack(metas)[idx], dtype=np.float32),
        mask: np.ascontiguousarray(np.stack(masks)[idx], dtype=np.float32),
    }
