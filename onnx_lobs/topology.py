"""Questions about a model's structure around its layers: the chain behind the bound, stages.

These read the graph around the layers that graph.py finds; they never touch weights.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import ModelProto, NodeProto

from .graph import Layer
from .index import GraphIndex, subgraphs
from .layers import node_attrs
from .layers.conv import window_overlap


# ----------------------------------------------------------------------------- the chain behind the bound

# Ops through which a perturbation cannot grow (1-Lipschitz in the L2 norm).
NON_EXPANSIVE = {"Relu", "Identity", "Dropout", "Flatten", "Reshape", "Transpose", "Squeeze",
                 "Unsqueeze", "Tanh", "Sigmoid", "Clip", "Softsign", "Softmax", "Neg", "Abs"}


def _pool_gain(node: NodeProto) -> float:
    """Max pooling is 1-Lipschitz per window; overlapping windows count an input more than once."""
    a = node_attrs(node)
    k = a.get("kernel_shape", [])
    return window_overlap(k, a.get("strides", [1] * len(k)), a.get("dilations", [1] * len(k))) ** 0.5


def _by_node(index: GraphIndex, layers: list[Layer]) -> dict:
    """This index's IR node of every use of the layers (found by path: layers may come from a copy)."""
    return {index.at(u.site.path).node: layer for layer in layers for u in layer.uses}


def layer_chain(model: ModelProto, layers: list[Layer]):
    """The layers in order on the only path from the input to the single output, with the gains
    of the ops between them: ([(layer, gain_into_layer)], gain_after_last). A string says why
    the model is not such a chain (then the paper's bound does not apply as stated)."""
    index = GraphIndex(model)
    g = index.ir.graph
    if len(g.outputs) != 1:
        return "the model has more than one output"
    by_node = _by_node(index, layers)
    inputs = set(g.inputs)
    chain, gain, seen = [], 1.0, set()
    t = g.outputs[0]
    while t not in inputs:
        node = t.producer() if t is not None else None
        if node is None:
            return f"tensor '{t.name if t is not None else ''}' is not computed from the model input"
        proto = index.site(node).proto
        if node in by_node:
            layer = by_node[node]
            if len(layer.uses) > 1:
                return f"layer {layer.name} shares its weight with other nodes"
            chain.append((layer, gain))
            seen.add(id(layer))
            gain = 1.0
        elif node.op_type in NON_EXPANSIVE:
            pass
        elif node.op_type == "MaxPool":
            gain *= _pool_gain(proto)
        elif node.op_type == "LeakyRelu" and abs(onnx.helper.get_attribute_value(proto.attribute[0])
                                                 if proto.attribute else 0.01) <= 1:
            pass
        else:
            return (f"the output passes through {proto.name or node.op_type} ({node.op_type}), "
                    "which the bound does not cover")
        t = node.inputs[0]
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
    index = GraphIndex(model)
    by_node = _by_node(index, layers)
    stage: dict[int, int] = {}
    depth: dict[ir.Value, int] = {}

    def visit(graph: ir.Graph) -> int:
        deepest = 0
        for node in graph:
            d = max((depth.get(v, 0) for v in node.inputs if v is not None and v.name), default=0)
            inner = d
            for _, body in subgraphs(node):
                depth.update({v: d for v in body.inputs})
                inner = max(inner, visit(body))
            layer = by_node.get(node)
            if layer is not None:
                stage[id(layer)] = max(stage.get(id(layer), 0), d)
                out = d + 1
            else:
                out = inner
            for v in node.outputs:
                depth[v] = out
            deepest = max(deepest, out)
        return deepest

    visit(index.ir.graph)
    groups: dict[int, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(stage.get(id(layer), 0), []).append(layer)
    return [groups[k] for k in sorted(groups)]
