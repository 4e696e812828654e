"""ONNX export: round trip for both fusion types, embedded card, dynamic batch, parity that can fail, errors.

Tiny models (64 px, d_model 32, random weights) saved through checkpoint.save_checkpoint; the resnet34 trunk
keeps its full width, so one export takes ~5-20 s on 2 shared cores: fixtures are module-scoped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.__main__ import get_args_parser, main
from export.onnx_export import export_onnx, fp16_path_for, graph_sha256
from export.parity import ParityError, check_onnx_parity
from xbmd_batch.checkpoint import save_checkpoint, sha256_file
from xbmd_batch.config import DEFAULT_SCHEMA, INPUT_NAMES, OUTPUT_NAMES, ModelConfig, PreprocessConfig
from xbmd_batch.errors import ModelFileError
from xbmd_batch.model import ExportWrapper, build_model
from xbmd_batch.onnx_card import CARD_KEY, check_io_against_card, embed_card, read_onnx_card
from xbmd_batch.parity_feeds import make_reference_feeds

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (CPU) is needed for export parity")

SIZE = 64


def _tiny_checkpoint(path: Path, fusion: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig.for_schema(DEFAULT_SCHEMA, fusion=fusion, image_size=SIZE, d_model=32)
    model = build_model(cfg)
    return save_checkpoint(
        path, model, cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=SIZE), {"note": "random weights (test)"}
    )


@pytest.fixture(scope="module")
def feeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Real preprocessed synthetic inputs (a tiny generated cohort), 32 rows."""
    ckpt = _tiny_checkpoint(tmp_path_factory.mktemp("feeds") / "m.pt", "xattn")
    from xbmd_batch.checkpoint import load_model

    _, card = load_model(ckpt)
    return make_reference_feeds(card, n=32)


@pytest.fixture(scope="module")
def xattn_export(tmp_path_factory: pytest.TempPathFactory, feeds: dict[str, np.ndarray]):
    d = tmp_path_factory.mktemp("xattn")
    ckpt = _tiny_checkpoint(d / "xattn.pt", "xattn")
    res = export_onnx(ckpt, d / "model.onnx", fp16=True, parity_feeds=feeds)
    return ckpt, res


@pytest.fixture(scope="module")
def concat_export(tmp_path_factory: pytest.TempPathFactory):
    """Through the CLI (``main``) and the default parity inputs (a generated synthetic cohort)."""
    d = tmp_path_factory.mktemp("concat")
    ckpt = _tiny_checkpoint(d / "concat.pt", "concat", seed=1)
    out = d / "model.onnx"
    assert main(["onnx", str(ckpt), "--out", str(out)]) == 0
    return ckpt, out


