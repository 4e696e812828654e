"""The runner protocol every backend implements, and the plumbing they share.

Every runner is a context manager with ``infer(feeds) -> outputs``: dicts of numpy arrays keyed by the card's
``input_names`` / ``output_names`` (``image`` [B,C,S,S], ``meta`` [B,F], ``meta_mask`` [B,F] -> ``bmd`` [B],
``field_attention`` [B,F], all float32). Any B >= 0 is accepted: runners with a maximum batch (TensorRT's
profile) split larger feeds, and a last partial batch is just a smaller dynamic shape. So scoring, parity
checks and benchmarks compare backends with a loop, not special cases.

Device tensors (on-device preprocessing, ``score --preprocess-device cuda``): a feed may also be a torch
tensor (float32, same shape rules). A runner that can read it where it lies says so in
``takes_tensor(t)`` (torch on its device; TensorRT and onnxruntime IOBinding on their CUDA device, or the
CPU for IOBinding on the CPU provider) and gets it as is, with no host copy; any other runner gets
``t.cpu().numpy()``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from xbmd_batch.errors import InputError, XbmdError

if TYPE_CHECKING:
    from xbmd_batch.infer.model_file import ModelFile
    from xbmd_batch.modelcard import ModelCard

Feeds = Mapping[str, np.ndarray]


@runtime_checkable
class Runner(Protocol):
    """What scoring and benchmarks rely on; every backend implements it."""

    name: str  # e.g. "onnxruntime-cpu-fp32"
    backend: str  # "torch" | "onnxruntime" | "tensorrt"
    device: str  # "cpu" | "cuda:0"
    precision: str  # "fp32" | "fp16" | "bf16"
    card: ModelCard
    has_attention: bool
    reason: str  # why open_runner picked this backend ("" when constructed directly)

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]: ...

    def provenance(self) -> dict[str, Any]: ...


def is_tensor(x: object) -> bool:
    """A torch tensor? (Answered without importing torch: a tensor exists only if torch was imported.)"""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def validate_feeds(feeds: Feeds, card: ModelCard, source: str = "runner") -> dict[str, np.ndarray]:
    """Contiguous float32 arrays (or torch tensors, kept where they are) with the card's names and shapes;
    InputError naming the first problem."""
    from xbmd_batch.onnx_card import expected_io

    exp_in, _ = expected_io(card)
    missing = [n for n in exp_in if n not in feeds]
    extra = [n for n in feeds if n not in exp_in]
    if missing or extra:
        raise InputError(
            f"{source}: feeds must be exactly {list(exp_in)} (missing {missing}, unexpected {extra})"
        )
    out: dict[str, np.ndarray] = {}
    batch: int | None = None
    for name, want in exp_in.items():
        arr = feeds[name]
        if is_tensor(arr):
            torch = sys.modules["torch"]
            if arr.dtype.is_complex:  # type: ignore[attr-defined]
                raise InputError(f"{source}: {name} has dtype {arr.dtype}, expected float32")  # type: ignore[attr-defined]
            arr = arr.detach().to(torch.float32).contiguous()  # type: ignore[attr-defined]
        else:
            arr = np.asarray(arr)
            if arr.dtype.kind not in "fiub":
                raise InputError(f"{source}: {name} has dtype {arr.dtype}, expected float32")
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim != len(want) or tuple(arr.shape[1:]) != tuple(want[1:]):
            shape = "[B, " + ", ".join(map(str, want[1:])) + "]"
            raise InputError(f"{source}: {name} has shape {list(arr.shape)}, expected {shape}")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise InputError(
                f"{source}: batch sizes differ between inputs ({batch} vs {arr.shape[0]} for {name})"
            )
        out[name] = arr
    return out


def pad_batch(feeds: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Feeds grown to ``rows`` by repeating the last row (callers slice the outputs back).

    Used where a fixed or minimum batch shape matters: onnxruntime-CUDA pads every batch to its batch size so
    cuDNN's algorithm search runs once per session, not again for the last partial batch; TensorRT pads a
    batch below its profile's minimum.
    """
    out: dict[str, np.ndarray] = {}
    for k, v in feeds.items():
        b = v.shape[0]
        if b == 0 or b > rows:
            raise ValueError(f"pad_batch: cannot pad {b} rows of {k} to {rows}")
        if b == rows:
            out[k] = v
        elif is_tensor(v):  # a device tensor is padded where it lies
            out[k] = sys.modules["torch"].cat([v, v[-1:].expand(rows - b, *v.shape[1:])])
        else:
            out[k] = np.concatenate([v, np.repeat(v[-1:], rows - b, axis=0)])
    return out


