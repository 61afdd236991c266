"""FLOPs of a model: 2 x the multiply-accumulates of its Conv, ConvTranspose, Gemm and MatMul
nodes (attention's activation products included), at batch 1 (every symbolic size counts as 1).

Other ops (activations, normalisations, pooling, elementwise) are left out: they are a few percent
of a CNN's or a transformer's work and scale with the same channel counts. Shapes come from onnx
shape inference (groups.static_shapes); a node whose shapes are not known counts 0 and is listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from .groups import static_shapes

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Flops:
    total: int = 0
    per_node: dict[int, int] = field(default_factory=dict)  # main-graph node position -> FLOPs
    unknown: list[str] = field(default_factory=list)  # counted nodes whose shapes are not known


def _dims(shape) -> list[int] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def count(model: onnx.ModelProto, shapes: dict | None = None) -> Flops:
    shapes = static_shapes(model) if shapes is None else shapes
    consts = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = list(n.attribute[0].t.dims)
    out = Flops()
    for pos, node in enumerate(model.graph.node):
        if node.op_type not in COUNTED:
            continue
        dims = [_dims(consts.get(i, shapes.get(i))) if i else None for i in node.input]
        y = _dims(shapes.get(node.output[0]))
        macs = _macs(node, dims, y)
        if macs is None:
            out.unknown.append(node.name or f"{node.op_type}_{pos}")
            continue
        out.per_node[pos] = 2 * macs
        out.total += 2 * macs
    return out


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _macs(node, dims, y) -> int | None:
    op = node.op_type
    if len(dims) < 2 or dims[0] is None or dims[1] is None:
        return None
    x, w = dims[0], dims[1]
    if op == "Conv":
        return None if y is None else math.prod(y) * w[1] * math.prod(w[2:])
    if op == "ConvTranspose":  # every input position meets every kernel tap of its group
        return math.prod(x) * w[1] * math.prod(w[2:])
    if op == "Gemm":
        k = x[0] if _attr(node, "transA", 0) else x[-1]
        return None if y is None else math.prod(y) * k
    k = x[-1] if len(x) > 0 else 1  # MatMul: every output element is a dot product of length K
    return None if y is None else math.prod(y) * k



def params_per_node(model: onnx.ModelProto) -> dict[int, int]:
    """Main-graph node position -> elements of the constant tensors it reads (initializers and
    Constant outputs, behind Identity and Cast)."""
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            sizes[n.output[0]] = math.prod(n.attribute[0].t.dims)
        elif n.op_type in ("Identity", "Cast") and n.input and n.input[0] in sizes:
            sizes[n.output[0]] = sizes[n.input[0]]
    return {pos: sum(sizes.get(i, 0) for i in n.input) for pos, n in enumerate(model.graph.node)
            if n.op_type not in ("Identity", "Cast", "Constant")}
