"""TensorRT engines for the exported ONNX model: ``engine_cache`` (identity, key, sidecar, lookup/store),
``builder`` (build + parity-gated fp16 retry + ``get_or_build_engine``) and ``executor`` (runs one engine).

Engines do not move between GPU models or TensorRT versions, so `score` builds one on demand on the machine
that runs it and caches it under a key made of everything that makes an engine valid. ``tensorrt``, ``torch``,
``onnx`` and ``onnxruntime`` are imported inside functions: cache-key code and tests run without them.
"""