def to_numpy(x: Any) -> np.ndarray:
    """A feed as a host numpy array (a torch tensor is copied to the host once)."""
    return x.detach().cpu().numpy() if is_tensor(x) else x


def _empty_outputs(card: ModelCard) -> dict[str, np.ndarray]:
    from xbmd_batch.onnx_card import extra_output_names

    f = card.model_config.n_fields
    bmd, attn = card.output_names
    out = {bmd: np.zeros((0,), np.float32), attn: np.zeros((0, f), np.float32)}
    return out | {n: np.zeros((0,), np.float32) for n in extra_output_names(card)}


def _check_outputs(
    out: dict[str, np.ndarray], card: ModelCard, batch: int, source: str
) -> dict[str, np.ndarray]:
    bmd, attn = card.output_names
    f = card.model_config.n_fields
    res = {bmd: np.asarray(out[bmd], np.float32).reshape(-1), attn: np.asarray(out[attn], np.float32)}
    if res[bmd].shape != (batch,) or res[attn].shape != (batch, f):
        raise XbmdError(
            f"{source}: backend returned shapes {res[bmd].shape} / {res[attn].shape}, expected ({batch},) / "
            f"({batch}, {f})"
        )
    for name, v in out.items():  # per-image extras (a fold ensemble's bmd_sd_models) pass through
        if name not in res:
            res[name] = np.asarray(v, np.float32).reshape(-1)
    return res


class BaseRunner:
    """Shared plumbing: lazy load on activate/first infer, feed validation, chunking, output checks."""

    backend = ""

    def __init__(
        self,
        card: ModelCard | None,
        device: str,
        precision: str,
        model: ModelFile | None,
        max_batch: int | None = None,
    ) -> None:
        self._card = card
        self.device = device
        self.precision = precision
        self.model = model
        self.max_batch = max_batch
        self.reason = ""
        self.engine_sha256: str | None = None
        self._active = False

    # the card may only be known after loading (checkpoint runners)
    @property
    def card(self) -> ModelCard:
        if self._card is None:
            self.activate()
        assert self._card is not None
        return self._card

    @property
    def has_attention(self) -> bool:
        return bool(self.card.has_attention)

    @property
    def name(self) -> str:
        kind = "cuda" if self.device.startswith("cuda") else self.device
        return f"{self.backend}-{kind}-{self.precision}"

    @property
    def model_path(self) -> Path | None:
        return self.model.path if self.model is not None else None

    @property
    def model_sha256(self) -> str | None:
        return self.model.sha256 if self.model is not None else None

    def provenance(self) -> dict[str, Any]:
        """Flat facts for run manifests and benchmark tables."""
        return {
            "runner": self.name,
            "backend": self.backend,
            "device": self.device,
            "precision": self.precision,
            "model_path": os.fspath(self.model_path) if self.model_path else None,
            "model_sha256": self.model_sha256,
            "engine_sha256": self.engine_sha256,
            "reason": self.reason,
        }

    def activate(self) -> None:
        if not self._active:
            self._load()
            self._active = True

    def deactivate(self) -> None:
        if self._active:
            self._unload()
            self._active = False

    def __enter__(self) -> BaseRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Validated float32 feeds of any batch size -> float32 outputs of the same batch size."""
        self.activate()
        card = self.card
        x = validate_feeds(feeds, card, self.name)
        x = {k: v if not is_tensor(v) or self.takes_tensor(v) else to_numpy(v) for k, v in x.items()}
        b = next(iter(x.values())).shape[0]
        if b == 0:
            return _empty_outputs(card)
        step = self.max_batch or b
        chunks = [{k: v[s : s + step] for k, v in x.items()} if step < b else x for s in range(0, b, step)]
        outs = self._infer_many(chunks) if len(chunks) > 1 else [self._infer(chunks[0])]
        parts = [
            _check_outputs(o, card, len(next(iter(c.values()))), self.name)
            for o, c in zip(outs, chunks, strict=True)
        ]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def takes_tensor(self, t: Any) -> bool:
        """Can ``_infer`` read this torch tensor where it lies (no host copy)? Runners that can override."""
        return False

    def _infer_many(self, chunks: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Several batches of at most ``max_batch`` rows; runners that can overlap them override this."""
        return [self._infer(c) for c in chunks]

    def _load(self) -> None:
        raise NotImplementedError

    def _unload(self) -> None:
        raise NotImplementedError

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.model_path or ''}>"
