"""Questions about a model's structure: exposing inner tensors, the chain behind the bound, stages.

These read the graph around the layers that graph.py finds; they never touch weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, numpy_helper

from .graph import Layer, _body, iter_graphs, model_inputs


# ----------------------------------------------------------------------------- exposing activations

@dataclass
class Exposed:
    """Where a layer input shows up in the augmented model's outputs."""

    output: str  # output (or graph input) name to read
    stacked: int  # leading axes added by Loop/Scan iterations, to be merged into the sample axis
    shape: str | None = None  # when set, `output` is flattened and this output holds its shape

    def value(self, values: dict) -> np.ndarray:
        """The tensor as the layer sees it (stacked axes first), from a run's named outputs."""
        x = values[self.output]
        if self.shape is None or x.size == 0:  # empty: the branch was not taken
            return x
        shape = values[self.shape]
        return x.reshape(x.shape[:-1] + tuple(shape.reshape(-1, shape.shape[-1])[0]))


def expose(model: ModelProto, tensors: list[tuple[str, tuple, np.dtype]]) -> tuple[ModelProto, dict]:
    """A copy of the model whose outputs also carry each (name, scope, dtype) tensor.

    A tensor inside an If branch becomes an extra output of both branches (the other branch
    yields an empty tensor); inside a Loop or Scan body it becomes a scan output, one slice per
    iteration. Outputs are added untyped, so no shape inference is needed.

    Before opset 11, If merges the shapes its branches yield strictly, so the empty stand-in
    must match the tensor's rank, which is not known without shape inference. There the tensor
    leaves its branch flattened, beside its shape, and both stand-ins are rank-1 tensors of a
    length computed at run time (so inference cannot find a mismatching dimension either).
    """
    aug = ModelProto()
    aug.CopyFrom(model)
    graph_inputs = {i.name for i in model_inputs(model)}
    outputs = {o.name for o in aug.graph.output}
    taken = {n for g in iter_graphs(aug.graph) for node in g.node for n in node.output} | outputs
    result = {}
    node_map = _node_map(model, aug)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def fresh(base):
        k, name = 0, f"{base}__lobs"
        while name in taken:
            k += 1
            name = f"{base}__lobs{k}"
        taken.add(name)
        return name

    for name, scope, dtype in tensors:
        key = (name, tuple((id(n), a) for n, a in scope))
        if key in result:
            continue
        if not scope:
            if name in graph_inputs or name in outputs:
                result[key] = Exposed(name, 0)
                continue
            aug.graph.output.append(onnx.ValueInfoProto(name=name))
            outputs.add(name)
            result[key] = Exposed(name, 0)
            continue
        current, shape, stacked = name, None, 0
        legacy = opset < 11
        for depth in range(len(scope) - 1, -1, -1):
            parent, attr = scope[depth]
            parent = node_map[id(parent)][1]
            if legacy and parent.op_type == "If" and shape is None:
                current, shape = _flatten(_body(parent, attr), current, fresh)
            current, added = _lift(parent, attr, current, fresh, dtype, legacy)
            if shape is not None:
                shape, _ = _lift(parent, attr, shape, fresh, np.int64, legacy)
            stacked += added
        for out in (current, shape):
            if out is not None:
                aug.graph.output.append(onnx.ValueInfoProto(name=out))
        result[key] = Exposed(current, stacked, shape)
    return aug, result


def _node_map(model: ModelProto, aug: ModelProto) -> dict[int, NodeProto]:
    """id(original node) -> (that node, kept alive so the id stays its own; the same node in the copy)."""
    mapping = {}
    for g0, g1 in zip(iter_graphs(model.graph), iter_graphs(aug.graph)):
        for n0, n1 in zip(g0.node, g1.node):
            mapping[id(n0)] = (n0, n1)
    return mapping


def _constant(name: str, array: np.ndarray) -> NodeProto:
    return onnx.helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_value"))


def _flatten(body: onnx.GraphProto, name: str, fresh) -> tuple[str, str]:
    """A rank-1 view of a body tensor and its shape, both new outputs' names in the body."""
    flat, shape, minus_one = fresh(name + "_flat"), fresh(name + "_shape"), fresh(name + "_minus_one")
    body.node.extend([_constant(minus_one, np.array([-1], np.int64)),
                      onnx.helper.make_node("Reshape", [name, minus_one], [flat]),
                      onnx.helper.make_node("Shape", [name], [shape])])
    return flat, shape


def _empty_nodes(name: str, dtype, fresh, legacy: bool, cond: str) -> list[NodeProto]:
    """Nodes yielding an empty tensor `name`: a constant, or (legacy) one whose length inference cannot see.

    The length, 0, is computed from the If's condition (0 * cond), a run-time value: onnxruntime
    propagates constants and shapes into shape inference, but not that.
    """
    value = np.zeros((0,), dtype=dtype)
    if not legacy:
        return [_constant(name, value)]
    source, zero, flag, product, length = (fresh(name + s) for s in ("_source", "_zero", "_flag", "_product",
                                                                     "_length"))
    one = fresh(name + "_one")
    return [_constant(source, value), _constant(zero, np.array([0], np.int64)),
            _constant(one, np.array([1], np.int64)),
            onnx.helper.make_node("Cast", [cond], [flag], to=onnx.TensorProto.INT64),
            onnx.helper.make_node("Mul", [zero, flag], [product]),
            onnx.helper.make_node("Reshape", [product, one], [length]),
            onnx.helper.make_node("Reshape", [source, length], [name])]


