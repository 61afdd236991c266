"""The graph index: every node where it lives, and the producer and uses of every value, across
If/Loop/Scan bodies, on onnx-ir (README: "The graph library").

onnx-ir resolves names lexically (a body reads an outer value as that very value, so its uses
include the body's nodes) and wraps the model's tensors without copying them. What it does not
do is wrapped here, in one place:
- a graph does not know the node and attribute it is the body of (`scope`);
- sparse initializers are dropped: a reference to one is a dangling value (`is_sparse`), and
  `write_ir` puts them back when the IR is written out;
- the IR does not keep the protobuf it came from. Each IR node is paired once, when the index is
  built, with its NodeProto (`Site.proto`): weights are written back into the protobuf in place,
  so that a model changes in nothing but what was pruned.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import onnx
import onnx_ir as ir
from onnx import GraphProto, ModelProto, NodeProto

Scope = tuple  # ((parent ir.Node, attribute name), ...) from the main graph down
Address = tuple  # ((node position in its graph, attribute name), ...): the same in a copy of the model


@dataclass(frozen=True, eq=False)
class Site:
    """A node where it lives: its IR node, its protobuf, its enclosing scope, its label."""

    node: ir.Node
    proto: NodeProto
    scope: Scope
    label: str  # the node's name, or op_K with K its position in the walk (stable for a model)
    path: tuple  # the scope's address and the node's position in its graph: the same in a copy


@contextlib.contextmanager
def quiet():
    """onnx-ir logs each reference to a sparse initializer as a value found in no scope."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_ir(model: ModelProto) -> ir.Model:
    """The model in onnx-ir, its tensors wrapped, not copied (sparse initializers dropped, quietly)."""
    with quiet():
        return ir.serde.deserialize_model(model)


def write_ir(model: ir.Model, original: ModelProto | None = None) -> ModelProto:
    """The IR as a protobuf. onnx-ir drops sparse initializers: given the model the IR was read
    from, the main graph gets back those its nodes still read, and each body its own (found by
    position: a rewrite that keeps bodies appends nodes, it does not reorder them)."""
    out = ir.serde.serialize_model(model)
    if original is not None:
        read = _names_read(out.graph)
        out.graph.sparse_initializer.extend(t for t in original.graph.sparse_initializer if t.values.name in read)
        _restore_bodies(out.graph, original.graph)
    return out


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _names_read(a.g)
    return names


def _restore_bodies(out: onnx.GraphProto, original: onnx.GraphProto) -> None:
    for a, b in zip(original.node, out.node):
        bodies = {x.name: x for x in b.attribute if x.type == onnx.AttributeProto.GRAPH}
        for attr in a.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            if a.op_type != b.op_type or attr.name not in bodies:
                if _has_sparse(attr.g):
                    raise ValueError(f"node {a.name or a.op_type}: its body's sparse initializers cannot "
                                       "be put back after this rewrite")
                continue
            bodies[attr.name].g.sparse_initializer.extend(attr.g.sparse_initializer)
            _restore_bodies(bodies[attr.name].g, attr.g)


def _has_sparse(graph: onnx.GraphProto) -> bool:
    return bool(graph.sparse_initializer) or any(
        _has_sparse(a.g) for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)


