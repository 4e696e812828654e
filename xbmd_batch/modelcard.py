"""The model card: everything `score` needs to use a model, shared by the checkpoint and the ONNX file.

It is a plain-JSON view of a checkpoint (configs, schema, preprocessing, training summary, provenance), so an
ONNX file carrying it in metadata_props (``xbmd_batch.onnx_card``) needs nothing else. No torch import here:
reading a card must stay cheap for the CLI. See docs/model_card.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from xbmd_batch.config import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    MetadataSchema,
    ModelConfig,
    PreprocessConfig,
)
from xbmd_batch.errors import ModelFileError

CARD_FORMAT = "xbmd-batch-model-card"
CARD_VERSION = 1


def _default_references() -> dict[str, dict[str, Any]]:
    from xbmd_batch.clinical import REFERENCES

    return {name: dict(ref.to_dict()) for name, ref in REFERENCES.items()}


@dataclass(frozen=True)
class ModelCard:
    """What a model is, how to feed it, and where it came from (JSON-serialisable through to_dict)."""

    model_config: ModelConfig
    schema: MetadataSchema
    preprocess: PreprocessConfig
    training_summary: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    has_attention: bool = True
    input_names: tuple[str, ...] = INPUT_NAMES
    output_names: tuple[str, ...] = OUTPUT_NAMES
    t_score_references: dict[str, dict[str, Any]] = field(default_factory=_default_references)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. export parity figures, engine notes

    def with_extra(self, **kw: Any) -> ModelCard:
        """A copy with ``extra`` updated (the card is frozen; exporters add parity figures this way)."""
        return dataclasses.replace(self, extra={**self.extra, **kw})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "card_version": CARD_VERSION,
            "model_config": self.model_config.to_dict(),
            "metadata_schema": self.schema.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "training_summary": dict(self.training_summary),
            "checkpoint_sha256": self.checkpoint_sha256,
            "versions": dict(self.versions),
            "has_attention": self.has_attention,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "t_score_references": dict(self.t_score_references),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model card") -> ModelCard:
        """Rebuild a card; ``source`` names the file in error messages."""
        if not isinstance(d, dict):
            raise ModelFileError(f"{source}: model card is not a JSON object")
        if d.get("format", CARD_FORMAT) != CARD_FORMAT:
            raise ModelFileError(f"{source}: not an xbmd-batch model card (format={d.get('format')!r})")
        if int(d.get("card_version", CARD_VERSION)) > CARD_VERSION:
            raise ModelFileError(
                f"{source}: model card version {d['card_version']} is newer than this xbmd-batch "
                f"understands ({CARD_VERSION}); upgrade xbmd-batch"
            )
        missing = [k for k in ("model_config", "metadata_schema", "preprocess") if k not in d]
        if missing:
            raise ModelFileError(f"{source}: model card lacks {', '.join(missing)}")
        try:
            model_config = ModelConfig.from_dict(d["model_config"])
            schema = MetadataSchema.from_dict(d["metadata_schema"])
            preprocess = PreprocessConfig.from_dict(d["preprocess"])
        except (TypeError, KeyError, ValueError) as e:
            raise ModelFileError(f"{source}: model card has an invalid config: {e}") from e
        return cls(
            model_config=model_config,
            schema=schema,
            preprocess=preprocess,
            training_summary=dict(d.get("training_summary", {})),
            checkpoint_sha256=str(d.get("checkpoint_sha256", "")),
            versions=dict(d.get("versions", {})),
            has_attention=bool(d.get("has_attention", model_config.fusion == "xattn")),
            input_names=tuple(d.get("input_names", INPUT_NAMES)),
            output_names=tuple(d.get("output_names", OUTPUT_NAMES)),
            t_score_references=dict(d.get("t_score_references") or _default_references()),
            extra=dict(d.get("extra", {})),
        )

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model card") -> ModelCard:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{source}: model card is not valid JSON: {e}") from e
        return cls.from_dict(d, source=source)


def card_from_checkpoint(ckpt: dict[str, Any], ckpt_sha256: str) -> ModelCard:
    """The card of a checkpoint dict (``checkpoint.load_checkpoint``) whose file hashes to ``ckpt_sha256``."""
    model_config = ModelConfig.from_dict(ckpt["model_config"])
    return ModelCard(
        model_config=model_config,
        schema=MetadataSchema.from_dict(ckpt["metadata_schema"]),
        preprocess=PreprocessConfig.from_dict(ckpt["preprocess"]),
        training_summary=dict(ckpt.get("training_summary", {})),
        checkpoint_sha256=ckpt_sha256,
        versions={str(k): str(v) for k, v in dict(ckpt.get("versions", {})).items()},
        has_attention=model_config.fusion == "xattn",
    )
