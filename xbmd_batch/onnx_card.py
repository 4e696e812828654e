"""The model card inside an ONNX file's ``metadata_props``, and checks that the graph matches it.

An exported ``.onnx`` carries the same card as the checkpoint (``xbmd_batch.modelcard``) as JSON under
``CARD_KEY``, so ``score`` needs nothing but the file. ``onnx`` is imported inside functions so the CLI's
``--help`` path stays light.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xbmd_batch.errors import ModelFileError

if TYPE_CHECKING:
    import onnx

    from xbmd_batch.modelcard import ModelCard

CARD_KEY = "xbmd_batch.model_card"

# One dimension as reported by onnx / onnxruntime / TensorRT: an int, a symbolic name, or None/-1 (dynamic).
Dim = int | str | None


def embed_card(model_proto: onnx.ModelProto, card: ModelCard | dict[str, Any]) -> onnx.ModelProto:
    """Put the card JSON into ``metadata_props`` (replacing an older one) and return the same proto."""
    d = card if isinstance(card, dict) else card.to_dict()
    text = json.dumps(d, sort_keys=True)
    for i, prop in enumerate(model_proto.metadata_props):
        if prop.key == CARD_KEY:
            del model_proto.metadata_props[i]
            break
    entry = model_proto.metadata_props.add()
    entry.key = CARD_KEY
    entry.value = text
    return model_proto


def card_dict_from_proto(model_proto: onnx.ModelProto) -> dict[str, Any] | None:
    """The raw card dict, or None when the proto carries no card."""
    for prop in model_proto.metadata_props:
        if prop.key == CARD_KEY:
            return json.loads(prop.value)
    return None


def load_onnx_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX file without its external weights; ModelFileError naming the file if it is not ONNX.

    Protobuf parsing is lenient (some random bytes decode to an empty message), so a parse without a graph
    or an opset counts as "not ONNX" too.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path}: this is a zip archive (a PyTorch checkpoint?), not an ONNX file; "
            f"export it with `python -m export onnx {path} --out model.onnx` or pass it as a checkpoint"
        )
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelFileError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from e
    if proto.ir_version <= 0 or not proto.opset_import or len(proto.graph.node) == 0:
        raise ModelFileError(f"{path}: not an ONNX model (no graph / opset in the file)")
    return proto


def read_onnx_card(path: str | os.PathLike[str]) -> ModelCard:
    """The ModelCard embedded in an exported ONNX file (ModelFileError when absent or invalid)."""
    return card_from_proto(load_onnx_proto(path), path)


def card_from_proto(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> ModelCard:
    """The ModelCard embedded in an already parsed ONNX proto read from ``path`` (named in errors)."""
    from xbmd_batch.modelcard import ModelCard

    try:
        d = card_dict_from_proto(proto)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: the embedded model card ({CARD_KEY}) is not valid JSON: {e}") from e
    if d is None:
        keys = [p.key for p in proto.metadata_props]
        raise ModelFileError(
            f"{path}: ONNX file has no xbmd-batch model card (metadata_props key {CARD_KEY!r}; found "
            f"{keys or 'none'}); export it with `python -m export onnx CHECKPOINT --out {Path(path).name}`"
        )
    return ModelCard.from_dict(d, source=str(path))


def expected_io(card: ModelCard) -> tuple[dict[str, tuple[Dim, ...]], dict[str, tuple[Dim, ...]]]:
    """(inputs, outputs): name -> shape, None for the dynamic batch axis (docs/ARCHITECTURE.md)."""
    cfg = card.model_config
    s, f, c = cfg.image_size, cfg.n_fields, cfg.in_chans
    in_names, out_names = tuple(card.input_names), tuple(card.output_names)
    if len(in_names) != 3 or len(out_names) != 2:
        raise ModelFileError(f"model card names {in_names} -> {out_names}; expected 3 inputs and 2 outputs")
    inputs = {in_names[0]: (None, c, s, s), in_names[1]: (None, f), in_names[2]: (None, f)}
    outputs: dict[str, tuple[Dim, ...]] = {out_names[0]: (None,), out_names[1]: (None, f)}
    for name in extra_output_names(card):  # e.g. a fold ensemble's bmd_sd_models [B]
        outputs[name] = (None,)
    return inputs, outputs


def extra_output_names(card: ModelCard) -> list[str]:
    """Per-image outputs beyond bmd and field_attention that the graph also returns (``export --ensemble``
    adds ``bmd_sd_models``); runners pass them through and `score` writes them."""
    return [str(n) for n in (card.extra.get("ensemble") or {}).get("extra_outputs", [])]


def _is_dynamic(d: Dim) -> bool:
    return d is None or isinstance(d, str) or (isinstance(d, int) and d < 0)


def _io_of(obj: Any) -> tuple[list[tuple[str, tuple[Dim, ...], str]], list[tuple[str, tuple[Dim, ...], str]]]:
    """(name, shape, element type) of inputs and outputs of an ORT session or an ONNX ModelProto."""
    if hasattr(obj, "get_inputs") and hasattr(obj, "get_outputs"):  # onnxruntime.InferenceSession

        def ort(args: Sequence[Any]) -> list[tuple[str, tuple[Dim, ...], str]]:
            return [(a.name, tuple(a.shape), str(a.type)) for a in args]

        return ort(obj.get_inputs()), ort(obj.get_outputs())
    if hasattr(obj, "graph"):  # onnx.ModelProto
        import onnx

        init = {t.name for t in obj.graph.initializer}

        def proto(values: Sequence[Any]) -> list[tuple[str, tuple[Dim, ...], str]]:
            out = []
            for v in values:
                if v.name in init:
                    continue
                tt = v.type.tensor_type
                dims: list[Dim] = []
                for d in tt.shape.dim:
                    if d.HasField("dim_value"):
                        dims.append(int(d.dim_value))
                    elif d.HasField("dim_param"):
                        dims.append(d.dim_param)
                    else:
                        dims.append(None)
                etype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
                out.append((v.name, tuple(dims), etype))
            return out

        return proto(obj.graph.input), proto(obj.graph.output)
    raise TypeError(f"expected an onnxruntime session or an onnx.ModelProto, got {type(obj).__name__}")


def check_io_against_card(session_or_model: Any, card: ModelCard, source: str = "model") -> None:
    """Refuse a graph whose input/output names, ranks, fixed dims or float types differ from the card.

    The batch axis must be dynamic: a graph exported with a baked batch size would fail (or silently
    broadcast) on the last partial batch. ``source`` names the file in the message.
    """
    inputs, outputs = _io_of(session_or_model)
    check_io_shapes(
        {n: s for n, s, _ in inputs},
        {n: s for n, s, _ in outputs},
        card,
        source,
        dtypes={n: t for n, _, t in inputs + outputs},
    )


def check_io_shapes(
    inputs: dict[str, tuple[Dim, ...]],
    outputs: dict[str, tuple[Dim, ...]],
    card: ModelCard,
    source: str = "model",
    dtypes: dict[str, str] | None = None,
) -> None:
    """The backend-neutral core of ``check_io_against_card`` (TensorRT engines use it too)."""
    exp_in, exp_out = expected_io(card)
    problems: list[str] = []
    for kind, got, exp in (("inputs", inputs, exp_in), ("outputs", outputs, exp_out)):
        if list(got) != list(exp):
            problems.append(f"{kind} are {list(got)}, the model card expects {list(exp)}")
            continue
        for name, shape in got.items():
            want = exp[name]
            if len(shape) != len(want):
                problems.append(f"{name} has rank {len(shape)} {list(shape)}, expected {_fmt(want)}")
                continue
            if not _is_dynamic(shape[0]):
                problems.append(
                    f"{name} has a fixed batch size {shape[0]} (expected a dynamic batch axis; re-export)"
                )
            for i, (g, w) in enumerate(zip(shape[1:], want[1:], strict=True), start=1):
                if isinstance(g, int) and g >= 0 and g != w:
                    problems.append(f"{name} dim {i} is {g}, the model card says {w} ({_fmt(want)})")
    for name, t in (dtypes or {}).items():
        if t not in ("tensor(float)", "float32"):
            problems.append(f"{name} has element type {t}, expected float32")
    if problems:
        raise ModelFileError(f"{source}: graph does not match its model card: " + "; ".join(problems))


def _fmt(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("B" if d is None else str(d) for d in shape) + "]"