def test_xattn_round_trip_card_and_parity(xattn_export) -> None:
    ckpt, res = xattn_export
    card = read_onnx_card(res.path)
    assert card == res.card
    assert card.checkpoint_sha256 == sha256_file(ckpt)
    assert card.model_config.fusion == "xattn" and card.has_attention
    assert "nhanes3-hologic" in card.t_score_references and "lunar" in card.t_score_references
    assert {"onnx", "onnxruntime", "xbmd_batch"} <= set(card.versions)
    assert card.training_summary == {"note": "random weights (test)"}
    parity = card.extra["parity"]
    assert set(parity["batches"]) == {"1", "3", "32"}
    assert parity["passed"] and parity["max_abs_bmd"] <= 1e-4
    assert card.extra["export"]["file_size_bytes"] == os.path.getsize(res.path) == res.file_size_bytes
    assert "dynamo=True" in card.extra["export"]["exporter"]
    proto = onnx.load(str(res.path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert any(n.op_type == "LayerNormalization" for n in proto.graph.node)  # opset >= 17: one op
    onnx.checker.check_model(str(res.path), full_check=True)
    assert not [p for p in res.path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_concat_round_trip_via_cli(concat_export) -> None:
    _, out = concat_export
    card = read_onnx_card(out)
    assert card.model_config.fusion == "concat" and not card.has_attention
    assert card.extra["parity"]["passed"]
    assert "synthetic cohort" in card.extra["parity"]["inputs"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)


@pytest.mark.parametrize("which", ["xattn", "concat"])
def test_dynamic_batch_matches_torch(which: str, xattn_export, concat_export, feeds) -> None:
    ckpt, path = (xattn_export[0], xattn_export[1].path) if which == "xattn" else concat_export
    from xbmd_batch.checkpoint import load_model

    model, card = load_model(ckpt)
    proto = onnx.load(str(path), load_external_data=False)
    for v in list(proto.graph.input) + list(proto.graph.output):
        assert v.type.tensor_type.shape.dim[0].dim_param, f"{v.name}: batch axis is not symbolic"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = ExportWrapper(model).eval()
    for b in (1, 3, 5):
        sub = {k: v[:b] for k, v in feeds.items()}
        bmd, attn = sess.run(list(OUTPUT_NAMES), sub)
        with torch.inference_mode():
            ref = wrapper(*(torch.from_numpy(sub[n]) for n in INPUT_NAMES))
        assert bmd.shape == (b,) and attn.shape == (b, card.model_config.n_fields)
        np.testing.assert_allclose(bmd, ref[0].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(attn.sum(1), 1.0, atol=1e-5)


def test_fp16_variant(xattn_export) -> None:
    _, res = xattn_export
    assert res.fp16_path == fp16_path_for(res.path) and res.fp16_path.is_file()
    card16 = read_onnx_card(res.fp16_path)
    assert card16.extra["onnx_precision"] == "fp16"
    assert card16.extra["parity"]["passed"] and card16.extra["parity"]["tolerance"] == 5e-3
    assert card16.extra["parity"]["max_abs_bmd"] <= 5e-3
    proto = onnx.load(str(res.fp16_path))
    types = {i.type.tensor_type.elem_type for i in proto.graph.input}
    assert types == {onnx.TensorProto.FLOAT}  # I/O stay fp32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert res.fp16_file_size_bytes < 0.6 * res.file_size_bytes


def test_written_models_have_the_project_ir_version(xattn_export) -> None:
    """D5: the IR version is set by the project, not by whichever onnx/torch wrote the file (onnx 1.23's
    default, 14, does not load in onnxruntime-gpu 1.31.1)."""
    from xbmd_batch.onnx_fp16 import ONNX_IR_VERSION

    _, res = xattn_export
    for path in (res.path, res.fp16_path):
        assert onnx.load(str(path), load_external_data=False).ir_version == ONNX_IR_VERSION


def test_parity_check_fails_on_perturbed_weight(xattn_export, feeds) -> None:
    """The same check that gates the export must fail when torch and the graph differ."""
    ckpt, res = xattn_export
    from xbmd_batch.checkpoint import load_model

    model, card = load_model(ckpt)
    ok = check_onnx_parity(model, card, res.path, feeds, batch_sizes=(1, 3))
    assert ok.passed
    with torch.no_grad():
        model.head.net[-1].bias.add_(0.01)  # shifts BMD by 0.14 * 0.01 = 1.4e-3 g/cm^2
    with pytest.raises(ParityError, match="parity check failed"):
        check_onnx_parity(model, card, res.path, feeds, batch_sizes=(1, 3))


def test_failed_parity_leaves_no_file(tmp_path: Path, feeds) -> None:
    ckpt = _tiny_checkpoint(tmp_path / "c.pt", "concat", seed=2)
    out = tmp_path / "out" / "model.onnx"

    def perturb(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model.head.net[-1].bias.add_(0.01)

    with pytest.raises(ParityError):
        export_onnx(ckpt, out, parity_feeds=feeds, model_hook=perturb, batch_sizes=(1, 3))
    assert list(out.parent.iterdir()) == []  # neither the output nor a temp file


def test_cli_exit_codes(tmp_path: Path, feeds) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    assert main(["onnx", str(text), "--out", str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "m.onnx").exists()
    assert main(["tensorrt", str(text)]) == 2  # not an ONNX file: refused before any TensorRT import


def test_cli_help_has_examples() -> None:
    parser = get_args_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert "example:" in (p.epilog or ""), name


# ------------------------------------------------------------------------------------------ card errors


def test_not_onnx_files_are_refused(tmp_path: Path, xattn_export) -> None:
    text = tmp_path / "a.onnx"
    text.write_text("hello, I am not a model\n")
    with pytest.raises(ModelFileError, match="a.onnx"):
        read_onnx_card(text)
    junk = tmp_path / "b.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFileError, match="b.onnx"):
        read_onnx_card(junk)
    ckpt, _ = xattn_export
    with pytest.raises(ModelFileError, match="checkpoint"):
        read_onnx_card(ckpt)
    with pytest.raises(ModelFileError, match="not found"):
        read_onnx_card(tmp_path / "missing.onnx")


def test_onnx_without_card_is_refused(tmp_path: Path, xattn_export) -> None:
    _, res = xattn_export
    proto = onnx.load(str(res.path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelFileError, match="no xbmd-batch model card"):
        read_onnx_card(bare)
    from xbmd_batch.infer.select import open_runner

    with pytest.raises(ModelFileError, match="bare.onnx"):
        open_runner(bare)


def test_embed_card_replaces_and_round_trips(xattn_export) -> None:
    _, res = xattn_export
    proto = onnx.load(str(res.path), load_external_data=False)
    card = res.card.with_extra(note="x")
    before = graph_sha256(proto)
    embed_card(proto, card)
    embed_card(proto, card)
    assert [p.key for p in proto.metadata_props].count(CARD_KEY) == 1
    assert (
        json.loads(next(p.value for p in proto.metadata_props if p.key == CARD_KEY))["extra"]["note"] == "x"
    )
    assert graph_sha256(proto) == before


def test_mismatched_io_is_refused(tmp_path: Path, xattn_export) -> None:
    _, res = xattn_export
    proto = onnx.load(str(res.path))
    # renamed input
    renamed = onnx.ModelProto()
    renamed.CopyFrom(proto)
    renamed.graph.input[1].name = "metadata"
    for node in renamed.graph.node:
        for i, x in enumerate(node.input):
            if x == "meta":
                node.input[i] = "metadata"
    with pytest.raises(ModelFileError, match="inputs are"):
        check_io_against_card(renamed, res.card, source="renamed.onnx")
    path = tmp_path / "renamed.onnx"
    onnx.save(renamed, str(path))
    from xbmd_batch.infer.select import open_runner

    with pytest.raises(ModelFileError, match="renamed.onnx"):
        open_runner(path, backend="onnxruntime")
    # card says another image size
    import dataclasses

    other = dataclasses.replace(
        res.card, model_config=dataclasses.replace(res.card.model_config, image_size=128)
    )
    with pytest.raises(ModelFileError, match="dim 2 is 64"):
        check_io_against_card(proto, other)
    # a baked batch size
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(ModelFileError, match="fixed batch size 2"):
        check_io_against_card(fixed, res.card)


def test_package_never_imports_export_or_train() -> None:
    """export/ and train/ need not ship in the wheel: the installed package must not reach them."""
    import re

    root = Path(__file__).resolve().parents[1] / "xbmd_batch"
    pat = re.compile(r"^\s*(from|import)\s+(export|train)(\.|\s|$)", re.M)
    offenders = [str(p) for p in root.rglob("*.py") if pat.search(p.read_text())]
    assert offenders == []
