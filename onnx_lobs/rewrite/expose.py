"""Rule: make an inner value an output of the model, so that a calibration pass can read it.

A value of the main graph is added to its outputs. A value inside an If branch becomes an extra
output of both branches (the other branch yields an empty tensor); inside a Loop or Scan body it
becomes a scan output, one slice per iteration, so it arrives with a leading axis per level
(`stacked`). Outputs are added as the IR knows them, typed or not: no shape inference is needed.

Before opset 11, If merges the shapes its branches yield strictly, so the empty stand-in must
match the value's rank, which is not known without shape inference. There the value leaves its
branch flattened, beside its shape, and both stand-ins are rank-1 tensors of a length computed
at run time (so inference cannot find a mismatching dimension either).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..index import Address, body, resolve, values_by_name


@dataclass(frozen=True)
class Request:
    name: str  # the value to expose
    address: Address  # where the graph that defines it sits (index.address of its scope)
    dtype: np.dtype  # its element type, for the empty stand-in of an If's other branch


@dataclass
class Exposed:
    """Where an exposed value shows up in the rewritten model's outputs."""

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


class _Names:
    """Fresh value names: none that any graph of the model already uses."""

    def __init__(self, model: ir.Model):
        self.taken = {v.name for node in model.graph.all_nodes() for v in node.outputs}
        self.taken |= {v.name for v in model.graph.outputs} | {v.name for v in model.graph.inputs}

    def __call__(self, base: str) -> str:
        k, name = 0, f"{base}__lobs"
        while name in self.taken:
            k += 1
            name = f"{base}__lobs{k}"
        self.taken.add(name)
        return name


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


class ExposeValue:
    name = "expose-value"

    def check(self, model: ir.Model, target: Request) -> str | None:
        try:
            scope = resolve(model, target.address)
        except (IndexError, StopIteration):
            return f"no body at {target.address}"
        graph = model.graph if not scope else body(*scope[-1])
        if target.name not in values_by_name(graph):
            return f"no value '{target.name}' in the graph at {target.address or 'the top'}"
        return None

    def apply(self, model: ir.Model, target: Request) -> Exposed:
        scope = resolve(model, target.address)
        graph = model.graph if not scope else body(*scope[-1])
        value = values_by_name(graph)[target.name]
        if not scope:
            if value.is_graph_input() and not value.is_initializer() or value.is_graph_output():
                return Exposed(target.name, 0)
            model.graph.outputs.append(value)
            return Exposed(target.name, 0)
        names, legacy = _Names(model), _opset(model) < 11
        current, shape, stacked = value, None, 0
        for parent, attr in reversed(scope):
            if legacy and parent.op_type == "If" and shape is None:
                current, shape = _flatten(body(parent, attr), current, names)
            current, added = _lift(parent, attr, current, names, target.dtype, legacy)
            if shape is not None:
                shape, _ = _lift(parent, attr, shape, names, np.int64, legacy)
            stacked += added
        model.graph.outputs.append(current)
        if shape is not None:
            model.graph.outputs.append(shape)
        return Exposed(current.name, stacked, None if shape is None else shape.name)


def _node(op: str, inputs, name: str, **attributes) -> ir.Node:
    return ir.node(op, inputs, attributes=attributes or None, outputs=[ir.Value(name=name)])


def _constant(name: str, array: np.ndarray) -> ir.Node:
    return _node("Constant", [], name, value=ir.tensor(array, name=name + "_value"))


def _flatten(body: ir.Graph, value: ir.Value, names) -> tuple[ir.Value, ir.Value]:
    """A rank-1 view of a body value and its shape, both new values of the body."""
    minus_one = _constant(names(value.name + "_minus_one"), np.array([-1], np.int64))
    flat = _node("Reshape", [value, minus_one.outputs[0]], names(value.name + "_flat"))
    shape = _node("Shape", [value], names(value.name + "_shape"))
    body.extend([minus_one, flat, shape])
    return flat.outputs[0], shape.outputs[0]


def _empty(name: str, dtype, names, legacy: bool, cond: ir.Value) -> list[ir.Node]:
    """Nodes yielding an empty tensor `name`: a constant, or (legacy) one whose length inference cannot see.

    The length, 0, is computed from the If's condition (0 * cond), a run-time value: onnxruntime
    propagates constants and shapes into shape inference, but not that.
    """
    value = np.zeros((0,), dtype=dtype)
    if not legacy:
        return [_constant(name, value)]
    source, zero, one = (_constant(names(name + s), a) for s, a in
                         (("_source", value), ("_zero", np.array([0], np.int64)), ("_one", np.array([1], np.int64))))
    flag = _node("Cast", [cond], names(name + "_flag"), to=ir.DataType.INT64)
    product = _node("Mul", [zero.outputs[0], flag.outputs[0]], names(name + "_product"))
    length = _node("Reshape", [product.outputs[0], one.outputs[0]], names(name + "_length"))
    empty = _node("Reshape", [source.outputs[0], length.outputs[0]], name)
    return [source, zero, one, flag, product, length, empty]


def _lift(parent: ir.Node, attr: str, value: ir.Value, names, dtype, legacy: bool) -> tuple[ir.Value, int]:
    """Make a value of parent's body `attr` an output of the parent node: (that output, axes added).

    The body outputs an Identity of the value rather than the value itself: onnxruntime yields
    zeros for a scan output that is a body input passed straight through.
    """
    inner = body(parent, attr)
    copy = _node("Identity", [value], names(value.name + "_copy"))
    inner.append(copy)
    inner.outputs.append(copy.outputs[0])
    parent.resize_outputs(len(parent.outputs) + 1)
    out = parent.outputs[-1]
    out.name = names(value.name)
    if parent.op_type == "If":
        other = body(parent, "else_branch" if attr == "then_branch" else "then_branch")
        nodes = _empty(names(value.name + "_empty"), dtype, names, legacy, parent.inputs[0])
        other.extend(nodes)
        other.outputs.append(nodes[-1].outputs[0])
        return out, 0
    if parent.op_type == "Scan":
        scan_inputs = parent.attributes["num_scan_inputs"].as_int()
        n_scan_out = len(inner.outputs) - (len(inner.inputs) - scan_inputs)
        for key in ("scan_output_axes", "scan_output_directions"):
            if key in parent.attributes and len(parent.attributes[key].as_ints()) < n_scan_out:
                parent.attributes[key] = ir.AttrInt64s(key, list(parent.attributes[key].as_ints()) + [0])
    return out, 1
