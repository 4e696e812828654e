"""fp16 copy of an fp32 ONNX graph (graph surgery, not runtime): used by the TensorRT builder on TensorRT 11
(strongly typed, so the graph itself must be fp16) and by ``python -m export onnx --fp16``.

``onnx`` and ``onnxruntime`` are imported inside functions.
"""

from __future__ import annotations

from typing import Any


def to_fp16_onnx(model_proto: Any, keep_fp32_ops: tuple[str, ...] = ()) -> Any:
    """An fp16 copy of an fp32 ONNX graph, I/O kept float32, ``keep_fp32_ops`` left in fp32.

    Uses onnxruntime's converter (onnxconverter-common is not a dependency). The converter appends its Cast
    nodes at the end and leaves stale value_info, which onnx.checker rejects; both are repaired here. Also
    used by ``python -m export onnx --fp16``.
    """
    from onnxruntime.transformers import float16

    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    m16 = float16.convert_float_to_float16(model_proto, keep_io_types=True, op_block_list=block)
    toposort_graph(m16.graph)
    del m16.graph.value_info[:]
    return m16


def toposort_graph(graph: Any) -> None:
    """Reorder ``graph.node`` topologically in place (Kahn); raises if the graph has a cycle."""
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
