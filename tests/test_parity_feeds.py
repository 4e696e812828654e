"""Parity inputs: a tiny synthetic cohort through the card's preprocessing and schema (not random noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig, PreprocessConfig
from xbmd_batch.errors import InputError
from xbmd_batch.modelcard import ModelCard
from xbmd_batch.parity_feeds import make_reference_feeds

SIZE = 64


def _card() -> ModelCard:
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=SIZE, d_model=32)
    return ModelCard(model_config=cfg, schema=DEFAULT_SCHEMA, preprocess=PreprocessConfig(image_size=SIZE))


def test_reference_feeds_are_real_inputs() -> None:
    feeds = make_reference_feeds(_card(), n=10, n_subjects=4, synth_size=128)
    assert feeds["image"].shape == (10, 1, SIZE, SIZE) and feeds["image"].dtype == np.float32
    assert feeds["meta"].shape == feeds["meta_mask"].shape == (10, len(DEFAULT_SCHEMA.fields))
    assert np.isfinite(feeds["image"]).all() and feeds["image"].std() > 0.1
    assert set(np.unique(feeds["meta_mask"])) <= {0.0, 1.0}
    assert not np.array_equal(feeds["image"][0], feeds["image"][1])  # distinct subjects, not one image
    np.testing.assert_array_equal(feeds["image"][4], feeds["image"][0])  # 4 subjects repeated to 10 rows


def test_reference_feeds_refuse_a_folder_that_is_not_a_cohort(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="meta.csv"):
        make_reference_feeds(_card(), n=4, cohort_dir=tmp_path)
