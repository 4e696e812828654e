"""The TensorRT runner: a native engine from the engine cache, built (and parity-checked) on a miss."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from xbmd_batch.defaults import DEFAULT_BATCH_SIZE, TRT_PRECISIONS
from xbmd_batch.errors import InputError
from xbmd_batch.infer.model_file import ModelFile, open_model
from xbmd_batch.infer.tensorrt.executor import EngineRunner

if TYPE_CHECKING:
    from xbmd_batch.infer.base import Feeds
    from xbmd_batch.infer.tensorrt.builder import FeedsFactory
    from xbmd_batch.modelcard import ModelCard


class TensorRTRunner(EngineRunner):
    """The engine for this ONNX file on this GPU, from the cache or built on demand (see ``tensorrt/``).

    A build needs parity inputs: pass ``parity_feeds`` (feeds, or a ``(card, n) -> feeds`` callable such as
    ``xbmd_batch.parity_feeds.reference_feeds``); with neither, only a cached engine can be used.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str] | ModelFile,
        card: ModelCard | None = None,
        *,
        precision: str = TRT_PRECISIONS[0],
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch: int | None = None,
        min_batch: int = 1,
        engine_cache_dir: str | os.PathLike[str] | None = None,
        device_id: int = 0,
        rebuild: bool = False,
        parity_feeds: Feeds | FeedsFactory | None = None,
        log: Any = None,
    ) -> None:
        mf = open_model(onnx_path)
        if mf.kind != "onnx":
            raise InputError(
                f"{mf.path}: TensorRT builds from the exported ONNX file; run `python -m export onnx "
                f"{mf.path} --out model.onnx` first"
            )
        if precision in ("auto", None):
            precision = TRT_PRECISIONS[0]
        if precision not in TRT_PRECISIONS:
            raise InputError(f"TensorRT runner precision must be one of {TRT_PRECISIONS}, got {precision!r}")
        super().__init__(
            None,
            card or mf.card,
            precision=precision,
            model=mf,
            device_id=device_id,
            max_batch=max_batch or batch_size,
        )
        self.batch_size, self.min_batch = batch_size, min_batch
        self.requested_max_batch = max_batch  # None: any cached engine covering batch_size, else a wide build
        self.engine_cache_dir, self.rebuild, self.log = engine_cache_dir, rebuild, log
        self.parity_feeds = parity_feeds
        self.engine_record: Any = None

    def _load(self) -> None:
        from xbmd_batch.infer.tensorrt.builder import get_or_build_engine

        assert self.model is not None
        rec = get_or_build_engine(
            self.model,
            precision=self.precision,
            opt_batch=self.batch_size,
            max_batch=self.requested_max_batch,
            min_batch=self.min_batch,
            cache_dir=self.engine_cache_dir,
            rebuild=self.rebuild,
            parity_feeds=self.parity_feeds,
            device_id=self.device_id,
            log=self.log,
        )
        self.engine_path = rec.engine_path
        super()._load()
        self.engine_record = rec
        self.engine_sha256 = rec.meta.get("engine_sha256")

    def provenance(self) -> dict[str, Any]:
        d = super().provenance()
        if self.engine_record is not None:
            from xbmd_batch.infer.tensorrt.engine_cache import describe

            d.update(
                {
                    f"engine_{k}" if not k.startswith("engine") else k: v
                    for k, v in describe(self.engine_record).items()
                }
            )
        return d
