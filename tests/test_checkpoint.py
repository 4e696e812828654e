"""Checkpoint format and model card: round trip, clear errors for files that are not ours."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xbmd_batch.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    load_model,
    save_checkpoint,
    sha256_file,
)
from xbmd_batch.config import DEFAULT_SCHEMA, INPUT_NAMES, OUTPUT_NAMES, ModelConfig, PreprocessConfig
from xbmd_batch.errors import InputError, ModelFileError
from xbmd_batch.model import build_model
from xbmd_batch.modelcard import ModelCard, card_from_checkpoint

F = len(DEFAULT_SCHEMA.fields)
PRE = PreprocessConfig(image_size=64)


def tiny_cfg(fusion: str = "xattn") -> ModelConfig:
    return ModelConfig.for_schema(
        DEFAULT_SCHEMA, fusion=fusion, image_size=64, d_model=32, meta_hidden=16, head_hidden=16
    )


def inputs(b: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    meta = torch.randn(b, F, generator=g)
    meta[:, 0] = 1.0
    meta[:, 6] = 2.0
    mask = torch.ones(b, F)
    mask[0, 4] = 0.0
    return torch.randn(b, 1, 64, 64, generator=g), meta, mask


def saved(tmp_path: Path, fusion: str = "xattn") -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = tiny_cfg(fusion)
    model = build_model(cfg)
    # move weights and BatchNorm stats off their init, so a rebuilt-but-unloaded model would differ
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    model(*inputs(4))
    model.eval()
    summary = {"val_mae": np.float32(0.05), "folds": np.arange(3), "note": "synthetic"}
    path = save_checkpoint(tmp_path / "sub" / "m.pt", model, cfg, DEFAULT_SCHEMA, PRE, summary)
    return path, model


@pytest.mark.parametrize("fusion", ["xattn", "concat"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, fusion: str) -> None:
    path, model = saved(tmp_path, fusion)
    loaded, card = load_model(path)
    assert not loaded.training
    assert type(loaded) is type(model)
    with torch.no_grad():
        a, att_a = model(*inputs(), return_attention=True)
        b, att_b = loaded(*inputs(), return_attention=True)
    assert torch.equal(a, b) and torch.equal(att_a, att_b)
    assert card.model_config == tiny_cfg(fusion)
    assert card.schema == DEFAULT_SCHEMA and card.preprocess == PRE
    assert card.has_attention is (fusion == "xattn")
    assert card.training_summary == {"val_mae": pytest.approx(0.05), "folds": [0, 1, 2], "note": "synthetic"}
    assert card.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert card.versions["torch"] == str(torch.__version__)
    assert card.input_names == INPUT_NAMES and card.output_names == OUTPUT_NAMES


def test_checkpoint_dict_format(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["format_version"] == 1
    for key in ("state_dict", "model_config", "metadata_schema", "preprocess", "training_summary", "created"):
        assert key in ckpt
    assert ckpt["metadata_schema"]["fields"][1]["unit"] == "years"
    # weights_only really is enough to read it (no pickled classes inside)
    torch.load(path, weights_only=True)


def test_save_is_atomic_and_overwrites(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    first = sha256_file(path)
    path2, _ = saved(tmp_path, "concat")  # same path, different model
    assert path2 == path and sha256_file(path) != first
    assert os.listdir(path.parent) == ["m.pt"]  # no temp files left behind


def test_save_rejects_mismatched_schema_and_preprocess(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    model = build_model(cfg)
    other = type(DEFAULT_SCHEMA)(fields=DEFAULT_SCHEMA.fields[:-1])
    with pytest.raises(ValueError, match="differ from schema"):
        save_checkpoint(tmp_path / "a.pt", model, cfg, other, PRE)
    with pytest.raises(ValueError, match="image_size"):
        save_checkpoint(tmp_path / "a.pt", model, cfg, DEFAULT_SCHEMA, PreprocessConfig(image_size=224))
    assert not list(tmp_path.iterdir())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ModelFileError, match=r"junk\.pt: cannot read"):
        load_checkpoint(junk)
    path, _ = saved(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="cannot read"):
        load_model(cut)


class _Foreign:
    pass


def test_files_that_are_not_ours(tmp_path: Path) -> None:
    p = tmp_path / "other.pt"
    torch.save({"state_dict": {}, "epoch": 3}, p)  # someone else's checkpoint
    with pytest.raises(ModelFileError, match="not an xbmd-batch checkpoint"):
        load_checkpoint(p)
    torch.save(torch.zeros(3), p)  # a bare tensor
    with pytest.raises(ModelFileError, match="not an xbmd-batch checkpoint"):
        load_checkpoint(p)
    torch.save({"format": CHECKPOINT_FORMAT, "x": _Foreign()}, p)  # needs code to unpickle: refused
    with pytest.raises(ModelFileError, match="cannot read"):
        load_checkpoint(p)
    assert issubclass(ModelFileError, InputError)  # the CLI maps it to exit code 2


def test_future_version_and_mismatched_weights(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    ckpt = load_checkpoint(path)
    torch.save({**ckpt, "format_version": 99}, path)
    with pytest.raises(ModelFileError, match="format_version 99"):
        load_checkpoint(path)
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "d_model": 64}}, path)
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(path)
    del ckpt["preprocess"]
    torch.save(ckpt, path)
    with pytest.raises(ModelFileError, match="lacks preprocess"):
        load_checkpoint(path)


def test_model_card_json_round_trip(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    card = card_from_checkpoint(load_checkpoint(path), "abc123").with_extra(onnx_max_abs_diff=1e-6)
    again = ModelCard.from_json(card.to_json())
    assert again == card
    d = card.to_dict()
    for key in ("model_config", "metadata_schema", "preprocess", "training_summary", "t_score_references"):
        assert key in d
    assert d["t_score_references"]["nhanes3-hologic"]["mean"] == pytest.approx(0.858)
    assert d["extra"]["onnx_max_abs_diff"] == 1e-6
    with pytest.raises(ModelFileError, match="not an xbmd-batch model card"):
        ModelCard.from_dict({**d, "format": "something-else"})
    with pytest.raises(ModelFileError, match="lacks metadata_schema"):
        ModelCard.from_dict({k: v for k, v in d.items() if k != "metadata_schema"})
    with pytest.raises(ModelFileError, match="not valid JSON"):
        ModelCard.from_json("{nope")


def test_modelcard_does_not_import_torch() -> None:
    code = "import sys, xbmd_batch.modelcard; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kind", ["xattn", "concat", "members"])
def test_checkpoint_model_is_built_without_init_and_keeps_its_buffers(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model_from_checkpoint builds on the meta device and takes the checkpoint's tensors (no random init,
    no copy): nothing may be left on meta, the config-derived buffers must be the plain build's, and the
    outputs identical; one build only (the plain-build fallback is not taken)."""
    import xbmd_batch.model as model_mod
    from xbmd_batch.checkpoint import model_from_checkpoint

    torch.manual_seed(0)
    cfg = tiny_cfg("concat" if kind == "concat" else "xattn")
    if kind == "members":
        cfg = ModelConfig(**{**cfg.__dict__, "n_members": 2})
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, cfg, DEFAULT_SCHEMA, PRE, {})
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    builds: list[object] = []
    real = model_mod.build_model
    monkeypatch.setattr(model_mod, "build_model", lambda c: builds.append(c) or real(c))
    loaded = model_from_checkpoint(ckpt, card_from_checkpoint(ckpt, sha256_file(path)), path)
    assert len(builds) == 1
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    want = dict(model.named_buffers())
    for name, b in loaded.named_buffers():
        assert torch.equal(b, want[name]), name
    with torch.no_grad():
        assert torch.equal(model(*inputs()), loaded(*inputs()))
