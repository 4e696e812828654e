"""K fold models of one training run -> one ONNX graph: mean BMD, between-model SD, mean field attention.

``python -m export onnx RUN --ensemble --out ensemble.onnx`` loads ``RUN/fold_*.pt`` (the cross-validation
models) and exports ``EnsembleWrapper``: every member runs on the same inputs and the graph returns
``bmd`` = mean over members, ``field_attention`` = mean over members (rows still sum to 1) and
``bmd_sd_models`` = the between-member SD (n − 1 denominator). `score` writes the last as ``bmd_sd_models``.

Cost: K members = K forward passes per image, so model-only time grows about K× (measured:
``benchmarks/ensemble_cost.py``); decode, often the bottleneck, is unchanged.

Metadata normalisation differs per fold (each fold fitted its z-scores on its own training part), while
`score` encodes META once with the ensemble card's schema. The wrapper therefore maps the card's z-scores to
each member's: z_k = (z · s_card + m_card − m_k) / s_k for numeric fields (identity for categorical ones),
times the presence mask so missing cells stay 0. Preprocessing and fields must be identical across folds.

The card is the one of ``RUN/final.pt`` when present (else fold 0's) with ``extra["ensemble"]`` naming the
members and the extra output. Its out-of-fold residuals (``training_summary.oof_residuals``) are those of the
single fold models; the ensemble mean is at least as accurate on average, so the conformal intervals it gets
are, if anything, conservative. Parity: onnxruntime vs this torch wrapper at batch 1, 3 and 32.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xbmd_batch.errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from xbmd_batch.modelcard import ModelCard

SD_OUTPUT = "bmd_sd_models"
FOLD_RE = re.compile(r"^fold_(\d+)\.pt$")


def fold_checkpoints(run: Path) -> list[Path]:
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: --ensemble needs a training run folder (holding fold_*.pt)")
    folds = sorted(
        (p for p in run.iterdir() if FOLD_RE.match(p.name)), key=lambda p: int(FOLD_RE.match(p.name)[1])
    )
    if len(folds) < 2:
        raise InputError(f"{run}: found {len(folds)} fold_*.pt; an ensemble needs at least 2 fold models")
    return folds


def _affine(card: ModelCard, member: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """Per-field (scale, shift) mapping the card's encoded meta to the member's."""
    if card.schema.names != member.schema.names or card.schema.kinds != member.schema.kinds:
        raise InputError("fold models have different metadata fields; they cannot form one ensemble")
    scale, shift = [], []
    for f0, fk in zip(card.schema.fields, member.schema.fields, strict=True):
        if f0.kind != "numeric":
            scale.append(1.0)
            shift.append(0.0)
            continue
        s0 = f0.std if f0.std and f0.std > 0 else 1.0
        sk = fk.std if fk.std and fk.std > 0 else 1.0
        scale.append(s0 / sk)
        shift.append((f0.mean - fk.mean) / sk)
    return np.asarray(scale, np.float32), np.asarray(shift, np.float32)


def build_ensemble(run: Path) -> tuple[nn.Module, ModelCard, list[Path]]:
    """(EnsembleWrapper in eval mode, its card, member checkpoint paths)."""
    import torch

    from xbmd_batch.checkpoint import load_model

    paths = fold_checkpoints(run)
    base = Path(run) / "final.pt"
    _, card = load_model(base if base.is_file() else paths[0])
    members, scales, shifts = [], [], []
    for p in paths:
        m, c = load_model(p)
        if c.preprocess != card.preprocess:
            raise InputError(f"{p}: preprocessing differs from {base.name}; cannot ensemble")
        if c.model_config.image_size != card.model_config.image_size:
            raise InputError(f"{p}: image size differs; cannot ensemble")
        a, b = _affine(card, c)
        members.append(m)
        scales.append(a)
        shifts.append(b)

    class EnsembleWrapper(torch.nn.Module):
        """(bmd mean [B], field_attention mean [B, F], bmd_sd_models [B]) over K members."""

        def __init__(self) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(members)
            self.register_buffer("scale", torch.from_numpy(np.stack(scales)))  # (K, F)
            self.register_buffer("shift", torch.from_numpy(np.stack(shifts)))  # (K, F)

        def forward(
            self, image: torch.Tensor, meta: torch.Tensor, meta_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            bmds, attns = [], []
            for k, m in enumerate(self.members):
                meta_k = (meta * self.scale[k] + self.shift[k]) * meta_mask  # (B, F)
                bmd, attn = m(image, meta_k, meta_mask, return_attention=True)
                bmds.append(bmd)
                attns.append(attn)
            b = torch.stack(bmds)  # (K, B)
            return b.mean(0), torch.stack(attns).mean(0), b.std(0, correction=1)

    wrapper = EnsembleWrapper().eval()
    ens = {
        "k": len(paths),
        "members": [p.name for p in paths],
        "card_from": base.name if base.is_file() else paths[0].name,
        "extra_outputs": [SD_OUTPUT],
        "aggregation": "mean of members; bmd_sd_models = SD over members (n-1)",
        "cost": f"{len(paths)} forward passes per image (about {len(paths)}x model-only time)",
    }
    card = card.with_extra(ensemble=ens)
    return wrapper, card, paths


def export_ensemble(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = 18,
    parity_cohort: str | os.PathLike[str] | None = None,
    tolerance: float = 1e-4,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export and check the fold ensemble of ``run``; write ``out`` only if every check passes."""
    import onnx
    import torch

    from export.onnx_export import ExportError, _tmp_beside, legacy_export, tool_versions
    from export.parity import reference_feeds
    from xbmd_batch.fsutil import commit, write_synced
    from xbmd_batch.onnx_card import check_io_against_card, embed_card, read_onnx_card

    log = log or (lambda _m: None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper, card, paths = build_ensemble(Path(run))
    cfg = card.model_config
    in_names = list(card.input_names)
    out_names = [*card.output_names, SD_OUTPUT]
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g),
        torch.randn(2, cfg.n_fields, generator=g),
        torch.ones(2, cfg.n_fields),
    )
    t0 = time.perf_counter()
    # The TorchScript exporter: K copies of the member graph trace reliably and fast; the batch axis is
    # declared dynamic and parity at batch 1/3/32 below proves nothing was baked in.
    proto = legacy_export(wrapper, args, in_names, out_names, opset)
    export_s = round(time.perf_counter() - t0, 2)
    card = dataclasses.replace(card, versions={**card.versions, **tool_versions()})
    card = card.with_extra(
        onnx_precision="fp32",
        export={
            "exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}",
            "opset": opset,
            "export_time_s": export_s,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    log(f"exported {len(paths)}-member ensemble in {export_s:.1f} s")
    feeds, desc = reference_feeds(card, 32, parity_cohort)
    tmp = _tmp_beside(out)
    try:
        embed_card(proto, card)
        write_synced(tmp, proto.SerializeToString())
        check_io_against_card(onnx.load(os.fspath(tmp), load_external_data=False), card, source=str(out))
        onnx.checker.check_model(os.fspath(tmp), full_check=True)
        import onnxruntime as ort

        sess = ort.InferenceSession(os.fspath(tmp), providers=["CPUExecutionProvider"])
        worst = {n: 0.0 for n in out_names}
        for b in (1, 3, 32):
            f = {k: np.ascontiguousarray(v[:b], dtype=np.float32) for k, v in feeds.items()}
            got = sess.run(out_names, f)
            with torch.inference_mode():
                ref = wrapper(*(torch.from_numpy(f[n]) for n in in_names))
            for n, gv, rv in zip(out_names, got, ref, strict=True):
                worst[n] = max(worst[n], float(np.max(np.abs(gv - rv.numpy()))))
        log(
            f"parity onnxruntime vs torch (B=1,3,32; {desc}): "
            + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        )
        if not worst["bmd"] <= tolerance or not worst[SD_OUTPUT] <= tolerance:
            raise ExportError(f"{out}: ensemble parity failed: {worst} (tolerance {tolerance})")
        card = card.with_extra(parity={"max_abs": worst, "tolerance": tolerance, "inputs": desc})
        embed_card(proto, card)
        write_synced(tmp, proto.SerializeToString())
        read_onnx_card(tmp)
        commit(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"path": os.fspath(out), "k": len(paths), "export_time_s": export_s, "parity": worst}