def _lift(parent: NodeProto, attr: str, name: str, fresh, dtype, legacy: bool = False) -> tuple[str, int]:
    """Make tensor `name` of parent's subgraph `attr` an output of the parent node.

    The body outputs an Identity of the tensor rather than the tensor itself: onnxruntime
    yields zeros for a scan output that is a body input passed straight through. dtype is only
    needed for the empty stand-in in an If's other branch: a layer's input has its weight's
    type, so the caller knows it without shape inference.
    """
    out = fresh(name)
    body = _body(parent, attr)
    copy = fresh(name + "_copy")
    body.node.append(onnx.helper.make_node("Identity", [name], [copy]))
    body.output.append(onnx.ValueInfoProto(name=copy))
    parent.output.append(out)
    if parent.op_type == "If":
        other = _body(parent, "else_branch" if attr == "then_branch" else "then_branch")
        empty = fresh(name + "_empty")
        other.node.extend(_empty_nodes(empty, dtype, fresh, legacy, parent.input[0]))
        other.output.append(onnx.ValueInfoProto(name=empty))
        return out, 0
    if parent.op_type == "Scan":
        n_scan_out = len(body.output) - (len(body.input) - _num_scan_inputs(parent))
        for a in parent.attribute:
            if a.name in ("scan_output_axes", "scan_output_directions") and len(a.ints) < n_scan_out:
                a.ints.append(0)
    return out, 1


def _num_scan_inputs(node: NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "num_scan_inputs")


# ----------------------------------------------------------------------------- the chain behind the bound

# Ops through which a perturbation cannot grow (1-Lipschitz in the L2 norm).
NON_EXPANSIVE = {"Relu", "Identity", "Dropout", "Flatten", "Reshape", "Transpose", "Squeeze",
                 "Unsqueeze", "Tanh", "Sigmoid", "Clip", "Softsign", "Softmax", "Neg", "Abs"}


def _pool_gain(node: NodeProto) -> float:
    """Max pooling is 1-Lipschitz per window; overlapping windows count an input more than once."""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    k = a.get("kernel_shape", [])
    s = a.get("strides", [1] * len(k))
    dil = a.get("dilations", [1] * len(k))
    overlap = 1
    for kk, ss, dd in zip(k, s, dil):
        overlap *= min(kk, -(-((kk - 1) * dd + 1) // ss))
    return overlap ** 0.5


def layer_chain(model: ModelProto, layers: list[Layer]):
    """The layers in order on the only path from the input to the single output, with the gains
    of the ops between them: ([(layer, gain_into_layer)], gain_after_last). A string says why
    the model is not such a chain (then the paper's bound does not apply as stated)."""
    g = model.graph
    if len(g.output) != 1:
        return "the model has more than one output"
    by_node = {}
    for layer in layers:
        for u in layer.uses:
            by_node[id(u.node)] = layer
    producers = {o: n for n in g.node for o in n.output}
    inputs = {i.name for i in g.input}
    chain, gain, seen = [], 1.0, set()
    t = g.output[0].name
    while t not in inputs:
        node = producers.get(t)
        if node is None:
            return f"tensor '{t}' is not computed from the model input"
        if id(node) in by_node:
            layer = by_node[id(node)]
            if len(layer.uses) > 1:
                return f"layer {layer.name} shares its weight with other nodes"
            chain.append((layer, gain))
            seen.add(id(layer))
            gain = 1.0
        elif node.op_type in NON_EXPANSIVE:
            pass
        elif node.op_type == "MaxPool":
            gain *= _pool_gain(node)
        elif node.op_type == "LeakyRelu" and abs(onnx.helper.get_attribute_value(node.attribute[0])
                                                 if node.attribute else 0.01) <= 1:
            pass
        else:
            return f"the output passes through {node.name or node.op_type} ({node.op_type}), which the bound does not cover"
        t = node.input[0]
    missing = [l.name for l in layers if id(l) not in seen]
    if missing:
        return f"layer {missing[0]} is not on the path from the input to the output"
    chain.reverse()
    # chain entries hold the gain *after* each layer; shift to gains into each layer
    gains_after = [g_ for _, g_ in chain]
    into = [gain] + gains_after[:-1]
    return [(layer, gi) for (layer, _), gi in zip(chain, into)], gains_after[-1] if chain else 1.0


# ----------------------------------------------------------------------------- stages for sequential mode

def layer_stages(model: ModelProto, layers: list[Layer]) -> list[list[Layer]]:
    """Layers grouped so that no layer depends on another of its own stage.

    A layer's stage is the largest number of layers on any path from the model inputs to its
    input; layers in one stage can be calibrated in the same pass. Bodies of If/Loop/Scan are
    walked with their outer scope, so a body layer fed by an outer layer comes after it.
    """
    by_node = {}
    for layer in layers:
        for u in layer.uses:
            by_node[id(u.node)] = layer
    stage: dict[int, int] = {}

    def visit(graph, depth: dict) -> int:
        deepest = 0
        for node in graph.node:
            d = max((depth.get(i, 0) for i in node.input if i), default=0)
            inner = d
            for a in node.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for sub in subs:
                    local = dict(depth)
                    local.update({i.name: d for i in sub.input})
                    inner = max(inner, visit(sub, local))
            layer = by_node.get(id(node))
            if layer is not None:
                stage[id(layer)] = max(stage.get(id(layer), 0), d)
                out = d + 1
            else:
                out = inner
            for o in node.output:
                depth[o] = out
            deepest = max(deepest, out)
        return deepest

    visit(model.graph, {})
    groups: dict[int, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(stage.get(id(layer), 0), []).append(layer)
    return [groups[k] for k in sorted(groups)]
