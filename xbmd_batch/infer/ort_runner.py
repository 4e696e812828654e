"""The onnxruntime runner over an exported ONNX file: CPU or CUDA execution provider.

onnxruntime's TensorRT execution provider is deliberately not offered: onnxruntime-gpu 1.31.1 (the newest GPU
wheel) links TensorRT 10 (``libnvinfer.so.10``) while the ``tensorrt`` extra installs TensorRT 11, so that
provider could never load next to the native TensorRT runner (``--backend tensorrt``), which covers TensorRT.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from xbmd_batch.defaults import DEFAULT_BATCH_SIZE, ORT_PROVIDERS
from xbmd_batch.errors import InputError, ModelFileError
from xbmd_batch.infer.base import BaseRunner, is_tensor, pad_batch
from xbmd_batch.infer.model_file import ModelFile, open_model

if TYPE_CHECKING:
    from xbmd_batch.modelcard import ModelCard

ORT_TRT_EP_REFUSAL = (
    "onnxruntime's TensorRT execution provider is not supported: onnxruntime-gpu 1.31.1 links TensorRT 10 "
    "(libnvinfer.so.10) while the tensorrt extra installs TensorRT 11; use the native TensorRT backend "
    "(--backend tensorrt) or onnxruntime's CUDA provider"
)


def ort_provider_chain(provider: str, *, device_id: int = 0) -> list[Any]:
    """The onnxruntime providers list (with options) for "cpu" or "cuda".

    CUDA: ``use_tf32=0`` so "fp32" is IEEE fp32 as on TensorRT (which clears its TF32 flag) and torch (which
    turns TF32 off for fp32 runs); one cuDNN algorithm search per input shape, and shapes are fixed by padding
    every batch to the runner's batch size, so the search runs once; copies on their own stream
    (``do_copy_in_default_stream=False``) so they can overlap compute.
    """
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        cuda_opts = {
            "device_id": device_id,
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            "cudnn_conv_use_max_workspace": "1",
            "do_copy_in_default_stream": False,
            "use_tf32": "0",
        }
        return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
    if provider == "tensorrt":
        raise InputError(ORT_TRT_EP_REFUSAL)
    raise InputError(f"unknown onnxruntime provider {provider!r} ({', '.join(ORT_PROVIDERS)})")


_PROVIDER_NAME = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _return_freed_heap() -> None:
    """Hand the heap freed while onnxruntime built the session back to the OS (glibc ``malloc_trim``).

    Building a session reads and transforms the whole graph; what it frees stays in the process heap, so the
    main process's RSS kept ~150 MB it no longer used for the whole run (224-px model, 109 MB file: 462 ->
    308 MB right after the session, benchmarks/score_rss.py). A no-op where glibc is not the C library."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # musl and others: nothing to trim
        pass


