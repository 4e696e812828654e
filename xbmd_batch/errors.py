"""Exception types and the exit codes the `xbmd-batch` CLI maps them to (one mapper: ``exit_code``).

InputError (bad user input, config, model file) -> 2; any other XbmdError (e.g. TensorRT missing, an engine
that fails parity) -> 1 with its message, never a traceback; Ctrl-C -> 130.
"""

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


class DeviceError(XbmdError):
    """The GPU failed in a way that poisons the rest of the run (a sticky CUDA error: illegal address, launch
    failure, ECC): every later call would fail too, so the run stops (exit 5) instead of turning the rest of
    the cohort into failure rows. Finished rows are kept; rerunning the command resumes."""


# Messages of CUDA errors that leave the context unusable (torch, onnxruntime and TensorRT word them so).
# Out-of-memory is not here: it is not sticky, and the per-image retry can succeed.
_STICKY_CUDA_MARKERS = (
    "illegal memory access",
    "illegal address",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "launch failure",
    "device-side assert",
    "uncorrectable ecc",
    "fallen off the bus",
    "cudaerrorillegaladdress",
    "cudaerrorlaunchfailure",
    "cuda driver error",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
)


def is_device_error(e: BaseException) -> bool:
    """Whether ``e`` is a sticky GPU failure (see DeviceError), judged by type and message."""
    if isinstance(e, DeviceError):
        return True
    if type(e).__name__ == "AcceleratorError":  # torch >= 2.8 raises this for CUDA errors
        msg = str(e).lower()
        return "out of memory" not in msg
    msg = str(e).lower()
    return any(m in msg for m in _STICKY_CUDA_MARKERS)


# Exit codes (docs/outputs.md; `xbmd-batch score --help` repeats them).
EXIT_OK = 0
EXIT_ERROR = 1  # an XbmdError that is not the user's input (or an unexpected internal error)
EXIT_USAGE = 2  # usage / config / input error (InputError, ModelFileError), bad option values
EXIT_QUARANTINE = 3  # score finished, but some inputs were quarantined (failures.parquet is not empty)
EXIT_STRICT = 4  # score --strict: reconciliation found quarantined inputs; nothing was decoded or scored
EXIT_DEVICE = 5  # the GPU failed (sticky CUDA error): stopped; finished rows kept, rerun resumes
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


def exit_code(e: BaseException) -> int | None:
    """The exit code for an exception the CLI reports as one line; None for anything else (a real bug)."""
    if isinstance(e, Terminated):
        return 128 + e.signum  # 143 for SIGTERM
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, InputError):
        return EXIT_USAGE
    if isinstance(e, DeviceError):
        return EXIT_DEVICE
    if isinstance(e, XbmdError):
        return EXIT_ERROR
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM during `score` (a batch scheduler's time limit): handled like Ctrl-C, exit 128 + signal."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = signum
