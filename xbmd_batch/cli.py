"""The `xbmd-batch` command line: a thin Typer adapter over the library.

Heavy packages (torch, onnxruntime, tensorrt, onnx) are imported inside each command, never at module level,
so `xbmd-batch --help` stays fast on any machine. Exit codes: 0 success, 2 usage/config/input errors
(xbmd_batch.errors.InputError), other non-zero codes are documented per command.
"""

from __future__ import annotations

import typer

from xbmd_batch import __version__

app = typer.Typer(
    name="xbmd-batch",
    help="Femoral-neck BMD from hip X-ray DICOMs + clinical metadata (XAttn-BMD), for whole cohorts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Femoral-neck BMD from hip X-ray DICOMs + clinical metadata (XAttn-BMD), for whole cohorts."""


@app.command()
def version() -> None:
    """Print the xbmd-batch version.

    Example: xbmd-batch version
    """
    typer.echo(f"xbmd-batch {__version__}")


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON instead of tables."),
) -> None:
    """Report torch/CUDA, onnxruntime providers, TensorRT and decodable DICOM transfer syntaxes.

    Example: xbmd-batch doctor
    """
    from xbmd_batch.doctor import run_doctor

    run_doctor(as_json=as_json)
