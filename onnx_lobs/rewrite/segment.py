"""Rule: cut a model down to some nodes of its main graph, fed by the tensors they read from the
rest and yielding the tensors later segments need (sequential mode's segments, segments.py).

The values the kept nodes (and their bodies) read from outside become graph inputs of the given
element type and rank (shapes left dynamic); the graph's outputs become the requested values;
every other node, and every initializer nothing kept reads, is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ..index import subgraphs, values_by_name


@dataclass(frozen=True)
class Cut:
    nodes: tuple  # positions in the main graph of the nodes kept
    inputs: tuple  # (name, onnx element type, rank) of each value fed from outside
    outputs: tuple  # names of the values to yield


def _detach(node: ir.Node) -> None:
    """No longer a user of anything: its inputs, and those of every node of its bodies."""
    for i in range(len(node.inputs)):
        node.replace_input_with(i, None)
    for _, body in subgraphs(node):
        for inner in body:
            _detach(inner)


class ExtractSegment:
    name = "extract-segment"

    def check(self, model: ir.Model, cut: Cut) -> str | None:
        nodes = list(model.graph)
        if any(not 0 <= k < len(nodes) for k in cut.nodes):
            return f"node positions {list(cut.nodes)} are not all in a graph of {len(nodes)} nodes"
        values = values_by_name(model.graph)
        kept = {v.name for k in cut.nodes for v in nodes[k].outputs}
        missing = [n for n in cut.outputs if n not in kept]
        if missing:
            return f"'{missing[0]}' is not made by the kept nodes"
        unknown = [n for n, _, _ in cut.inputs if n not in values]
        if unknown:
            return f"no value '{unknown[0]}' in the main graph"
        return None

    def apply(self, model: ir.Model, cut: Cut) -> None:
        graph = model.graph
        nodes = list(graph)
        keep = {nodes[k] for k in cut.nodes}
        values = values_by_name(graph)
        fed = []
        for name, elem, rank in cut.inputs:
            new = ir.Value(name=name, type=ir.TensorType(ir.DataType(elem)), shape=ir.Shape([None] * rank))
            old = values[name]
            for usage in list(old.uses()):
                usage.node.replace_input_with(usage.idx, new)
            fed.append(new)
        outputs = [values[n] for n in cut.outputs]
        graph.outputs.clear()
        graph.inputs.clear()
        graph.inputs.extend(fed)
        graph.outputs.extend(outputs)
        drop = [n for n in nodes if n not in keep]
        for node in drop:
            _detach(node)
        graph.remove(drop)
        for name, value in list(graph.initializers.items()):
            if not value.uses():
                graph.initializers.pop(name)
