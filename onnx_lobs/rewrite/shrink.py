"""Rule: shrink tensors along a channel axis, so a structurally pruned group really leaves the graph.

The target is a list of small edits that the structured run (structured.py) derives from its
channel groups: replace a constant input with a new (smaller) array, slice a constant input
along an axis, set one entry of a constant shape or sizes input, set an integer attribute, and
forget the shapes recorded for the values whose channel count changes (shape inference finds
them again). A constant is found behind Identity and Cast, and edited where it lives (an
initializer or a Constant node) when this node is its only reader; otherwise the node gets its
own copy, so a constant another node reads is never changed under it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from ..index import values_by_name


@dataclass(frozen=True)
class SetInput:
    node: int  # position in the main graph
    input: int
    array: np.ndarray


@dataclass(frozen=True)
class SliceInput:
    node: int
    input: int
    axis: int
    keep: np.ndarray  # indices kept along axis


@dataclass(frozen=True)
class SetEntry:
    node: int
    input: int
    entry: int
    value: int


@dataclass(frozen=True)
class SetAttr:
    node: int
    name: str
    value: int | list  # an integer, or a list of integers


@dataclass(frozen=True)
class NewInput:
    """A computed input replaced by a constant of this node's own (a run-time shape piece)."""

    node: int
    input: int
    array: np.ndarray


@dataclass(frozen=True)
class ForgetShape:
    value: str


Edit = SetInput | SliceInput | SetEntry | SetAttr | NewInput | ForgetShape


def _chain(value: ir.Value) -> list[ir.Value]:
    """The value and the Identity/Cast values it is made from, down to the constant's own value."""
    out = [value]
    while value.producer() is not None and value.producer().op_type in ("Identity", "Cast"):
        value = value.producer().inputs[0]
        out.append(value)
    return out


def _tensor_of(value: ir.Value):
    node = value.producer()
    if node is None:
        return value.const_value
    if node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value
    return None


def constant_array(value: ir.Value) -> np.ndarray | None:
    """The constant behind a value (through Identity and Cast), or None when it is computed."""
    t = _tensor_of(_chain(value)[-1])
    return None if t is None else t.numpy()


class ShrinkChannels:
    name = "shrink-channels"

    def check(self, model: ir.Model, target: list) -> str | None:
        nodes = list(model.graph)
        names = values_by_name(model.graph)
        for e in target:
            if isinstance(e, ForgetShape):
                if e.value not in names:
                    return f"no value '{e.value}'"
                continue
            if not 0 <= e.node < len(nodes):
                return f"no node at position {e.node}"
            node = nodes[e.node]
            if isinstance(e, SetAttr):
                continue
            if isinstance(e, NewInput):
                if e.input >= len(node.inputs):
                    return f"{node.op_type} '{node.name}' has no input {e.input}"
                continue
            if e.input >= len(node.inputs) or node.inputs[e.input] is None:
                return f"{node.op_type} '{node.name}' has no input {e.input}"
            if constant_array(node.inputs[e.input]) is None:
                return f"input {e.input} of {node.op_type} '{node.name}' is not a constant"
            if isinstance(e, SliceInput) and not 0 <= e.axis < constant_array(node.inputs[e.input]).ndim:
                return f"input {e.input} of {node.op_type} '{node.name}' has no axis {e.axis}"
        return None

    def apply(self, model: ir.Model, target: list) -> None:
        nodes = list(model.graph)
        names = values_by_name(model.graph)
        for e in target:
            if isinstance(e, ForgetShape):
                names[e.value].shape = None
            elif isinstance(e, NewInput):
                _own(model, nodes[e.node], e.input, e.array, nodes[e.node].inputs[e.input].dtype)
            elif isinstance(e, SetAttr):
                nodes[e.node].attributes[e.name] = (ir.AttrInt64s(e.name, [int(v) for v in e.value])
                                                    if isinstance(e.value, list) else ir.AttrInt64(e.name, int(e.value)))
            else:
                node = nodes[e.node]
                old = constant_array(node.inputs[e.input])
                if isinstance(e, SetInput):
                    new = e.array
                elif isinstance(e, SliceInput):
                    new = np.take(old, e.keep, axis=e.axis)
                else:
                    new = old.copy()
                    new.reshape(-1)[e.entry] = e.value
                _write(model, node, e.input, new)


def _write(model: ir.Model, node: ir.Node, k: int, array: np.ndarray) -> None:
    chain = _chain(node.inputs[k])
    source = chain[-1]
    tensor = _tensor_of(source)
    proto = numpy_helper.from_array(np.asarray(array).astype(tensor.numpy().dtype), source.name or "")
    shared = any(len(v.uses()) > 1 or v.is_graph_output() for v in chain)
    if not shared:
        new = ir.serde.deserialize_tensor(proto)
        if source.producer() is None:
            source.const_value = new
        else:
            source.producer().attributes["value"] = ir.AttrTensor("value", new)
        for v in chain:  # an Identity or Cast keeps the shape: all of them have the new one
            v.shape = ir.Shape(np.shape(array))
        return
    # Another node reads this constant: give this node its own, in the type the node computes in.
    _own(model, node, k, array, chain[0].dtype, f"{source.name}__kept", ir.DataType(tensor.dtype))


def _own(model: ir.Model, node: ir.Node, k: int, array: np.ndarray, computed, base: str = "",
         fallback=None) -> None:  # computed: the dtype the node reads, or None
    """Input k of node becomes a new initializer of its own holding array."""
    base = base or f"{node.name or node.op_type}__input{k}"
    dtype = onnx.helper.tensor_dtype_to_np_dtype(computed.value) if computed is not None else array.dtype
    own = ir.Value(name=_fresh(model, base),
                   const_value=ir.serde.deserialize_tensor(numpy_helper.from_array(
                       np.asarray(array).astype(dtype), "")))
    own.const_value.name = own.name
    own.shape = ir.Shape(array.shape)
    own.type = ir.TensorType(computed if computed is not None else fallback or ir.DataType.INT64)
    model.graph.register_initializer(own)
    node.replace_input_with(k, own)


def _fresh(model: ir.Model, base: str) -> str:
    taken = set(values_by_name(model.graph))
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}{i}"
    return name
