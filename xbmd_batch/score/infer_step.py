"""Stage 6b: one batch through the runner -> scored and failure rows (the local and Ray engines share it).

A batch that raises is retried one image at a time, so one bad image fails alone (``inference_error``); a
prediction or attention that is NaN/inf becomes a ``nonfinite_prediction`` failure row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class BatchOutcome:
    scored: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = field(
        default_factory=list
    )  # idx, bmd, attn
    failed: list[tuple[np.ndarray, list[str], list[str]]] = field(
        default_factory=list
    )  # idx, reasons, messages


def _accept(out: BatchOutcome, idx: np.ndarray, pred: dict[str, Any], has_attn: bool) -> None:
    bmd = np.asarray(pred["bmd"], dtype=np.float32).reshape(len(idx))
    attn = pred.get("field_attention") if has_attn else None
    attn = None if attn is None else np.asarray(attn, dtype=np.float32).reshape(len(idx), -1)
    sd = pred.get("bmd_sd_models")  # a fold ensemble's between-model SD (export --ensemble)
    sd = None if sd is None else np.asarray(sd, dtype=np.float32).reshape(len(idx))
    good = np.isfinite(bmd)
    if attn is not None:
        good &= np.isfinite(attn).all(axis=1)
    if good.all():
        out.scored.append((idx, bmd, attn, sd))
        return
    out.scored.append(
        (idx[good], bmd[good], None if attn is None else attn[good], None if sd is None else sd[good])
    )
    bad = idx[~good]
    out.failed.append(
        (bad, ["nonfinite_prediction"] * len(bad), ["the model returned NaN/inf for this image"] * len(bad))
    )


def infer_batch(
    runner: Any, has_attn: bool, idx: np.ndarray, images: np.ndarray, meta: np.ndarray, meta_mask: np.ndarray
) -> BatchOutcome:
    """Score ``images`` (plan indices ``idx``; their META rows already gathered) with ``runner``."""
    out = BatchOutcome()
    try:
        _accept(out, idx, runner.infer({"image": images, "meta": meta, "meta_mask": meta_mask}), has_attn)
    except Exception:  # noqa: BLE001 - isolate the bad image: retry one by one
        out = BatchOutcome()
        for k in range(len(idx)):
            try:
                pred = runner.infer(
                    {"image": images[k : k + 1], "meta": meta[k : k + 1], "meta_mask": meta_mask[k : k + 1]}
                )
                _accept(out, idx[k : k + 1], pred, has_attn)
            except Exception as e:  # noqa: BLE001
                out.failed.append((idx[k : k + 1], ["inference_error"], [f"{type(e).__name__}: {e}"[:500]]))
    return out
