"""One comparison of a candidate runner against a reference runner (Polygraphy's Comparator, small).

Used by every parity check in the project: the ONNX export against torch (``export/parity.py``), a freshly
built TensorRT engine against onnxruntime (``infer/tensorrt/builder.py``), and the runner tests. Each batch
size runs the first B rows of the same feeds through both runners, so a baked batch size or a wrong dynamic
axis shows up as a difference rather than as a silent broadcast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from xbmd_batch.infer.base import Feeds, Runner


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, float]:
    """max |delta| per output, keyed ``max_abs_<output>`` (float64 arithmetic; 0 for empty outputs)."""
    return {
        f"max_abs_{k}": float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(ref[k], np.float64))))
        if np.asarray(ref[k]).size
        else 0.0
        for k in ref
    }


@dataclass
class Comparison:
    """Per batch size (as a string key), max |delta| of each output; ``worst`` takes the max over batches."""

    reference: str
    candidate: str
    batches: dict[str, dict[str, float]]

    def worst(self, output: str) -> float:
        return max(v[f"max_abs_{output}"] for v in self.batches.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_runners(
    reference: Runner, candidate: Runner, feeds: Feeds, batch_sizes: tuple[int, ...]
) -> Comparison:
    """The first B rows of ``feeds`` through both runners, for each B; ValueError if feeds are too short."""
    n = min(len(v) for v in feeds.values())
    if max(batch_sizes) > n:
        raise ValueError(f"comparison feeds have {n} rows, batch sizes need {max(batch_sizes)}")
    res: dict[str, dict[str, float]] = {}
    for b in batch_sizes:
        sub = {k: np.ascontiguousarray(v[:b]) for k, v in feeds.items()}
        res[str(b)] = compare_outputs(reference.infer(sub), candidate.infer(sub))
    return Comparison(reference.name, candidate.name, res)
