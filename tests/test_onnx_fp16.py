"""fp16 graph conversion (strongly typed TensorRT builds and ``python -m export onnx --fp16``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from xbmd_batch.onnx_fp16 import to_fp16_onnx, toposort_graph


def _ln_softmax_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], rng.standard_normal(64).astype(np.float32))
    g = helper.make_tensor("g", TensorProto.FLOAT, [8], np.ones(8, np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [8], np.zeros(8, np.float32))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], axis=-1),
        helper.make_node("Softmax", ["n"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "t", [x], [y], [w, g, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_to_fp16_onnx_keeps_io_and_blocked_ops_fp32() -> None:
    ort = pytest.importorskip("onnxruntime", reason="the fp16 converter ships with onnxruntime")
    m = _ln_softmax_model()
    m16 = to_fp16_onnx(m, ("LayerNormalization", "Softmax"))
    onnx.checker.check_model(m16, full_check=True)  # sorted, no stale value_info
    assert m16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {t.name: t.data_type for t in m16.graph.initializer}["w"] == TensorProto.FLOAT16
    ln = next(n for n in m16.graph.node if n.op_type == "LayerNormalization")
    casts_into_ln = [
        n for n in m16.graph.node if n.output and n.output[0] == ln.input[0] and n.op_type == "Cast"
    ]
    assert casts_into_ln and casts_into_ln[0].attribute[0].i == TensorProto.FLOAT
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    got = ort.InferenceSession(m16.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    np.testing.assert_allclose(got, ref, atol=5e-3)


def test_toposort_restores_order() -> None:
    m = _ln_softmax_model()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)
    toposort_graph(m.graph)
    onnx.checker.check_model(m)
    assert [n.op_type for n in m.graph.node] == ["MatMul", "LayerNormalization", "Softmax"]