class OrtRunner(BaseRunner):
    """onnxruntime over an exported ONNX file: CPU or CUDA execution provider.

    The session is refused (InputError) when the requested provider is missing or onnxruntime silently fell
    back to CPU (e.g. onnxruntime-gpu not installed, or installed alongside onnxruntime). Intra-op spinning
    is off by default: in ``score`` the decode workers share the cores, and spinning threads steal them.

    CUDA runs through IOBinding: device input and output OrtValues are allocated once at ``batch_size`` and
    bound once; each call copies the (padded) batch in with ``update_inplace`` and reads the outputs back,
    so nothing is allocated per batch and every batch has the same shape (``use_iobinding`` turns the same
    path on for the CPU provider, which is how CI tests it). A torch tensor feed on the provider's device
    (on-device preprocessing) is bound by its pointer instead (``IOBinding.bind_input``): no host copy.
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
        use_iobinding: bool | None = None,
    ) -> None:
        if provider == "tensorrt":
            raise InputError(ORT_TRT_EP_REFUSAL)
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
            precision = graph_precision
        if precision != graph_precision:
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
        self.use_iobinding = provider == "cuda" if use_iobinding is None else use_iobinding
        if self.use_iobinding:
            self.max_batch = max_batch or batch_size  # fixed-shape buffers: larger feeds are split
        self.session: Any = None
        self._binding: Any = None
        self._in_values: dict[str, Any] = {}
        self._out_values: dict[str, Any] = {}
        self._bound_ptr: set[str] = set()  # inputs currently bound to a torch tensor's memory

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
        providers = ort_provider_chain(self.provider, device_id=self.device_id)
        assert self.model_path is not None
        try:
            sess = ort.InferenceSession(os.fspath(self.model_path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelFileError(f"{self.model_path}: onnxruntime cannot load it: {e}") from e
        _return_freed_heap()
        used = sess.get_providers()
        if not used or used[0] != wanted:
            raise InputError(
                f"onnxruntime fell back to {used} instead of {wanted} (no usable GPU/driver/CUDA?)"
            )
        check_io_against_card(sess, self.card, source=str(self.model_path))
        self.session = sess
        from xbmd_batch.onnx_card import extra_output_names

        self._out_names = [*self.card.output_names, *extra_output_names(self.card)]
        if self.use_iobinding:
            self._bind(ort)

    def _bind(self, ort: Any) -> None:
        """Preallocated input/output OrtValues on the provider's device, bound once (shapes fixed at B)."""
        from xbmd_batch.onnx_card import expected_io, extra_output_names

        b = int(self.max_batch or self.batch_size)
        where = "cuda" if self.provider == "cuda" else "cpu"
        ins, outs = expected_io(self.card)
        outs = {**outs, **{n: (None,) for n in extra_output_names(self.card)}}  # per-image extras: (B,)
        binding = self.session.io_binding()
        for name, shape in ins.items():
            v = ort.OrtValue.ortvalue_from_shape_and_type([b, *shape[1:]], np.float32, where, self.device_id)
            binding.bind_ortvalue_input(name, v)
            self._in_values[name] = v
        for name, shape in outs.items():
            v = ort.OrtValue.ortvalue_from_shape_and_type([b, *shape[1:]], np.float32, where, self.device_id)
            binding.bind_ortvalue_output(name, v)
            self._out_values[name] = v
        self._binding = binding

    def takes_tensor(self, t: Any) -> bool:
        if not self.use_iobinding or t.device.type != ("cuda" if self.provider == "cuda" else "cpu"):
            return False
        return self.provider == "cpu" or (t.device.index or 0) == self.device_id

    def _unload(self) -> None:
        self._bound_ptr.clear()
        self._binding = None
        self._in_values.clear()
        self._out_values.clear()
        self.session = None

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._binding is None:
            outs = self.session.run(self._out_names, feeds)
            return dict(zip(self._out_names, outs, strict=True))
        b = next(iter(feeds.values())).shape[0]
        full = pad_batch(feeds, int(self.max_batch or b))  # one shape for the whole session
        for name, v in self._in_values.items():
            x = full[name]
            if is_tensor(x):  # bound where it lies; ``full`` keeps it alive until the run returns
                if x.device.type == "cuda":  # written on torch's stream; onnxruntime reads on its own
                    sys.modules["torch"].cuda.current_stream(x.device).synchronize()
                dev = "cuda" if x.device.type == "cuda" else "cpu"
                shape = tuple(x.shape)
                self._binding.bind_input(name, dev, self.device_id, np.float32, shape, x.data_ptr())
                self._bound_ptr.add(name)
                continue
            if name in self._bound_ptr:  # back to the preallocated OrtValue
                self._binding.bind_ortvalue_input(name, v)
                self._bound_ptr.discard(name)
            v.update_inplace(np.ascontiguousarray(x))
        self.session.run_with_iobinding(self._binding)
        return {n: np.array(self._out_values[n].numpy()[:b], dtype=np.float32) for n in self._out_names}
