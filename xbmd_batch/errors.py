"""Exception types. The CLI maps InputError (bad user input, config) to exit code 2."""

from __future__ import annotations


class XbmdError(Exception):
    """Base class for errors this package raises on purpose."""


class InputError(XbmdError):
    """Bad user input (a file, a row, an option): the message names where and what."""


class OutputError(InputError):
    """--out cannot be written (disk full, read-only, permissions): nothing done is lost; rerun to resume."""


class ModelFileError(InputError):
    """A checkpoint / ONNX / engine file that is not ours, is corrupt, or does not match the model card."""


class ImageError(InputError):
    """A DICOM image that cannot be scored; ``reason`` is its failure-table reason code (docs/outputs.md)."""

    def __init__(self, message: str, reason: str = "invalid_image") -> None:
        super().__init__(message)
        self.reason = reason


class StaleEngineError(ModelFileError):
    """A TensorRT engine built for another GPU / TensorRT / ONNX file / precision / profile, or corrupt."""


class TensorRTUnavailableError(XbmdError):
    """tensorrt (or CUDA) is not installed / visible on this machine."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during `score` (a batch scheduler's time limit): handled like Ctrl-C, exit 128 + signal."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = signum
