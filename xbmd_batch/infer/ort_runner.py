"""The onnxruntime runner over an exported ONNX file: CPU, CUDA or TensorRT execution provider."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xbmd_batch.defaults import DEFAULT_BATCH_SIZE, ORT_PROVIDERS
from xbmd_batch.errors import InputError, ModelFileError
from xbmd_batch.infer.base import BaseRunner
from xbmd_batch.infer.model_file import ModelFile, open_model

if TYPE_CHECKING:
    from xbmd_batch.modelcard import ModelCard


def ort_provider_chain(
    provider: str,
    *,
    device_id: int = 0,
    precision: str = "fp32",
    card: ModelCard | None = None,
    opt_batch: int = DEFAULT_BATCH_SIZE,
    max_batch: int | None = None,
    trt_cache_dir: str | os.PathLike[str] | None = None,
) -> list[Any]:
    """The onnxruntime providers list (with options) for "cpu", "cuda" or "tensorrt", fallbacks included."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    cuda_opts = {
        "device_id": device_id,
        "arena_extend_strategy": "kSameAsRequested",  # dynamic batches: don't double the arena per new shape
        "cudnn_conv_algo_search": "EXHAUSTIVE",  # few distinct shapes (full + last partial batch)
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": True,
    }
    if provider == "cuda":
        return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
    if provider == "tensorrt":
        from xbmd_batch.infer.tensorrt.engine_cache import default_cache_dir

        cache = os.fspath(Path(trt_cache_dir) if trt_cache_dir else default_cache_dir() / "ort-trt-ep")
        trt_opts: dict[str, Any] = {
            "device_id": device_id,
            "trt_fp16_enable": precision == "fp16",  # TensorRT 11 is strongly typed: ignored there
            "trt_layer_norm_fp32_fallback": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
            "trt_builder_optimization_level": 3,
            "trt_max_workspace_size": 4 << 30,
        }
        if card is not None:  # explicit profile so the engine is not rebuilt for each new batch size
            c, s, f = card.model_config.in_chans, card.model_config.image_size, card.model_config.n_fields
            image, meta, mask = card.input_names

            def shapes(b: int) -> str:
                return f"{image}:{b}x{c}x{s}x{s},{meta}:{b}x{f},{mask}:{b}x{f}"

            trt_opts["trt_profile_min_shapes"] = shapes(1)
            trt_opts["trt_profile_opt_shapes"] = shapes(opt_batch)
            trt_opts["trt_profile_max_shapes"] = shapes(max_batch or opt_batch)
        return [
            ("TensorrtExecutionProvider", trt_opts),
            ("CUDAExecutionProvider", cuda_opts),
            "CPUExecutionProvider",
        ]
    raise InputError(f"unknown onnxruntime provider {provider!r} ({', '.join(ORT_PROVIDERS)})")


_PROVIDER_NAME = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OrtRunner(BaseRunner):
    """onnxruntime over an exported ONNX file: CPU, CUDA or TensorRT execution provider.

    The session is refused (InputError) when the requested provider is missing or onnxruntime silently fell
    back to CPU (e.g. onnxruntime-gpu not installed, or installed alongside onnxruntime). Intra-op spinning
    is off by default: in ``score`` the decode workers share the cores, and spinning threads steal them.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | os.PathLike[str] | ModelFile,
        card: ModelCard | None = None,
        *,
        provider: str = "cpu",
        device_id: int = 0,
        precision: str | None = None,
        intra_op_threads: int | None = None,
        graph_optimization: str = "all",
        allow_spinning: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch: int | None = None,
        trt_cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if provider not in _PROVIDER_NAME:
            raise InputError(f"unknown onnxruntime provider {provider!r} ({', '.join(ORT_PROVIDERS)})")
        mf = open_model(onnx_path)
        path = mf.path
        if mf.kind != "onnx":
            raise InputError(
                f"{path}: onnxruntime needs an exported ONNX file; run `python -m export onnx {path} "
                f"--out model.onnx`"
            )
        card = card or mf.card
        graph_precision = str(card.extra.get("onnx_precision", "fp32"))
        if precision in (None, "auto"):
            precision = "fp16" if provider == "tensorrt" else graph_precision
        if provider != "tensorrt" and precision != graph_precision:
            raise InputError(
                f"{path}: this ONNX graph is {graph_precision}; onnxruntime-{provider} runs it as stored "
                f"(asked for {precision}: export with --fp16 and use the .fp16.onnx file)"
            )
        device = "cpu" if provider == "cpu" else f"cuda:{device_id}"
        super().__init__(card, device, precision, mf, max_batch=None)
        self.provider = provider
        self.device_id = device_id
        self.intra_op_threads = intra_op_threads
        self.graph_optimization = graph_optimization
        self.allow_spinning = allow_spinning
        self.batch_size = batch_size
        self.profile_max_batch = max_batch or batch_size
        self.trt_cache_dir = trt_cache_dir
        self.session: Any = None

    @property
    def name(self) -> str:
        return f"onnxruntime-{self.provider}-{self.precision}"

    def _load(self) -> None:
        import onnxruntime as ort

        from xbmd_batch.onnx_card import check_io_against_card

        wanted = _PROVIDER_NAME[self.provider]
        available = ort.get_available_providers()
        if wanted not in available:
            raise InputError(
                f"onnxruntime {ort.__version__} offers {available}, not {wanted}; install the GPU build "
                f"(pip install 'xbmd-batch[gpu]', never together with the CPU onnxruntime package)"
            )
        so = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so.graph_optimization_level = levels[self.graph_optimization]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.intra_op_threads:
            so.intra_op_num_threads = int(self.intra_op_threads)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        providers = ort_provider_chain(
            self.provider,
            device_id=self.device_id,
            precision=self.precision,
            card=self.card,
            opt_batch=self.batch_size,
            max_batch=self.profile_max_batch,
            trt_cache_dir=self.trt_cache_dir,
        )
        assert self.model_path is not None
        try:
            sess = ort.InferenceSession(os.fspath(self.model_path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelFileError(f"{self.model_path}: onnxruntime cannot load it: {e}") from e
        used = sess.get_providers()
        if not used or used[0] != wanted:
            raise InputError(
                f"onnxruntime fell back to {used} instead of {wanted} (no usable GPU/driver/CUDA?)"
            )
        check_io_against_card(sess, self.card, source=str(self.model_path))
        self.session = sess
        from xbmd_batch.onnx_card import extra_output_names

        self._out_names = [*self.card.output_names, *extra_output_names(self.card)]

    def _unload(self) -> None:
        self.session = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._out_names, feeds)
        return dict(zip(self._out_names, outs, strict=True))
