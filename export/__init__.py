"""The ML engineer's export step (run from a checkout): checkpoint -> ONNX (+ card, checks) -> TensorRT.

``python -m export onnx CKPT --out model.onnx`` and ``python -m export tensorrt model.onnx``. The TensorRT
builder and engine cache live in the installed package (``xbmd_batch.infer.tensorrt``) because ``score``
builds engines on demand; this package only calls them. Nothing in ``xbmd_batch`` imports this package.
"""

from __future__ import annotations
