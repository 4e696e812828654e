"""fp16 copy of an fp32 ONNX graph (graph surgery, not runtime): used by the TensorRT builder on TensorRT 11
(strongly typed, so the graph itself must be fp16) and by ``python -m export onnx --fp16``. Needs only
``onnx`` and ``numpy``, so it behaves the same whichever onnxruntime is installed.

Why not onnxruntime's ``float16.convert_float_to_float16``: its output depends on the installed onnxruntime.
onnxruntime(-gpu) 1.30/1.31 insert one Cast per (blocked node, input) under one name, so a tensor that feeds
two LayerNorm/Softmax nodes gives a graph that is not in SSA form (onnx.checker and onnxruntime refuse it;
TensorRT's parser says "duplicate tensor name"); 1.32 fixed that. This conversion is the same everywhere.

The rule, per tensor: every float32 tensor has a *home* precision, where its producer writes it (an fp16
node writes fp16; a node kept in fp32 writes fp32; graph inputs stay fp32 (``keep_io_types``); an initializer
or Constant is stored in fp16 unless a consumer needs fp32). A consumer that needs the other precision reads
a Cast of it, made once per (tensor, target) pair, so the result is in SSA form by construction. Graph
outputs stay fp32. A node stays fp32 when its op type is in ``keep_fp32_ops``, when its ONNX schema does not
allow float16 for one of its float inputs/outputs, when its output type comes from an attribute we do not
rewrite (Random*, EyeLike), or when its domain is unknown.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The only IR version this project writes. 10 = onnx 1.16..1.17; read by onnxruntime >= 1.18 and by
# TensorRT 10/11's ONNX parser. onnx >= 1.19's helper.make_model writes 11+ (onnx 1.23 writes 14), which
# onnxruntime 1.31 (max 13) cannot load.
ONNX_IR_VERSION = 10

FP16_MAX = float(np.finfo(np.float16).max)
# Ops whose float output type is chosen by an attribute this converter does not rewrite: kept in fp32.
_ATTR_TYPED_OPS = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "EyeLike",
        "Multinomial",
        "Bernoulli",
    }
)
_SOURCE_OPS = frozenset({"Constant", "ConstantOfShape"})  # stored like initializers


class Fp16ConversionError(ValueError):
    """The graph cannot be converted (unknown tensor types, control-flow subgraphs)."""


def pin_ir_version(model: Any, ir_version: int = ONNX_IR_VERSION) -> Any:
    """Set ``model.ir_version`` to the project's IR version (in place; returns the model)."""
    model.ir_version = int(ir_version)
    return model


def _to_fp16_array(a: np.ndarray) -> np.ndarray:
    """Finite values clipped to the fp16 range (a -3.4e38 mask value must not turn into -inf)."""
    a = np.asarray(a, dtype=np.float32)
    finite = np.isfinite(a)
    return np.where(finite, np.clip(a, -FP16_MAX, FP16_MAX), a).astype(np.float16)


def _fp16_array_tensor(a: Any, name: str) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(_to_fp16_array(np.asarray(a)), name)


def _fp16_tensor(t: Any) -> Any:
    from onnx import numpy_helper

    return _fp16_array_tensor(numpy_helper.to_array(t), t.name)


def _opset(model: Any, domain: str) -> int:
    for o in model.opset_import:
        if (o.domain or "") == (domain or ""):
            return int(o.version)
    return 0


def _allows_fp16(schema: Any, formals: list[Any], index: int) -> bool:
    """Whether formal parameter ``index`` (variadic: the last one repeats) admits tensor(float16)."""
    if not formals:
        return False
    formal = formals[min(index, len(formals) - 1)]
    allowed = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
    return "tensor(float16)" in allowed.get(formal.type_str, {formal.type_str})


def _node_can_be_fp16(node: Any, model: Any, is_float: Any) -> bool:
    import onnx

    if node.op_type in _ATTR_TYPED_OPS:
        return False
    try:
        schema = onnx.defs.get_schema(node.op_type, _opset(model, node.domain), node.domain)
    except Exception:  # unknown op / domain: leave it alone (fp32)
        return False
    for i, name in enumerate(node.input):
        if name and is_float(name) and not _allows_fp16(schema, list(schema.inputs), i):
            return False
    for i, name in enumerate(node.output):
        if name and is_float(name) and not _allows_fp16(schema, list(schema.outputs), i):
            return False
    return True


