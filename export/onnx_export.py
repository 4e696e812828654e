"""Checkpoint -> ONNX with the model card inside, verified before it is allowed to exist.

Order (nothing reaches ``out`` unless every step passes; all writes go to a temp file in the same folder and
are renamed into place atomically):

1. ``torch.onnx.export(ExportWrapper(model), dynamo=True)``: the torch.export-based exporter, default since
   torch 2.9; it traces with symbolic batch ``Dim``s, so no batch size is baked into Reshape/Expand. The
   legacy TorchScript exporter is used only if the dynamo one raises, and the card says which one ran.
2. The card (checkpoint card + export facts + versions) is embedded in ``metadata_props``; the I/O names and
   shapes are checked against the card (batch axis symbolic); ``onnx.checker.check_model(full_check=True)``.
3. Parity: onnxruntime-CPU on the written file vs torch-CPU fp32 at batch 1, 3 and 32 on real preprocessed
   synthetic inputs. max |delta BMD| > 1e-4 g/cm^2 fails the export.
4. The parity figures, export time and final file size are added to the card and the file is re-serialised.
   Only ``metadata_props`` changes: the graph's bytes are hashed before the parity run and after the final
   write, and must be equal, so the figures in the card describe exactly the graph in the file.

``--fp16`` also writes ``<out stem>.fp16.onnx`` (``xbmd_batch.onnx_fp16``; LayerNorm, Softmax and ReduceMean
stay fp32, I/O stay fp32), checked against torch fp32 with a 5e-3 g/cm^2 tolerance. Every written model has
IR version ``onnx_fp16.ONNX_IR_VERSION`` (10), whatever the installed onnx would default to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.parity import (
    DEFAULT_BATCH_SIZES,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    ParityError,
    ParityReport,
    check_onnx_parity,
    reference_feeds,
)
from xbmd_batch.errors import XbmdError
from xbmd_batch.fsutil import commit, now_iso, temp_beside, write_synced

if TYPE_CHECKING:
    import onnx
    from torch import nn

    from xbmd_batch.modelcard import ModelCard

DEFAULT_OPSET = 18  # >= 17 gives LayerNormalization as one op; 18 is the dynamo exporter's native opset
EXAMPLE_BATCH = 2  # tracing batch; parity at 1/3/32 then proves the batch axis is really dynamic
FP16_KEEP_FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean")

Log = Callable[[str], None]


class ExportError(XbmdError):
    """The model could not be exported or the exported graph failed a check."""


@dataclass
class ExportResult:
    path: Path
    card: ModelCard
    exporter: str
    export_time_s: float
    file_size_bytes: int
    parity: ParityReport
    fp16_path: Path | None = None
    fp16_parity: ParityReport | None = None
    fp16_file_size_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": os.fspath(self.path),
            "exporter": self.exporter,
            "export_time_s": self.export_time_s,
            "file_size_bytes": self.file_size_bytes,
            "parity": self.parity.to_dict(),
            "fp16_path": os.fspath(self.fp16_path) if self.fp16_path else None,
            "fp16_parity": self.fp16_parity.to_dict() if self.fp16_parity else None,
            "fp16_file_size_bytes": self.fp16_file_size_bytes,
            "notes": list(self.notes),
        }


def tool_versions() -> dict[str, str]:
    """Versions that shape the exported graph (recorded in the card)."""
    import onnx
    import torch

    from xbmd_batch import __version__

    v = {"xbmd_batch": __version__, "torch": str(torch.__version__), "onnx": onnx.__version__}
    for mod in ("onnxruntime", "onnxscript"):
        try:
            v[mod] = str(__import__(mod).__version__)
        except ImportError:
            v[mod] = "absent"
    return v


def _example_inputs(card: ModelCard, batch: int = EXAMPLE_BATCH) -> tuple[Any, ...]:
    import torch

    cfg = card.model_config
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)
    meta = torch.randn(batch, cfg.n_fields, generator=g)
    mask = torch.ones(batch, cfg.n_fields)
    return image, meta, mask


def torch_to_onnx(
    model: nn.Module, card: ModelCard, opset: int = DEFAULT_OPSET, exporter: str = "auto"
) -> tuple[onnx.ModelProto, str, list[str]]:
    """(ModelProto, exporter description, notes). ``exporter``: "auto" (dynamo, legacy on failure),
    "dynamo" or "legacy"."""
    import torch

    from xbmd_batch.model import ExportWrapper
    from xbmd_batch.onnx_fp16 import pin_ir_version

    if opset < 17:
        raise ExportError(f"opset {opset} < 17: LayerNormalization would be decomposed; use 17 or newer")
    wrapper = ExportWrapper(model).eval()
    args = _example_inputs(card)
    in_names, out_names = list(card.input_names), list(card.output_names)
    notes: list[str] = []
    if exporter in ("auto", "dynamo"):
        try:
            batch = torch.export.Dim("batch", min=1, max=65536)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # renaming notes about the shared "batch" Dim
                prog = torch.onnx.export(
                    wrapper,
                    args,
                    None,
                    dynamo=True,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_shapes={n: {0: batch} for n in in_names},
                    opset_version=opset,
                    optimize=True,
                    verbose=False,
                    report=False,
                )
            proto = pin_ir_version(prog.model_proto)
            return proto, f"torch.onnx.export(dynamo=True), torch {torch.__version__}", notes
        except Exception as e:  # the exporter raises many types; the fallback must catch them all
            if exporter == "dynamo":
                raise ExportError(f"dynamo ONNX export failed: {type(e).__name__}: {e}") from e
            notes.append(f"dynamo exporter failed ({type(e).__name__}: {str(e)[:300]}); used the legacy one")
    return (
        pin_ir_version(legacy_export(wrapper, args, in_names, out_names, opset)),
        f"torch.onnx.export(dynamo=False), torch {torch.__version__}",
        notes,
    )


def legacy_export(
    wrapper: nn.Module, args: tuple, in_names: list[str], out_names: list[str], opset: int
) -> onnx.ModelProto:
    """The TorchScript exporter with every input and output's axis 0 dynamic ("batch")."""
    import io

    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            buf,
            dynamo=False,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes={n: {0: "batch"} for n in in_names + out_names},
            opset_version=opset,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def graph_sha256(proto: onnx.ModelProto) -> str:
    """Hash of the graph alone (metadata_props excluded): proves re-serialising changed only the card."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def _tmp_beside(out: Path) -> Path:
    return temp_beside(out, suffix=".tmp.onnx")


def _check_file(path: Path, card: ModelCard) -> None:
    import onnx

    from xbmd_batch.onnx_card import check_io_against_card, load_onnx_proto

    proto = load_onnx_proto(path)
    check_io_against_card(proto, card, source=str(path))
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path}: onnx.checker (full_check) rejected the graph: {e}") from e


def _write_checked(proto: onnx.ModelProto, card: ModelCard, tmp: Path) -> str:
    """Embed ``card``, write ``tmp``, check the file (I/O against the card, onnx.checker); returns the graph's
    hash, which the final write (``_finalize``) must still match after parity has run on ``tmp``."""
    from xbmd_batch.onnx_card import embed_card

    embed_card(proto, card)
    write_synced(tmp, proto.SerializeToString())
    _check_file(tmp, card)
    return graph_sha256(proto)


def _finalize(
    proto: onnx.ModelProto, card: ModelCard, tmp: Path, out: Path, tested_graph: str
) -> tuple[int, ModelCard]:
    """Embed the final card (its file size field converged to the real size), write tmp, verify, rename."""
    from xbmd_batch.onnx_card import embed_card, read_onnx_card

    size = 0
    data = b""
    final = card
    for _ in range(6):  # the size is inside the file: iterate to the fixed point (2-3 rounds)
        final = card.with_extra(export={**card.extra.get("export", {}), "file_size_bytes": size})
        embed_card(proto, final)
        data = proto.SerializeToString()
        if len(data) == size:
            break
        size = len(data)
    write_synced(tmp, data)
    import onnx

    again = onnx.load(os.fspath(tmp), load_external_data=False)
    if graph_sha256(again) != tested_graph:
        raise ExportError(f"{out}: graph changed between the parity check and the final write")
    if read_onnx_card(tmp) != final:
        raise ExportError(f"{out}: the embedded model card does not read back equal")
    commit(tmp, out)  # staged, verified, then renamed (the atomic-write steps of xbmd_batch.fsutil)
    return len(data), final


def export_onnx(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    parity_cohort: str | os.PathLike[str] | None = None,
    parity_feeds: Mapping[str, np.ndarray] | None = None,
    tolerance: float = FP32_TOLERANCE,
    fp16_tolerance: float = FP16_TOLERANCE,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    exporter: str = "auto",
    model_hook: Callable[[nn.Module], None] | None = None,
    log: Log | None = None,
) -> ExportResult:
    """Export, check and parity-test a checkpoint; write ``out`` (and ``*.fp16.onnx``) only if all pass.

    ``model_hook`` runs on the torch model after export and before parity (tests perturb a weight there to
    prove the check fails); ``parity_feeds`` replaces the synthetic-cohort inputs.
    """
    from xbmd_batch.checkpoint import load_model

    log = log or (lambda _m: None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, card = load_model(checkpoint)
    versions = tool_versions()
    card = dataclasses.replace(
        card, versions={**card.versions, **{k: v for k, v in versions.items() if k != "torch"}}
    )

    t0 = time.perf_counter()
    proto, exporter_used, notes = torch_to_onnx(model, card, opset, exporter)
    export_s = round(time.perf_counter() - t0, 3)
    for n in notes:
        log(n)
    log(f"exported with {exporter_used} in {export_s:.1f} s")
    export_info = {
        "exporter": exporter_used,
        "opset": opset,
        "example_batch": EXAMPLE_BATCH,
        "export_time_s": export_s,
        "created": now_iso(),
        "versions": versions,
        "checker": "onnx.checker.check_model(full_check=True) passed",
        "notes": notes,
    }
    card = card.with_extra(onnx_precision="fp32", export=export_info)

    if parity_feeds is None:
        feeds, inputs_desc = reference_feeds(card, max(batch_sizes), parity_cohort)
    else:
        feeds, inputs_desc = dict(parity_feeds), "caller-supplied feeds"

    result: ExportResult | None = None
    tmp = _tmp_beside(out)
    try:
        tested = _write_checked(proto, card, tmp)
        if model_hook is not None:
            model_hook(model)
        report = check_onnx_parity(
            model, card, tmp, feeds, tolerance=tolerance, batch_sizes=batch_sizes, inputs_desc=inputs_desc
        )
        log(report.summary())
        card = card.with_extra(parity=report.to_dict())
        size, card = _finalize(proto, card, tmp, out, tested)
        log(f"wrote {out} ({size / 1e6:.1f} MB)")
        result = ExportResult(out, card, exporter_used, export_s, size, report, notes=notes)
    finally:
        tmp.unlink(missing_ok=True)

    if fp16:
        _export_fp16(result, proto, model, feeds, inputs_desc, fp16_tolerance, batch_sizes, log)
    return result


def fp16_path_for(out: Path) -> Path:
    return out.with_name(f"{out.stem}.fp16.onnx")


def _export_fp16(
    result: ExportResult,
    proto32: onnx.ModelProto,
    model: nn.Module,
    feeds: Mapping[str, np.ndarray],
    inputs_desc: str,
    tolerance: float,
    batch_sizes: tuple[int, ...],
    log: Log,
) -> None:
    """The fp16 variant: same card (onnx_precision fp16, its own parity), converted graph, same checks."""
    from xbmd_batch.onnx_fp16 import to_fp16_onnx

    out16 = fp16_path_for(result.path)
    t0 = time.perf_counter()
    try:
        m16 = to_fp16_onnx(proto32, FP16_KEEP_FP32_OPS)
    except Exception as e:  # converter failures come as assorted types
        raise ExportError(f"fp16 conversion failed: {type(e).__name__}: {e}") from e
    conv_s = round(time.perf_counter() - t0, 3)
    export = {
        **result.card.extra["export"],
        "fp16_converter": "xbmd_batch.onnx_fp16.to_fp16_onnx (fp32 I/O, one shared Cast per tensor)",
        "fp16_fp32_ops": list(FP16_KEEP_FP32_OPS),
        "fp16_convert_time_s": conv_s,
    }
    base = {k: v for k, v in result.card.extra.items() if k != "parity"}
    card16 = dataclasses.replace(result.card, extra={**base, "onnx_precision": "fp16", "export": export})
    tmp = _tmp_beside(out16)
    try:
        tested = _write_checked(m16, card16, tmp)
        report = check_onnx_parity(
            model, card16, tmp, feeds, tolerance=tolerance, batch_sizes=batch_sizes, inputs_desc=inputs_desc
        )
        log("fp16: " + report.summary())
        card16 = card16.with_extra(parity=report.to_dict())
        size, card16 = _finalize(m16, card16, tmp, out16, tested)
        log(f"wrote {out16} ({size / 1e6:.1f} MB)")
    finally:
        tmp.unlink(missing_ok=True)
    result.fp16_path, result.fp16_parity, result.fp16_file_size_bytes = out16, report, size


__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportResult",
    "ParityError",
    "export_onnx",
    "fp16_path_for",
    "graph_sha256",
    "tool_versions",
    "torch_to_onnx",
]
