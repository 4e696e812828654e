"""fp16 graph conversion (strongly typed TensorRT builds and ``python -m export onnx --fp16``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from xbmd_batch.onnx_fp16 import ONNX_IR_VERSION, pin_ir_version, to_fp16_onnx, toposort_graph


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
    # explicit IR version (D5): onnx 1.23's default (14) does not load in onnxruntime-gpu 1.31.1
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=ONNX_IR_VERSION)


def test_to_fp16_onnx_keeps_io_and_blocked_ops_fp32() -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the parity check")
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


# ---------------------------------------------------------------- D2/D3/D5: owned conversion, SSA, IR version


def _shared_ln_model() -> onnx.ModelProto:
    import fp16_pins_probe

    return fp16_pins_probe.shared_ln_model()


@pytest.mark.parametrize("keep", [(), ("LayerNormalization", "Softmax", "ReduceMean")])
def test_shared_inputs_of_kept_ops_stay_ssa_and_match(keep: tuple[str, ...]) -> None:
    """One activation and one LN weight pair feed two LayerNorms: onnxruntime-gpu 1.31.1's converter emitted
    two Casts with one output name here (checker: not SSA; TensorRT: "duplicate tensor name")."""
    import fp16_pins_probe

    r = fp16_pins_probe.probe(_shared_ln_model(), keep)
    assert r["duplicate_outputs"] == [] and r["duplicate_node_names"] == []
    assert r["ok"], r
    m16 = to_fp16_onnx(_shared_ln_model(), keep)
    casts = [n for n in m16.graph.node if n.op_type == "Cast"]
    if keep:  # h feeds both LNs through ONE cast; the LN weight/bias stay fp32 (no cast at all)
        assert sum(1 for n in casts if list(n.input) == ["h"]) == 1
        inits = {t.name: t.data_type for t in m16.graph.initializer}
        assert inits["g"] == inits["b"] == TensorProto.FLOAT and inits["w"] == TensorProto.FLOAT16
        kept = [n for n in m16.graph.node if n.op_type in keep]
        assert len(kept) == 4


def test_conversion_does_not_need_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Owned conversion: its result cannot depend on which onnxruntime (CPU 1.32, GPU 1.31.1) is installed."""
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "onnxruntime.transformers", None)
    m16 = to_fp16_onnx(_shared_ln_model(), ("LayerNormalization", "Softmax"))
    onnx.checker.check_model(m16, full_check=True)


def test_project_ir_version_and_old_ir_inputs() -> None:
    """D5: onnx >= 1.19 writes IR 11+ by default (1.23: 14), which onnxruntime 1.31 (max 13) refuses."""
    m = _shared_ln_model()
    m.ir_version = 14  # what helper.make_model gives under onnx 1.23
    m16 = to_fp16_onnx(m)
    assert m16.ir_version == ONNX_IR_VERSION == 10
    assert pin_ir_version(m).ir_version == ONNX_IR_VERSION


def test_constants_are_clipped_to_fp16_range_and_value_float_converted() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2])
    big = helper.make_tensor("big", TensorProto.FLOAT, [2], np.array([-3.4e38, 1.0], np.float32))
    nodes = [
        helper.make_node("Constant", [], ["k"], value_float=2.0),
        helper.make_node("Mul", ["x", "k"], ["xk"]),
        helper.make_node("Max", ["xk", "big"], ["y"]),
    ]
    m = helper.make_model(
        helper.make_graph(nodes, "c", [x], [y], [big]),
        opset_imports=[helper.make_opsetid("", 18)],
        ir_version=ONNX_IR_VERSION,
    )
    m16 = to_fp16_onnx(m)
    onnx.checker.check_model(m16, full_check=True)
    from onnx import numpy_helper

    b16 = numpy_helper.to_array(next(t for t in m16.graph.initializer if t.name == "big"))
    assert b16.dtype == np.float16 and np.isfinite(b16).all() and b16[0] == -np.finfo(np.float16).max
    k = next(n for n in m16.graph.node if n.op_type == "Constant")
    assert k.attribute[0].name == "value" and k.attribute[0].t.data_type == TensorProto.FLOAT16


def test_control_flow_is_refused_clearly() -> None:
    from xbmd_batch.onnx_fp16 import Fp16ConversionError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["o"])],
        "b",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    m = helper.make_model(
        helper.make_graph([node], "g", [c, x], [y]), opset_imports=[helper.make_opsetid("", 18)]
    )
    with pytest.raises(Fp16ConversionError, match="control-flow"):
        to_fp16_onnx(m)


def _run_probe(python: str) -> dict:
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [python, str(root / "tests" / "fp16_pins_probe.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
    )
    assert r.stdout.strip(), r.stderr
    return {"rc": r.returncode, **json.loads(r.stdout)}


def test_pins_probe_under_this_interpreter() -> None:
    import sys

    pytest.importorskip("onnxruntime")
    rep = _run_probe(sys.executable)
    assert rep["rc"] == 0 and rep["ok"], rep


def test_pins_probe_under_gpu_extra_pins() -> None:
    """D2/D5 under requirements/gpu-pins.txt (onnxruntime-gpu 1.31.1, onnx 1.23.2): `make gpu-pins` sets
    XBMD_GPU_PINS_PYTHON to a small venv with exactly those (runs on CPU)."""
    import os

    py = os.environ.get("XBMD_GPU_PINS_PYTHON")
    if not py:
        pytest.skip("XBMD_GPU_PINS_PYTHON not set: run `make gpu-pins` to check the GPU extra's pins")
    rep = _run_probe(py)
    assert rep["onnxruntime"] == "1.31.1", rep
    assert rep["rc"] == 0 and rep["ok"], rep