def to_fp16_onnx(model_proto: Any, keep_fp32_ops: tuple[str, ...] | list[str] = ()) -> Any:
    """An fp16 copy of an fp32 ONNX model: I/O stay float32, ``keep_fp32_ops`` run in fp32; SSA by design.

    The result has no ``value_info`` (onnx.checker / runtimes re-infer it), its nodes in topological order and
    the project's IR version.
    """
    import onnx
    from onnx import TensorProto, helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    src = onnx.ModelProto()
    src.CopyFrom(model_proto)
    g = src.graph
    toposort_graph(g)
    for node in g.node:
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise Fp16ConversionError(
                    f"node {node.name or node.op_type!r} ({node.op_type}) has a control-flow subgraph; "
                    "the fp16 conversion does not handle those"
                )

    # element type of every tensor, from the fp32 graph (shape inference fills the intermediates)
    inferred = onnx.shape_inference.infer_shapes(src, strict_mode=False, data_prop=False)
    elem: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type"):
            elem[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        elem[t.name] = t.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    elem[node.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    elem[node.output[0]] = FLOAT
    unknown = [o for n in g.node for o in n.output if o and o not in elem]
    if unknown:
        raise Fp16ConversionError(
            f"shape inference left the type of {len(unknown)} tensor(s) unknown (first: {unknown[:3]}); "
            "cannot decide which are float32"
        )

    def is_float(name: str) -> bool:
        return elem.get(name) == FLOAT

    keep = set(keep_fp32_ops)
    nodes = list(g.node)  # indices below refer to this order (protobuf wrappers have no stable identity)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(i)

    # node precision: fp16 unless kept; sources (Constant*) follow their consumers like initializers do
    half_node: dict[int, bool] = {}
    for i, node in enumerate(nodes):
        if node.op_type not in _SOURCE_OPS:
            half_node[i] = node.op_type not in keep and _node_can_be_fp16(node, src, is_float)

    def wants_half(consumer: int) -> bool:
        return half_node.get(consumer, True)

    for i, node in enumerate(nodes):
        if node.op_type in _SOURCE_OPS:
            users = consumers.get(node.output[0], [])
            half_node[i] = bool(users) and all(wants_half(u) for u in users)

    output_names = {o.name for o in g.output}
    home: dict[str, int] = {}  # float32 tensor -> HALF or FLOAT, where it lives in the new graph
    for vi in g.input:
        if is_float(vi.name):
            home[vi.name] = FLOAT  # keep_io_types
    new_inits = []
    for t in g.initializer:
        if t.data_type == FLOAT:
            users = consumers.get(t.name, [])
            if users and all(wants_half(u) for u in users):
                new_inits.append(_fp16_tensor(t))
                home[t.name] = HALF
            else:
                new_inits.append(t)
                home[t.name] = FLOAT
        else:
            new_inits.append(t)

    casts: dict[tuple[str, int], str] = {}
    out_nodes: list[Any] = []
    taken = {n.name for n in g.node if n.name} | set(elem) | {t.name for t in g.initializer}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def cast_of(name: str, to: int) -> str:
        """The tensor ``name`` in precision ``to``: itself, or one shared Cast of it."""
        if home[name] == to:
            return name
        key = (name, to)
        if key not in casts:
            suffix = "fp16" if to == HALF else "fp32"
            out = fresh(f"{name}_to_{suffix}")
            out_nodes.append(helper.make_node("Cast", [name], [out], name=fresh(f"{out}_cast"), to=to))
            casts[key] = out
        return casts[key]

    renamed_outputs: dict[str, str] = {}
    for i, node in enumerate(nodes):
        half = half_node[i]
        want = HALF if half else FLOAT
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(new.input):
            if name and is_float(name):
                if name not in home:
                    raise Fp16ConversionError(f"tensor {name!r} is used before it is produced")
                new.input[i] = cast_of(name, want)
        if half:
            for a in new.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                    a.i = HALF
                elif node.op_type in _SOURCE_OPS and a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(_fp16_tensor(a.t))
            if node.op_type == "Constant":  # value_float(s) -> an fp16 tensor "value"
                for a in list(new.attribute):
                    if a.name in ("value_float", "value_floats"):
                        arr = np.float32(a.f) if a.name == "value_float" else np.asarray(a.floats, np.float32)
                        new.attribute.remove(a)
                        new.attribute.append(helper.make_attribute("value", _fp16_array_tensor(arr, "value")))
            if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in new.attribute):
                if is_float(node.output[0]):  # the default value is a float32 zero
                    new.attribute.append(
                        helper.make_attribute("value", _fp16_array_tensor(np.zeros(1), "value"))
                    )
        for i, name in enumerate(new.output):
            if name and is_float(name):
                home[name] = want
                if want == HALF and name in output_names:  # graph outputs stay float32
                    inner = fresh(f"{name}_fp16")
                    new.output[i] = inner
                    renamed_outputs[name] = inner
                    home[inner] = HALF
        out_nodes.append(new)
        for name, inner in list(renamed_outputs.items()):
            if inner in new.output:
                out_nodes.append(
                    helper.make_node("Cast", [inner], [name], name=fresh(f"{name}_cast_to_fp32"), to=FLOAT)
                )
                home[name] = FLOAT

    del g.node[:]
    g.node.extend(out_nodes)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    del g.value_info[:]
    toposort_graph(g)
    pin_ir_version(src)
    return src


def toposort_graph(graph: Any) -> None:
    """Reorder ``graph.node`` topologically in place (Kahn, stable); raises if the graph has a cycle."""
    import collections

    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    users: dict[int, list[int]] = collections.defaultdict(list)
    indeg = [0] * len(nodes)
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in n.input if x in producer}
        for d in deps:
            users[d].append(i)
        indeg[i] = len(deps)
    ready = collections.deque(i for i, d in enumerate(indeg) if d == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise ValueError("ONNX graph has a cycle; cannot sort it")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
