"""The `.pt` checkpoint: weights plus everything needed to rebuild and feed the model (docs/ARCHITECTURE.md).

Only plain types and tensors go in, so ``torch.load(weights_only=True)`` can read it: loading never executes
pickled code. Saving is atomic (temp file in the same folder, fsync, os.replace), so a crash mid-save leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xbmd_batch import __version__
from xbmd_batch.config import MetadataSchema, ModelConfig, PreprocessConfig
from xbmd_batch.errors import ModelFileError
from xbmd_batch.fsutil import atomic_open, now_iso, sha256_file
from xbmd_batch.modelcard import ModelCard, card_from_checkpoint

if TYPE_CHECKING:
    from torch import nn

CHECKPOINT_FORMAT = "xbmd-batch-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_KEYS = ("state_dict", "model_config", "metadata_schema", "preprocess")


def _plain(obj: Any) -> Any:
    """Training summaries often hold numpy scalars/arrays; turn them into JSON types weights_only accepts."""

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):  # numpy arrays/scalars, torch tensors
            return o.tolist()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"training_summary holds a {type(o).__name__}, which is not a plain type")

    return json.loads(json.dumps(obj, default=default))


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    model_cfg: ModelConfig,
    schema: MetadataSchema,
    preprocess: PreprocessConfig,
    training_summary: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint atomically and return its path."""
    import torch

    if model_cfg.field_names != schema.names:
        raise ValueError(
            f"model config fields {list(model_cfg.field_names)} differ from schema fields "
            f"{list(schema.names)}"
        )
    if model_cfg.image_size != preprocess.image_size:
        raise ValueError(
            f"model image_size {model_cfg.image_size} differs from preprocess image_size "
            f"{preprocess.image_size}"
        )
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model_config": model_cfg.to_dict(),
        "metadata_schema": schema.to_dict(),
        "preprocess": preprocess.to_dict(),
        "training_summary": _plain(training_summary or {}),
        "created": now_iso(),
        "versions": {"xbmd_batch": __version__, "torch": str(torch.__version__)},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(ckpt, f)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a checkpoint dict; every failure is a ModelFileError naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle/EOF errors, or a pickle that needs code (weights_only refuses it)
        raise ModelFileError(
            f"{path}: cannot read as an xbmd-batch checkpoint (corrupt, truncated, or not a weights-only "
            f"torch file): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelFileError(
            f"{path}: not an xbmd-batch checkpoint (expected format {CHECKPOINT_FORMAT!r}, found {found!r})"
        )
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ModelFileError(
            f"{path}: checkpoint format_version {version!r} is not supported by this xbmd-batch "
            f"(reads up to {CHECKPOINT_VERSION})"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ModelFileError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, ModelCard]:
    """Rebuild the exact model from a checkpoint: (model in eval mode on CPU, its ModelCard)."""
    ckpt = load_checkpoint(path)
    try:
        card = card_from_checkpoint(ckpt, sha256_file(path))
    except (TypeError, KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: checkpoint has an invalid model config: {e}") from e
    return model_from_checkpoint(ckpt, card, path), card


def model_from_checkpoint(ckpt: dict[str, Any], card: ModelCard, path: str | os.PathLike[str]) -> nn.Module:
    """The model (eval mode, CPU) of an already loaded checkpoint dict whose card is ``card``."""
    import torch

    from xbmd_batch.model import build_model

    try:
        # Built on the meta device (no random initialisation of ~27 M weights that the checkpoint replaces at
        # once) and given the checkpoint's tensors (assign=True: no copy): ~0.3 CPU s less per `score` start
        # on the 2-core VM (issue 11). The config-derived, non-persistent buffers are made on the CPU
        # explicitly (model.py), so nothing is left on meta; if anything were, build it the plain way.
        with torch.device("meta"):
            model = build_model(card.model_config)
    except (TypeError, KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: checkpoint has an invalid model config: {e}") from e
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            model = build_model(card.model_config)
            model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not match the model config: {e}") from e
    return model.eval()
