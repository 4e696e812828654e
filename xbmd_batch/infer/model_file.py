"""The model file, opened once: its kind, sha256, card, and the parsed ONNX proto or loaded checkpoint.

Scoring needs the card before it decodes a pixel, the runner needs the graph or the weights, the engine cache
and run.json need the sha256. Each of those used to reopen the file (an ONNX file was parsed 3x and hashed 2x
per ``score`` run; a checkpoint was ``torch.load``ed 2x and hashed 4x). ``open_model`` reads it once and
every consumer takes the ``ModelFile``.

The kind is decided by content, not extension: a zip archive is a torch checkpoint, anything else must parse
as ONNX. Opening an ONNX file needs ``onnx`` only (no torch); a checkpoint is ``torch.load``ed
(``weights_only=True``) the first time its card or weights are asked for.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from xbmd_batch.errors import ModelFileError

if TYPE_CHECKING:
    import onnx
    from torch import nn

    from xbmd_batch.modelcard import ModelCard

ModelKind = Literal["onnx", "checkpoint"]


class ModelFile:
    """One model file, read at most once per fact (construct with ``open_model``)."""

    def __init__(self, path: Path, kind: ModelKind, proto: onnx.ModelProto | None = None) -> None:
        self.path = path
        self.kind: ModelKind = kind
        self._proto = proto
        self._sha256: str | None = None
        self._card: ModelCard | None = None
        self._checkpoint: dict[str, Any] | None = None

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the file, hashed on first use."""
        if self._sha256 is None:
            from xbmd_batch.fsutil import sha256_file

            self._sha256 = sha256_file(self.path)
        return self._sha256

    @property
    def proto(self) -> onnx.ModelProto:
        """The parsed ONNX graph (without external data); ONNX files only. Parsed again if it was released
        (``release_proto``), after checking the file is still the one opened."""
        if self.kind != "onnx":
            raise ModelFileError(f"{self.path}: a {self.kind} has no ONNX graph")
        if self._proto is None:
            from xbmd_batch.fsutil import sha256_file
            from xbmd_batch.onnx_card import load_onnx_proto

            proto = load_onnx_proto(self.path)
            if self._sha256 is not None and sha256_file(self.path) != self._sha256:
                raise ModelFileError(f"{self.path}: the model file changed since it was opened")
            self._proto = proto
        return self._proto

    def release_proto(self) -> None:
        """Drop the parsed graph (about the file's size in memory: weights included) once the card is read.

        ``score`` calls it after setup: onnxruntime loads the file itself, so the main process would otherwise
        hold the weights twice for the whole run; TensorRT's builder, on a cache miss, parses it again."""
        if self.kind == "onnx" and self._proto is not None:
            _ = self.card, self.sha256  # keep what was read from it
            self._proto = None

    @property
    def checkpoint(self) -> dict[str, Any]:
        """The validated checkpoint dict (``torch.load(weights_only=True)``, once); checkpoints only."""
        if self.kind != "checkpoint":
            raise ModelFileError(f"{self.path}: an ONNX file has no training checkpoint")
        if self._checkpoint is None:
            from xbmd_batch.checkpoint import load_checkpoint

            self._checkpoint = load_checkpoint(self.path)
        return self._checkpoint

    @property
    def card(self) -> ModelCard:
        """The model card (embedded in the ONNX metadata, or rebuilt from the checkpoint's fields)."""
        if self._card is None:
            if self.kind == "onnx":
                from xbmd_batch.onnx_card import card_from_proto

                self._card = card_from_proto(self.proto, self.path)
            else:
                from xbmd_batch.modelcard import card_from_checkpoint

                try:
                    self._card = card_from_checkpoint(self.checkpoint, self.sha256)
                except (TypeError, KeyError, ValueError) as e:
                    raise ModelFileError(f"{self.path}: checkpoint has an invalid model config: {e}") from e
        return self._card

    def build_module(self) -> nn.Module:
        """The checkpoint's model (eval mode, CPU). The module now owns the weights, so the cached dict is
        released; a second call loads the file again."""
        from xbmd_batch.checkpoint import model_from_checkpoint

        module = model_from_checkpoint(self.checkpoint, self.card, self.path)
        self._checkpoint = None
        return module

    def __repr__(self) -> str:
        return f"<ModelFile {self.kind} {self.path}>"


def open_model(path: str | os.PathLike[str] | ModelFile) -> ModelFile:
    """Open a checkpoint (.pt) or exported ONNX file; ModelFileError naming the file for anything else.

    An ONNX file is parsed here (so a bad file fails before any work); a checkpoint is loaded lazily. A
    ``ModelFile`` passes through unchanged, so callers can take either.
    """
    if isinstance(path, ModelFile):
        return path
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: model file not found")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise ModelFileError(f"{p}: cannot read model file ({e.strerror or e})") from e
    if zipfile.is_zipfile(p) or head == b"PK\x03\x04":  # a torch zip, possibly truncated
        return ModelFile(p, "checkpoint")
    from xbmd_batch.onnx_card import load_onnx_proto

    try:
        proto = load_onnx_proto(p)
    except ModelFileError as e:
        if p.suffix.lower() in (".pt", ".pth", ".ckpt") or head[:1] == b"\x80":  # named / pickled as torch
            raise ModelFileError(
                f"{p}: not a readable xbmd-batch checkpoint (a .pt must be a torch zip archive written by "
                "`python -m train`; this file is truncated, corrupt or a legacy pickle)"
            ) from e
        raise ModelFileError(
            f"{p}: neither an xbmd-batch checkpoint (.pt) nor an exported ONNX model ({e})"
        ) from e
    return ModelFile(p, "onnx", proto)
