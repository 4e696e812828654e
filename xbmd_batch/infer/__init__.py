"""Inference: one runner protocol over torch, onnxruntime and TensorRT (Polygraphy-style).

Modules, top to bottom: ``select.open_runner`` picks a backend for a model file (``model_file.open_model``
reads it once); ``torch_runner`` / ``ort_runner`` / ``trt_runner`` implement ``base.Runner``; ``compare``
measures one runner against another; ``tensorrt/`` holds the engine cache, builder and executor. Nothing here
renders synthetic data: parity inputs come from the caller (``xbmd_batch.parity_feeds``). This ``__init__``
imports nothing, so importing one submodule never loads the others.
"""
