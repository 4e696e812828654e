"""numpy / list -> pyarrow arrays without ``pa.array``.

``pa.array`` imports pandas to probe its argument (whatever the argument is): +40 MB RSS and ~0.4 s in
``score``'s main process, which otherwise never needs pandas (issue 11, main-process RSS). Values go through
polars instead (already loaded there), which hands arrow arrays over without that probe.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

__all__ = ["to_arrow"]


def to_arrow(values: Any, dtype: pa.DataType, mask: np.ndarray | None = None) -> pa.Array:
    """``values`` (numpy array, list, or an arrow array) as an arrow array of ``dtype``; ``mask`` True = null
    (primitive fixed-width types only)."""
    if isinstance(values, pa.Array):
        return values.cast(dtype)
    if mask is not None:
        data = np.ascontiguousarray(values, dtype=dtype.to_pandas_dtype())
        valid = np.packbits(~np.asarray(mask, dtype=bool), bitorder="little")
        buffers = [pa.py_buffer(valid), pa.py_buffer(data)]
        return pa.Array.from_buffers(dtype, len(data), buffers, null_count=int(np.count_nonzero(mask)))
    text = pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    series = pl.Series(values, dtype=pl.String) if text else pl.Series(values)
    return series.to_arrow().cast(dtype)
