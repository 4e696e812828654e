"""CLI skeleton: help, version, doctor; --help stays free of heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from xbmd_batch import __version__
from xbmd_batch.cli import app

runner = CliRunner()


def test_help() -> None:
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0, r.output
    assert "doctor" in r.output and "version" in r.output


def test_version() -> None:
    r = runner.invoke(app, ["version"])
    assert r.exit_code == 0, r.output
    assert __version__ in r.output


def test_doctor_tables() -> None:
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0, r.output
    for word in ("torch", "onnxruntime", "TensorRT", "1.2.840.10008.1.2.1 "):
        assert word in r.output


def test_doctor_json() -> None:
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["torch"]["installed"] is True
    assert info["tensorrt"]["installed"] in (True, False)
    uids = {row["uid"]: row for row in info["dicom_decoders"]}
    assert uids["1.2.840.10008.1.2.1"]["available"] is True  # Explicit VR Little Endian needs no plugin


def test_help_does_not_import_heavy_packages() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from xbmd_batch.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = {'torch', 'onnxruntime', 'tensorrt', 'onnx', 'torchvision'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"--help imported {out.stdout.strip()}"
