"""The model file is opened once: kind by content, one parse/load, one sha256 per `score` run, and the
onnxruntime path never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xbmd_batch.errors import ModelFileError
from xbmd_batch.infer.model_file import open_model


def _count_model_reads(monkeypatch: pytest.MonkeyPatch, model: Path) -> dict[str, int]:
    """Counters of ONNX parses, torch.loads and sha256 passes of ``model`` from now on (every bound copy of
    ``sha256_file`` in the package is wrapped, wherever it was imported)."""
    import onnx
    import torch

    counts = {"onnx_parse": 0, "torch_load": 0, "sha256": 0}
    target = model.resolve()

    def counted(key: str, fn):
        def wrapper(f, *a, **k):
            if isinstance(f, str | os.PathLike) and Path(f).resolve() == target:
                counts[key] += 1
            return fn(f, *a, **k)

        return wrapper

    monkeypatch.setattr(onnx, "load", counted("onnx_parse", onnx.load))
    monkeypatch.setattr(onnx, "load_model", counted("onnx_parse", onnx.load_model))
    monkeypatch.setattr(torch, "load", counted("torch_load", torch.load))
    import xbmd_batch.fsutil
    import xbmd_batch.score.pipeline  # noqa: F401  (loaded now, so its bound imports are wrapped too)

    original = xbmd_batch.fsutil.sha256_file
    wrapped = counted("sha256", original)
    for name, mod in list(sys.modules.items()):
        if name.startswith("xbmd_batch") and getattr(mod, "sha256_file", None) is original:
            monkeypatch.setattr(mod, "sha256_file", wrapped)
    return counts


@pytest.mark.parametrize("kind", ["onnx", "checkpoint"])
def test_one_score_run_reads_the_model_file_once(
    kind: str, tiny_model: Path, tiny_onnx: Path, cohort_session: Path, tmp_path: Path, monkeypatch
) -> None:
    from xbmd_batch.score import ScoreOptions, score_cohort

    model = tiny_onnx if kind == "onnx" else tiny_model
    counts = _count_model_reads(monkeypatch, model)
    res = score_cohort(
        cohort_session / "dicom",
        cohort_session / "meta.csv",
        model,
        tmp_path / "out",
        ScoreOptions(quiet=True, workers=0, batch_size=8),
    )
    assert res.exit_code in (0, 3) and res.counts["scored"] > 0
    # before issue 9: ONNX 3 parses + 2 hashes; checkpoint 2 torch.loads + 4 hashes
    want = {"onnx_parse": 1, "torch_load": 0} if kind == "onnx" else {"onnx_parse": 0, "torch_load": 1}
    assert counts == {**want, "sha256": 1}


def test_open_model_by_content_and_cached(tiny_model: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "model.bin"  # the extension does not matter
    renamed.write_bytes(tiny_onnx.read_bytes())
    m = open_model(renamed)
    assert m.kind == "onnx" and m.card.input_names == ("image", "meta", "meta_mask")
    assert m.card is m.card and m.sha256 == m.sha256 and open_model(m) is m
    ck = open_model(tiny_model)
    assert ck.kind == "checkpoint" and zipfile.is_zipfile(ck.path)
    assert ck.card.checkpoint_sha256 == ck.sha256
    with pytest.raises(ModelFileError, match="no ONNX graph"):
        ck.proto  # noqa: B018
    junk = tmp_path / "junk.onnx"
    junk.write_text("definitely not protobuf")
    with pytest.raises(ModelFileError, match="junk.onnx"):
        open_model(junk)
    with pytest.raises(ModelFileError, match="not found"):
        open_model(tmp_path / "missing.pt")


def test_release_proto_reparses_on_demand_and_checks_the_file(tiny_onnx: Path, tmp_path: Path) -> None:
    """``score`` drops the parsed graph after setup (the weights would stay in memory twice); a later user
    (TensorRT's builder on a cache miss) gets it parsed again, but not from a file changed since."""
    import onnx

    path = tmp_path / "m.onnx"
    path.write_bytes(tiny_onnx.read_bytes())
    m = open_model(path)
    n_nodes = len(m.proto.graph.node)
    card = m.card
    m.release_proto()
    assert m._proto is None and m.card is card
    assert len(m.proto.graph.node) == n_nodes  # parsed again
    m.release_proto()
    proto = onnx.load(str(path))
    proto.doc_string = "changed"
    onnx.save(proto, str(path))
    with pytest.raises(ModelFileError, match="changed since it was opened"):
        m.proto  # noqa: B018


def test_onnxruntime_path_does_not_import_torch(tiny_onnx: Path) -> None:
    """Opening an ONNX model and running it on onnxruntime-CPU must not pay for importing torch."""
    pytest.importorskip("onnxruntime")
    code = (
        "import sys, numpy as np\n"
        "from xbmd_batch.infer.select import open_runner\n"
        f"with open_runner({str(tiny_onnx)!r}, device='cpu') as r:\n"
        "    f = r.card.model_config.n_fields; s = r.card.model_config.image_size\n"
        "    z = lambda *shape: np.zeros(shape, np.float32)\n"
        "    out = r.infer({'image': z(2, 1, s, s), 'meta': z(2, f), 'meta_mask': z(2, f)})\n"
        "    assert out['bmd'].shape == (2,), out\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
