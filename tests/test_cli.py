"""CLI: help, version, doctor; --help stays free of heavy imports; option checks and the error mapper."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from xbmd_batch import __version__
from xbmd_batch.cli import _check_device, app
from xbmd_batch.errors import InputError, TensorRTUnavailableError

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


def test_option_typos_exit_2_before_out_is_touched(tmp_path: Path) -> None:
    """A mistyped vocabulary option fails in the parser: exit 2, and --out is never created."""
    (tmp_path / "dicom").mkdir()
    (tmp_path / "meta.csv").write_text("subject_id\nS1\n")
    base = ["score", str(tmp_path / "dicom"), str(tmp_path / "meta.csv"), "-m", str(tmp_path / "m.pt")]
    for bad in (
        ["--backend", "onnxrutime"],
        ["--precision", "fp8"],
        ["--reference", "nhanes"],
        ["--device", "gpu"],
        ["--device", "cuda:x"],
    ):
        out = tmp_path / f"out_{bad[1]}"
        r = runner.invoke(app, [*base, "--out", str(out), *bad])
        assert r.exit_code == 2, (bad, r.output)
        assert bad[1] in r.output
        assert not out.exists(), f"{bad} created {out}"


def test_device_accepts_cuda_index() -> None:
    assert _check_device("cuda:1") == "cuda:1"
    assert [_check_device(d) for d in ("auto", "cpu", "cuda")] == ["auto", "cpu", "cuda"]
    with pytest.raises(typer.BadParameter):
        _check_device("cuda:")


def test_errors_map_to_exit_codes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """InputError -> 2, any other XbmdError (TensorRT missing) -> 1 with one line, Ctrl-C -> 130."""
    import xbmd_batch.score as score_pkg

    args = [
        "score",
        str(tmp_path),
        str(tmp_path / "m.csv"),
        "-m",
        str(tmp_path / "m.pt"),
        "-o",
        str(tmp_path / "o"),
    ]
    for exc, code, text in (
        (InputError("meta.csv: row 3: bad"), 2, "error: meta.csv: row 3: bad"),
        (TensorRTUnavailableError("TensorRT is not installed"), 1, "error: TensorRT is not installed"),
        (KeyboardInterrupt(), 130, "rerun the same command to resume"),
    ):

        def fail(*a: object, exc: BaseException = exc, **k: object) -> None:
            raise exc

        monkeypatch.setattr(score_pkg, "score_cohort", fail)
        r = runner.invoke(app, args)
        assert r.exit_code == code, r.output
        assert text in r.output and "Traceback" not in r.output


def test_synth_bad_parameter_exits_2(tmp_path: Path) -> None:
    r = runner.invoke(app, ["synth", str(tmp_path / "c"), "--n", "0", "--quiet"])
    assert r.exit_code == 2, r.output
    assert "error: synth:" in r.output


def test_cli_makes_idle_openmp_threads_sleep_unless_the_user_chose() -> None:
    """torch's OpenMP threads must not spin next to the decode workers (OMP_WAIT_POLICY is read when torch
    loads, so the CLI module sets it at import); a user's own value is kept."""
    import os
    import subprocess
    import sys

    code = "import xbmd_batch.cli, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


class _HardExit(Exception):
    pass


def _entry_with(monkeypatch: pytest.MonkeyPatch, app_exit: object) -> tuple[list[object], list[str]]:
    """Run ``cli.entry`` with ``app`` replaced by one that exits with ``app_exit``; os._exit recorded."""
    import xbmd_batch.cli as cli

    calls: list[object] = []
    order: list[str] = []

    def fake_app() -> None:
        raise SystemExit(app_exit)

    def fake_exit(code: int) -> None:
        order.append("os._exit")
        calls.append(code)
        raise _HardExit

    monkeypatch.setattr(cli, "app", fake_app)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: order.append("atexit"))
    with pytest.raises(_HardExit):
        cli.entry()
    return calls, order


def test_entry_skips_teardown_after_running_the_exit_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, order = _entry_with(monkeypatch, 3)
    assert calls == [3] and order == ["atexit", "os._exit"]
    calls, _ = _entry_with(monkeypatch, None)
    assert calls == [0]


def test_entry_prints_a_string_exit_and_returns_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls, _ = _entry_with(monkeypatch, "boom: stopped")
    assert calls == [1]
    assert "boom: stopped" in capsys.readouterr().err


def test_entry_exits_normally_while_another_thread_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    """A live thread keeps the normal exit (which waits for it): os._exit would kill its work."""
    import threading

    import xbmd_batch.cli as cli

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        monkeypatch.setattr(cli, "app", lambda: (_ for _ in ()).throw(SystemExit(4)))
        monkeypatch.setattr(cli.os, "_exit", lambda code: pytest.fail("os._exit with a live thread"))
        with pytest.raises(SystemExit) as e:
            cli.entry()
        assert e.value.code == 4
    finally:
        stop.set()
        t.join()


def test_console_entry_writes_all_output_and_exit_codes() -> None:
    """Through the real entry (``python -m xbmd_batch``): all output arrives through a pipe, codes kept."""
    r = subprocess.run([sys.executable, "-m", "xbmd_batch", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "score" in r.stdout and r.stdout.endswith("\n")
    r = subprocess.run([sys.executable, "-m", "xbmd_batch", "version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"xbmd-batch {__version__}\n"
    r = subprocess.run(
        [sys.executable, "-m", "xbmd_batch", "score", "--backend", "nope", "a", "b", "-m", "c"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "nope" in r.stderr