def subgraphs(node: ir.Node) -> Iterator[tuple[str, ir.Graph]]:
    """(attribute name, body) of every graph a node holds, in attribute order."""
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.GRAPH:
            yield name, attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            for g in attr.value:
                yield name, g


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every value a graph defines: its inputs, initializers and node outputs, by name."""
    found = {v.name: v for v in graph.inputs}
    found.update(graph.initializers)
    found.update({v.name: v for node in graph for v in node.outputs})
    return found


def body(node: ir.Node, attr: str) -> ir.Graph:
    """The body a node holds under an attribute (then_branch, else_branch, body)."""
    return next(g for name, g in subgraphs(node) if name == attr)


class GraphIndex:
    """One use-def index over a ModelProto; build it again after the model's structure changes."""

    def __init__(self, model: ModelProto):
        self.model = model
        self.ir = read_ir(model)
        self.sites: list[Site] = []  # every node, pre-order: a node, then its bodies
        self._site: dict[ir.Node, Site] = {}
        self._parent: dict[ir.Graph, tuple[ir.Node, str]] = {}
        self._protos: dict[ir.Graph, GraphProto] = {self.ir.graph: model.graph}
        self._sparse: set[str] = set()
        self._at: dict[tuple, Site] = {}
        self._walk(self.ir.graph, model.graph, ())

    def _walk(self, graph: ir.Graph, proto: GraphProto, scope: Scope) -> None:
        self._sparse.update(t.values.name for t in proto.sparse_initializer)
        nodes = list(graph)
        if len(nodes) != len(proto.node):
            raise AssertionError(f"graph {proto.name!r}: onnx-ir read {len(nodes)} of {len(proto.node)} nodes")
        where = address(scope)
        for position, (node, node_proto) in enumerate(zip(nodes, proto.node)):
            site = Site(node, node_proto, scope, node_proto.name or f"{node_proto.op_type}_{len(self.sites)}",
                        where + (position,))
            self.sites.append(site)
            self._site[node] = site
            self._at[site.path] = site
            bodies = [(a.name, g) for a in node_proto.attribute
                      for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]
            for (name, body), (proto_name, body_proto) in zip(subgraphs(node), bodies):
                if name != proto_name:
                    raise AssertionError(f"node {site.label}: onnx-ir reordered its bodies")
                self._parent[body] = (node, name)
                self._protos[body] = body_proto
                self._walk(body, body_proto, scope + ((node, name),))

    # ------------------------------------------------------------------ nodes and scopes

    def site(self, node: ir.Node) -> Site:
        return self._site[node]

    def at(self, path: tuple) -> Site:
        """The site at a path (Site.path) of another index of the same model, or of a copy."""
        return self._at[path]

    def main(self) -> list[Site]:
        """The sites of the main graph, in graph order."""
        return [s for s in self.sites if not s.scope]

    def scope_of(self, graph: ir.Graph) -> Scope:
        """The (parent node, attribute) chain from the main graph down to this graph."""
        chain = []
        while graph in self._parent:
            parent, name = self._parent[graph]
            chain.append((parent, name))
            graph = parent.graph
        return tuple(reversed(chain))

    def graphs(self) -> Iterator[ir.Graph]:
        yield self.ir.graph
        yield from self._parent

    # ------------------------------------------------------------------ values

    def defining_scope(self, value: ir.Value) -> Scope:
        """The scope of the graph that defines a value (a graph input, an initializer or a node output)."""
        node = value.producer()
        if node is not None:
            return self._site[node].scope
        graph = value.graph
        return self.scope_of(graph) if graph is not None else ()

    def sparse_names(self, graph: ir.Graph) -> set[str]:
        """The sparse initializers of one graph (onnx-ir drops them)."""
        return {t.values.name for t in self._protos[graph].sparse_initializer}

    def is_sparse(self, value: ir.Value) -> bool:
        return value.producer() is None and value.graph is None and value.name in self._sparse

    def graph_outputs(self) -> Iterator[ir.Value]:
        """The outputs of every graph, bodies included."""
        for graph in self.graphs():
            yield from graph.outputs


def address(scope: Scope) -> Address:
    """A scope as positions: what finds the same bodies in a copy of the model (resolve)."""
    return tuple((node.graph.index(node), name) for node, name in scope)


def resolve(model: ir.Model, address: Address) -> Scope:
    """The scope at an address (address()) in a model of the same structure."""
    graph, scope = model.graph, []
    for position, name in address:
        node = graph.node(position)
        scope.append((node, name))
        graph = body(node, name)
    return tuple(scope)
