"""The one home for defaults and option vocabularies shared by the CLI, scoring, benchmarks and export.

Plain constants (no imports): ``cli.py`` reads them for option defaults and help text, the runners for
validation, so a new backend or precision is added in one place.
"""

from __future__ import annotations

DEFAULT_BATCH_SIZE = 32  # images per model call; also the TensorRT profile's opt batch

# what `score --backend/--device/--precision` accept ("auto" lets open_runner choose)
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# where preprocessing finishes (`score --preprocess-device`): auto = cpu for now (score/placement.py)
PREPROCESS_DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("local", "ray")  # `score --engine`: this machine, or a Ray cluster (docs/scale-out.md)

# what each backend can run
TORCH_PRECISIONS = ("fp32", "fp16", "bf16")  # fp16/bf16 via CUDA autocast; CPU is fp32 only
TRT_PRECISIONS = ("fp16", "fp32")  # TensorRT engines; the first is its default
# An engine built by `score`/`bench` covers batch 1..256 (opt = the batch size): one engine per
# GPU x ONNX x precision serves every batch size up to this (`export tensorrt --max-batch` overrides).
TRT_WIDE_MAX_BATCH = 256
# onnxruntime execution providers we configure. Not "tensorrt": onnxruntime-gpu 1.31.1's TensorRT provider
# links TensorRT 10 while the tensorrt extra installs 11 (issue 12, D4); the native TensorRT backend covers.
ORT_PROVIDERS = ("cpu", "cuda")
