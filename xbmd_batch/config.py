"""Frozen configuration objects shared by the model, preprocessing, training, export and scoring.

Everything here round-trips through plain dicts (``to_dict`` / ``from_dict``) so it can live inside a
``weights_only=True`` checkpoint and inside the ONNX model card as JSON. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

FieldKind = Literal["numeric", "categorical"]


@dataclass(frozen=True)
class FieldSpec:
    """One clinical metadata field: how to validate it and how to turn it into a model input."""

    name: str
    kind: FieldKind
    unit: str = ""
    description: str = ""
    valid_min: float | None = None  # values outside [valid_min, valid_max] are rejected at the edge
    valid_max: float | None = None
    mean: float = 0.0  # z-score normalisation (numeric); fitted on training data
    std: float = 1.0
    categories: tuple[str, ...] = ()  # categorical: index i <-> categories[i]

    @property
    def cardinality(self) -> int:
        return len(self.categories) if self.kind == "categorical" else 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["categories"] = list(self.categories)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FieldSpec:
        d = dict(d)
        d["categories"] = tuple(d.get("categories", ()))
        return cls(**d)


@dataclass(frozen=True)
class MetadataSchema:
    """Ordered metadata fields; column j of the model's ``meta`` input is ``fields[j]``.

    Model input encoding (see ``xbmd_batch.metadata``): numeric -> (value - mean) / std; categorical -> the
    category index as a float; missing -> 0 with ``meta_mask`` = 0 (the model substitutes a learned token).
    """

    fields: tuple[FieldSpec, ...]
    subject_key: str = "subject_id"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(f.kind for f in self.fields)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return tuple(f.cardinality for f in self.fields)

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def with_stats(self, stats: dict[str, tuple[float, float]]) -> MetadataSchema:
        """Return a copy with (mean, std) replaced for the named numeric fields."""
        new = []
        for f in self.fields:
            if f.name in stats and f.kind == "numeric":
                m, s = stats[f.name]
                f = dataclasses.replace(f, mean=float(m), std=float(s) if s > 0 else 1.0)
            new.append(f)
        return dataclasses.replace(self, fields=tuple(new))

    def to_dict(self) -> dict[str, Any]:
        return {"subject_key": self.subject_key, "fields": [f.to_dict() for f in self.fields]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetadataSchema:
        return cls(
            fields=tuple(FieldSpec.from_dict(f) for f in d["fields"]),
            subject_key=d.get("subject_key", "subject_id"),
        )


# The paper's metadata fields (XAttn-BMD, arXiv 2511.14604). Normalisation stats are placeholders that
# training overwrites with the training-set mean/std (MetadataSchema.with_stats).
DEFAULT_SCHEMA = MetadataSchema(
    fields=(
        FieldSpec("sex", "categorical", "", "sex at birth", categories=("F", "M")),
        FieldSpec("age_xray", "numeric", "years", "age at X-ray", 18, 110, 75.0, 6.0),
        FieldSpec("age_dxa", "numeric", "years", "age at DXA", 18, 110, 75.0, 6.0),
        FieldSpec("height_cm", "numeric", "cm", "standing height", 100, 220, 165.0, 9.0),
        FieldSpec("weight_kg", "numeric", "kg", "body weight", 25, 250, 72.0, 13.0),
        FieldSpec("bmi", "numeric", "kg/m^2", "body-mass index", 10, 70, 26.5, 4.5),
        FieldSpec("smoking", "categorical", "", "smoking status", categories=("never", "former", "current")),
        FieldSpec("alcohol_units_week", "numeric", "UK units/week", "alcohol intake", 0, 200, 6.0, 7.0),
        FieldSpec("activity_score", "numeric", "score 0-100", "physical activity score", 0, 100, 50.0, 15.0),
        FieldSpec("diet_score", "numeric", "score 0-100", "diet quality score", 0, 100, 50.0, 15.0),
    )
)


@dataclass(frozen=True)
class PreprocessConfig:
    """Image preprocessing shared by training and scoring (``xbmd_batch.preprocess``).

    Order: DICOM grayscale (modality LUT -> optional VOI -> MONOCHROME1 inversion, so bone is bright) ->
    pad to square (edge value) -> resize to ``image_size`` (antialiased) -> percentile clip and affine map to
    [0, 1] -> standardise with (x - norm_mean) / norm_std.
    """

    image_size: int = 224
    apply_voi: bool = False
    pad_to_square: bool = True
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    norm_mean: float = 0.5
    norm_std: float = 0.25
    # Bump when the preprocessing code changes meaning (invalidates caches). 3: block means + affine
    # grayscale on the small image (issue 11); 4: no block means (version 2's resize exactly, on the stored
    # integers, the affine on the small image; issue 11). Cards with 1-2 are served by preprocess_v2.
    version: int = 4

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["clip_percentiles"] = list(self.clip_percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        d = dict(d)
        if "clip_percentiles" in d:
            d["clip_percentiles"] = tuple(d["clip_percentiles"])
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """Constructor arguments of XAttnBMD / ConcatBaseline; stored whole in every checkpoint."""

    fusion: Literal["xattn", "concat"] = "xattn"
    image_size: int = 224
    in_chans: int = 1
    # image encoder: "resnet34" (the paper's) or "smallcnn" (4 stride-2 stages of two 3x3 conv-BN-ReLU,
    # widths cnn_width x (1, 2, 4, 8); ~0.3 M parameters at width 16; for the CPU preset)
    encoder: Literal["resnet34", "smallcnn"] = "resnet34"
    cnn_width: int = 16
    # "wide" linear path (xbmd_batch.model.WidePath): BMD offset = linear(avg-pooled image at wide_side^2,
    # metadata values, presence mask), fitted by ridge before the network trains; the network then learns
    # the residual. False: the paper's head (offset = bmd_mean).
    wide: bool = False
    wide_side: int = 64
    # Metadata gain on the wide path's image score (issue 10; the CPU preset): wide(x) =
    # linear(x) + score(x) * gain(meta, mask), so metadata can modulate how image density maps to BMD (an
    # image x metadata interaction an additive ridge cannot express). Needs wide=True. See WidePath.
    wide_gain: bool = False
    # n_members > 1: that many independently initialised copies of the network (encoder, fusion, head) that
    # share the wide path; each is trained on its own loss, the output is their mean (xbmd_batch.model
    # MemberEnsemble). 1 = one network (the paper's model).
    n_members: int = 1
    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 4
    dropout: float = 0.1
    meta_hidden: int = 128
    head_hidden: int = 128
    field_names: tuple[str, ...] = DEFAULT_SCHEMA.names
    field_kinds: tuple[str, ...] = DEFAULT_SCHEMA.kinds
    field_cardinalities: tuple[int, ...] = DEFAULT_SCHEMA.cardinalities
    # BMD output = bmd_mean + bmd_std * head(z); set from training data so the head starts near the answer.
    bmd_mean: float = 0.72
    bmd_std: float = 0.14
    # Output recalibration (xbmd_batch.calibration), applied inside the head: bmd = intercept + slope * raw.
    # Fitted after training on data the model did not train on; identity for an uncalibrated model.
    calib_intercept: float = 0.0
    calib_slope: float = 1.0

    @property
    def n_fields(self) -> int:
        return len(self.field_names)

    @classmethod
    def for_schema(cls, schema: MetadataSchema, **kw: Any) -> ModelConfig:
        return cls(
            field_names=schema.names,
            field_kinds=schema.kinds,
            field_cardinalities=schema.cardinalities,
            **kw,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("field_names", "field_kinds", "field_cardinalities"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        for k in ("field_names", "field_kinds", "field_cardinalities"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


# Names of the model's inputs/outputs everywhere (torch runner, ONNX graph, TensorRT bindings).
INPUT_NAMES: tuple[str, ...] = ("image", "meta", "meta_mask")
OUTPUT_NAMES: tuple[str, ...] = ("bmd", "field_attention")
