"""Parity of an exported graph against the torch model it came from.

The reference is the torch model on CPU in fp32 (``TorchRunner``); the candidate is onnxruntime on CPU running
the exported file (``OrtRunner``), both through the same runner protocol that ``score`` uses, on real
preprocessed synthetic inputs (``xbmd_batch.parity_feeds``) at several batch sizes, compared with the one
comparison helper (``xbmd_batch.infer.compare``), so a baked batch size or a wrong dynamic axis shows up as a
failure rather than as a silent broadcast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xbmd_batch.defaults import DEFAULT_BATCH_SIZE
from xbmd_batch.errors import XbmdError

if TYPE_CHECKING:
    from torch import nn

    from xbmd_batch.modelcard import ModelCard

DEFAULT_BATCH_SIZES = (1, 3, DEFAULT_BATCH_SIZE)
FP32_TOLERANCE = 1e-4  # g/cm^2
FP16_TOLERANCE = 5e-3  # g/cm^2 (DXA precision is ~1.5-2 %, i.e. ~0.012 g/cm^2)


class ParityError(XbmdError):
    """The exported graph disagrees with torch beyond the tolerance."""


@dataclass
class ParityReport:
    """max |delta| per batch size and overall, plus what was compared (stored in card.extra["parity"])."""

    reference: str
    candidate: str
    tolerance: float
    batches: dict[str, dict[str, float]]
    inputs: str
    max_abs_bmd: float = 0.0
    max_abs_field_attention: float = 0.0
    passed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        per = ", ".join(f"B={b}: {v['max_abs_bmd']:.2e}" for b, v in self.batches.items())
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.candidate} vs {self.reference}: max |dBMD| {self.max_abs_bmd:.2e} g/cm^2 ({per}), "
            f"max |d attention| {self.max_abs_field_attention:.2e}; tolerance {self.tolerance:g} -> {verdict}"
        )


def reference_feeds(
    card: ModelCard, n: int, cohort_dir: str | os.PathLike[str] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """(feeds with n rows, a description of where they came from)."""
    from xbmd_batch.parity_feeds import make_reference_feeds

    feeds = make_reference_feeds(card, n=n, cohort_dir=cohort_dir)
    where = (
        f"synthetic cohort {cohort_dir}" if cohort_dir else "tiny synthetic cohort generated for the check"
    )
    return feeds, f"{where}, preprocessed per the card, repeated to {n} rows"


def check_onnx_parity(
    model: nn.Module,
    card: ModelCard,
    onnx_path: str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    *,
    tolerance: float = FP32_TOLERANCE,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    inputs_desc: str = "",
    raise_on_fail: bool = True,
) -> ParityReport:
    """onnxruntime-CPU on ``onnx_path`` vs torch-CPU fp32 on ``model``; ParityError if BMD drifts too far."""
    from xbmd_batch.infer.compare import compare_runners
    from xbmd_batch.infer.ort_runner import OrtRunner
    from xbmd_batch.infer.torch_runner import TorchRunner

    with TorchRunner(model, card, device="cpu") as ref, OrtRunner(Path(onnx_path), provider="cpu") as cand:
        cmp = compare_runners(ref, cand, feeds, batch_sizes)
    bmd, attn = card.output_names
    report = ParityReport(
        reference=cmp.reference,
        candidate=cmp.candidate,
        tolerance=tolerance,
        batches=cmp.batches,
        inputs=inputs_desc,
        max_abs_bmd=cmp.worst(bmd),
        max_abs_field_attention=cmp.worst(attn),
    )
    report.passed = bool(np.isfinite(report.max_abs_bmd) and report.max_abs_bmd <= tolerance)
    if raise_on_fail and not report.passed:
        raise ParityError(f"{onnx_path}: parity check failed: {report.summary()}")
    return report
