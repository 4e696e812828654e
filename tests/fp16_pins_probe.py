"""The fp16 conversion and the IR version under this interpreter's onnx/onnxruntime (no torch needed).

Run by tests/test_onnx_fp16.py with the current interpreter, and with the GPU extra's pins
(requirements/gpu-pins.txt: onnxruntime-gpu 1.31.1, onnx 1.23.2) by ``make gpu-pins`` and
benchmarks/gpu_first_light.sh. onnxruntime 1.31.1's own converter fails this probe (duplicate Cast outputs)
and onnx 1.23's default IR version (14) does not load there; the project's conversion must pass it.

    PYTHONPATH=. python tests/fp16_pins_probe.py [--model model.onnx]   # prints JSON, exit 1 on failure
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

KEEP = ("LayerNormalization", "Softmax", "ReduceMean")


def shared_ln_model() -> onnx.ModelProto:
    """One activation and one weight pair feed two LayerNorms: what onnxruntime 1.31's converter breaks."""
    from xbmd_batch.onnx_fp16 import ONNX_IR_VERSION

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])
    m = helper.make_tensor_value_info("m", TensorProto.FLOAT, ["B", 1])
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], rng.standard_normal(64).astype(np.float32))
    g = helper.make_tensor("g", TensorProto.FLOAT, [8], (1 + 0.1 * rng.standard_normal(8)).astype(np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [8], (0.1 * rng.standard_normal(8)).astype(np.float32))
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "g", "b"], ["n1"], axis=-1),
        helper.make_node("LayerNormalization", ["h", "g", "b"], ["n2"], axis=-1),
        helper.make_node("Add", ["n1", "n2"], ["s"]),
        helper.make_node("Constant", [], ["c"], value_float=0.5),
        helper.make_node("Mul", ["s", "c"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["y"], axis=-1),
        helper.make_node("ReduceMean", ["s2", "axes"], ["m"], keepdims=1),
    ]
    graph = helper.make_graph(nodes, "shared_ln", [x], [y, m], [w, g, b, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=ONNX_IR_VERSION)


def _feeds(model: onnx.ModelProto, batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    if "meta_mask" in feeds:
        feeds["meta_mask"] = np.ones_like(feeds["meta_mask"])
    return feeds


def probe(model: onnx.ModelProto, keep: tuple[str, ...]) -> dict[str, Any]:
    import onnxruntime as ort

    from xbmd_batch.onnx_fp16 import ONNX_IR_VERSION, to_fp16_onnx

    m16 = to_fp16_onnx(model, keep)
    outs = [o for n in m16.graph.node for o in n.output]
    names = [n.name for n in m16.graph.node if n.name]
    res: dict[str, Any] = {
        "keep_fp32_ops": list(keep),
        "ir_version": m16.ir_version,
        "duplicate_outputs": sorted({o for o in outs if outs.count(o) > 1}),
        "duplicate_node_names": sorted({n for n in names if names.count(n) > 1}),
    }
    onnx.checker.check_model(m16, full_check=True)
    feeds = _feeds(model)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(m16.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    res["max_abs_diff"] = max(float(np.max(np.abs(a - r))) for a, r in zip(got, ref, strict=True))
    res["output_dtypes"] = [str(a.dtype) for a in got]
    res["ok"] = (
        not res["duplicate_outputs"]
        and not res["duplicate_node_names"]
        and m16.ir_version == ONNX_IR_VERSION
        and all(d == "float32" for d in res["output_dtypes"])
        and res["max_abs_diff"] < 2e-2
    )
    return res


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="also probe this exported fp32 .onnx file")
    a = p.parse_args(argv)
    report: dict[str, Any] = {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "probes": []}
    models = [("shared_ln", shared_ln_model())]
    if a.model:
        models.append((a.model, onnx.load(a.model)))
    ok = True
    for name, model in models:
        for keep in ((), KEEP):
            try:
                r = probe(model, keep)
            except Exception as e:  # any failure is the probe's answer, reported as such
                r = {"keep_fp32_ops": list(keep), "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            r["model"] = name
            report["probes"].append(r)
            ok = ok and bool(r["ok"])
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
