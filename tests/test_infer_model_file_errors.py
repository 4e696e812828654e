"""Model-file abuse names the right format (issue 13, attack 6.3): a truncated .pt is a checkpoint problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from xbmd_batch.errors import ModelFileError
from xbmd_batch.infer.model_file import open_model


@pytest.mark.parametrize("keep", [0.5, 0.1])
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_truncated_checkpoint_is_a_checkpoint_error(
    tiny_model: Path, tmp_path: Path, keep: float, suffix: str
):
    data = tiny_model.read_bytes()
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError) as ei:
        _ = open_model(bad).card
    msg = str(ei.value)
    assert "checkpoint" in msg and "ONNX" not in msg, msg
    assert "truncated" in msg


def test_text_named_pt_says_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    p.write_text("not a model")
    with pytest.raises(ModelFileError, match="not a readable xbmd-batch checkpoint"):
        _ = open_model(p).card
