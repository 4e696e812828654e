"""The tiny wide-path architecture several test modules build (test_model, test_train_engine, test_train_wide,
test_calibration): the small CNN encoder (width 4), one fusion layer, d_model 16, and the wide path."""

from __future__ import annotations

from xbmd_batch.config import DEFAULT_SCHEMA, ModelConfig


def smallcnn_wide_cfg(image_size: int, wide_side: int, **kw: object) -> ModelConfig:
    """``ModelConfig`` of the tiny wide-path model for ``DEFAULT_SCHEMA``; ``kw`` overrides or adds fields
    (``wide_gain``, ``n_members``, ``d_model``, ...)."""
    base: dict[str, object] = dict(
        d_model=16, n_layers=1, encoder="smallcnn", cnn_width=4, wide=True, wide_side=wide_side
    )
    base.update(kw)
    return ModelConfig.for_schema(DEFAULT_SCHEMA, image_size=image_size, **base)
