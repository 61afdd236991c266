"""Graph rewrites as small rules on onnx-ir, one rule per module, each with a test beside it that
runs the model in onnxruntime before and after.

A rule says first whether it applies to its target and why not (`check`), then changes the
model in place (`apply`). Rules work on an ir.Model: the graph index (index.py) reads the same
representation, and onnx-ir writes the result back to a ModelProto.
"""

from __future__ import annotations

from typing import Any, Protocol

import onnx
import onnx_ir as ir


class Rule(Protocol):
    name: str

    def check(self, model: ir.Model, target: Any) -> str | None:
        """Why the rule does not apply to this target, or None when it does."""

    def apply(self, model: ir.Model, target: Any) -> Any:
        """Change the model in place (only after check said yes); returns what the caller needs."""


class RewriteError(ValueError):
    """A rule applied where its check says it does not: a bug in the caller, not a user mistake."""


def apply(rule: Rule, model: ir.Model, target: Any) -> Any:
    why = rule.check(model, target)
    if why is not None:
        raise RewriteError(f"{rule.name}: {why}")
    return rule.apply(model, target)


def to_proto(model: ir.Model, original: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The rewritten model as a protobuf. onnx-ir drops sparse initializers: given the model the IR
    was read from, the main graph gets back those its nodes still read, and each body its own
    (found by position: a rule that keeps bodies appends nodes, it does not reorder them)."""
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
                    raise RewriteError(f"node {a.name or a.op_type}: its body's sparse initializers cannot "
                                       "be put back after this rewrite")
                continue
            bodies[attr.name].g.sparse_initializer.extend(attr.g.sparse_initializer)
            _restore_bodies(bodies[attr.name].g, attr.g)


def _has_sparse(graph: onnx.GraphProto) -> bool:
    return bool(graph.sparse_initializer) or any(
        _has_sparse(a.g) for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
