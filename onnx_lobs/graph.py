"""Prunable layers: found wherever their weights live, read and written back in place.

A weight is found wherever it lives: an initializer or a Constant node, in the main graph or in
an If/Loop/Scan body (names resolve lexically, as in ONNX, so a body can use an outer weight),
possibly behind Identity nodes. A weight is pruned once even when several nodes use it; when a
use cannot be pruned consistently the layer is reported as skipped with the reason. Where things
are and who uses them comes from the graph index (index.py); the weights are read and written in
the model's own protobuf.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import NodeProto, TensorProto, numpy_helper

from .errors import one_line
from .index import GraphIndex, Site
from .layers import ADAPTERS, UNSUPPORTED_WEIGHTED, WEIGHTED_OPS, Geometry, not_prunable
from .modelio import LoadedModel

FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
               TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}
PASS_THROUGH = ("Identity", "Cast", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")  # keep "quantized"


# ----------------------------------------------------------------------------- constants

@dataclass(eq=False)
class ConstRef:
    """A constant tensor in place: an initializer, or a Constant node's value."""

    tensor: TensorProto
    value: ir.Value  # the value that defines it (an initializer or the Constant's output): its identity
    node: NodeProto | None  # the Constant node, None for an initializer
    where: str  # human-readable location
    cast_to: int | None = None  # seen through a Cast: the type the graph computes in

    @property
    def dtype(self) -> int:
        return self.tensor.data_type

    @property
    def compute_dtype(self) -> int:
        return self.cast_to or self.tensor.data_type


@dataclass(eq=False)
class Consumer:
    site: Site
    index: int  # which input of the node


SPARSE, QUANTIZED = "sparse", "quantized"


class Constants:
    """What each value is, as far as weights go: a ConstRef, SPARSE, QUANTIZED or None (computed).

    A weight is seen through Identity (an alias) and through a float Cast (fp16/bf16 storage
    computed in fp32: the stored tensor is what is pruned); a quantized weight through
    DequantizeLinear and the layout ops after it. Consumers are the real uses of each constant
    (the aliasing Identity and Cast nodes are not uses).
    """

    def __init__(self, index: GraphIndex):
        self.index = index
        self._memo: dict[ir.Value, object] = {}
        self.consumers: dict[ir.Value, list[Consumer]] = {}
        for site in index.sites:
            for k, v in enumerate(site.node.inputs):
                ref = self.of(v)
                if isinstance(ref, ConstRef) and not (k == 0 and self._alias(site.node) is not None):
                    self.consumers.setdefault(ref.value, []).append(Consumer(site, k))
        self.escaped = {r.value for r in map(self.of, index.graph_outputs()) if isinstance(r, ConstRef)}

    def at(self, site: Site, k: int):
        return self.of(site.node.inputs[k]) if k < len(site.node.inputs) else None

    def of(self, value: ir.Value | None):
        if value is None:
            return None
        if value not in self._memo:
            self._memo[value] = self._resolve(value)
        return self._memo[value]

    def _where(self, graph: ir.Graph) -> str:
        return "".join(f"{self.index.site(p).proto.name or p.op_type}/{attr}: " for p, attr in self.index.scope_of(graph))

    def _alias(self, node: ir.Node):
        """The ConstRef an Identity or float Cast of a constant stands for, or None."""
        if node.op_type not in ("Identity", "Cast") or not node.inputs:
            return None
        c = self.of(node.inputs[0])
        if not isinstance(c, ConstRef):
            return None
        if node.op_type == "Identity":
            return c
        to = _cast_target(self.index.site(node).proto)
        if to in FLOAT_TYPES and c.dtype in FLOAT_TYPES:
            return ConstRef(c.tensor, c.value, c.node, c.where + " (through Cast)", to)
        return None

    def _resolve(self, value: ir.Value):
        if self.index.is_sparse(value):
            return SPARSE
        node = value.producer()
        if node is None:
            if value.is_initializer() and value.const_value is not None:
                return ConstRef(value.const_value.raw, value, None, f"{self._where(value.graph)}initializer")
            return None
        proto = self.index.site(node).proto
        if node.op_type == "Constant" and proto.attribute and proto.attribute[0].name == "value":
            return ConstRef(proto.attribute[0].t, value, proto, f"{self._where(node.graph)}Constant node")
        alias = self._alias(node)
        if alias is not None:
            return alias
        if node.op_type == "DequantizeLinear" or (node.op_type in PASS_THROUGH and node.inputs
                                                   and self.of(node.inputs[0]) == QUANTIZED):
            return QUANTIZED  # a quantized weight, dequantized at run time
        return None


def _cast_target(node: NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


# ----------------------------------------------------------------------------- layers

@dataclass(eq=False)
class Use:
    node: NodeProto
    x: str  # the activation input's name
    x_scope: tuple  # the scope whose graph defines x (may be outer to the node's): index.Scope
    site: Site  # the node in the graph index


@dataclass(eq=False)
class Layer:
    name: str
    op: str
    weight: ConstRef
    shape: tuple
    geometry: Geometry
    uses: list[Use]
    bias: ConstRef | None  # in the solve (updated, never pruned) when not None
    external: bool = False

    @property
    def adapter(self):
        return ADAPTERS[self.op]

    @property
    def weight_name(self) -> str:
        return self.weight.node.output[0] if self.weight.node else self.weight.tensor.name

    @property
    def dtype(self) -> str:
        return FLOAT_TYPES.get(self.weight.dtype, str(self.weight.dtype))

    @property
    def storage(self) -> str:
        return self.weight.where + (" (external data)" if self.external else "")

    def read(self) -> np.ndarray:
        return numpy_helper.to_array(self.weight.tensor)

    def read_bias(self) -> np.ndarray | None:
        return None if self.bias is None else numpy_helper.to_array(self.bias.tensor)

    def present_sparsity(self) -> float:
        w = self.read()
        return float(np.mean(w == 0)) if w.size else 0.0


@dataclass
class Skipped:
    name: str
    op: str
    weight: str | None
    reason: str


def find_layers(loaded: LoadedModel, index: GraphIndex | None = None) -> tuple[list[Layer], list[Skipped]]:
    """Every prunable layer, and every weighted op that will not be pruned with the reason (on
    the given index of loaded.model, when the caller needs its IR nodes too)."""
    index = index or GraphIndex(loaded.model)
    constants = Constants(index)
    candidates: dict[ir.Value, list[Site]] = {}  # a weight's defining value -> its prunable uses
    skipped: list[Skipped] = []
    for site in index.sites:
        op = site.node.op_type
        if op in WEIGHTED_OPS:
            why = _unprunable(site, constants)
            if why is not None:
                skipped.append(Skipped(site.label, op, _input_name(site, 1), why))
            else:
                ref = constants.at(site, ADAPTERS[op].weight_input)
                candidates.setdefault(ref.value, []).append(site)
        elif op == "Gather" and _embedding_table(site, constants):
            skipped.append(Skipped(site.label, op, site.proto.input[0], EMBEDDING))
        elif op in UNSUPPORTED_WEIGHTED:
            held = [k for k in range(len(site.node.inputs)) if constants.at(site, k) is not None]
            if held:
                skipped.append(Skipped(site.label, op, site.proto.input[held[0]], UNSUPPORTED_WEIGHTED[op]))
    layers: list[Layer] = []
    used_names: set[str] = set()
    for value, uses in candidates.items():
        layer = _layer(loaded, index, constants, uses, used_names, skipped)
        if layer is not None:
            layers.append(layer)
    return layers, skipped


EMBEDDING = ("embedding lookup: its rows are looked up, not multiplied, so no layer-wise error prices "
             "them; not a prunable layer")


def _embedding_table(site: Site, constants: Constants) -> bool:
    table = constants.at(site, 0)
    return isinstance(table, ConstRef) and table.dtype in FLOAT_TYPES and len(table.tensor.dims) == 2


def _transposed_constant(site: Site, k: int) -> str | None:
    """Why a weight made by a Transpose of a constant at run time is left dense, or None."""
    w = site.node.inputs[k] if len(site.node.inputs) > k else None
    p = w.producer() if w is not None else None
    if p is None or p.op_type != "Transpose" or not p.inputs or p.inputs[0] is None:
        return None
    src = p.inputs[0]
    if not (src.is_initializer() or (src.producer() is not None and src.producer().op_type == "Constant")):
        return None
    if any(u.node.op_type == "Gather" for u in src.uses()):
        return (f"weight is {src.name} transposed at run time, the embedding table a Gather also reads (tied "
                f"embeddings): pruning it would change the embeddings too, so it is left dense")
    return f"weight is {src.name} transposed at run time (a Transpose node), not a constant"


def _input_name(site: Site, k: int) -> str | None:
    return site.proto.input[k] if len(site.proto.input) > k else None


def _unprunable(site: Site, constants: Constants) -> str | None:
    """Why a weighted op's weight cannot be pruned, or None."""
    op = site.node.op_type
    adapter = ADAPTERS.get(op)
    if adapter is None:
        return not_prunable(op)
    ref = constants.at(site, adapter.weight_input)
    if ref == SPARSE:
        return "weight is a sparse initializer"
    if ref == QUANTIZED:
        return "quantized weight (DequantizeLinear)"
    if ref is None:
        if isinstance(constants.at(site, 0), ConstRef):
            return "constant is the first operand (x @ W form only)"
        return _transposed_constant(site, adapter.weight_input) or "weight is computed at run time, not a constant"
    if ref.dtype not in FLOAT_TYPES:
        return f"weight has non-float type {TensorProto.DataType.Name(ref.dtype)}"
    return adapter.skip_reason(site.proto, tuple(ref.tensor.dims))


def _layer(loaded, index, constants, uses: list[Site], used_names: set, skipped: list) -> Layer | None:
    """The layer of one weight and its prunable uses, or None (their skips recorded) when it cannot be pruned."""
    first = uses[0]
    adapter = ADAPTERS[first.node.op_type]
    ref = constants.at(first, adapter.weight_input)
    wname = first.proto.input[adapter.weight_input]
    shape = tuple(ref.tensor.dims)
    reason = _sharing_problem(ref, uses, constants) or _not_finite(ref, wname)
    geom = adapter.geometry(first.proto, shape)
    bias = _common_bias(adapter, uses, constants, geom)
    if not reason and bias is not None:
        reason = _not_finite(bias, first.proto.input[adapter.bias_input])
    if reason:
        skipped.extend(Skipped(u.label, u.node.op_type, wname, reason) for u in uses)
        return None
    name = first.label
    while name in used_names:
        name += "'"
    used_names.add(name)
    return Layer(name, first.node.op_type, ref, shape, geom,
                 [Use(u.proto, u.proto.input[0], index.defining_scope(u.node.inputs[0]), u) for u in uses],
                 bias, external=ref.tensor.name in loaded.external)


def _not_finite(ref: ConstRef, name: str) -> str | None:
    """A constant with NaN or Inf cannot be solved for (every compensation would carry it)."""
    try:
        values = numpy_helper.to_array(ref.tensor)
    except Exception as e:  # a constant the loader did not vet (a model given as a ModelProto)
        return f"{name} cannot be read ({one_line(e, 120)})"
    if values.size and not np.isfinite(values).all():
        return f"{name} contains NaN or Inf"
    return None


def _sharing_problem(ref: ConstRef, uses: list[Site], constants: Constants) -> str | None:
    if ref.value in constants.escaped:
        return "weight is also a graph output"
    prunable = set(uses)
    others = [c for c in constants.consumers[ref.value]
              if c.site not in prunable or c.index != ADAPTERS[c.site.node.op_type].weight_input]
    if others:
        c = others[0]
        op = c.site.node.op_type
        return (f"weight is also used by {c.site.label} ({op} input {c.index}); "
                f"pruning it would change that node too")
    kinds = {(u.node.op_type, ADAPTERS[u.node.op_type].view_key(u.proto)) for u in uses}
    if len(kinds) > 1:
        return "weight is shared by nodes that view it as different matrices"
    return None


def _common_bias(adapter, uses: list[Site], constants: Constants, geom) -> ConstRef | None:
    """The bias joins the solve only if every use adds the same constant, and nothing else reads it."""
    if adapter.bias_input is None:
        return None
    refs = [constants.at(u, adapter.bias_input) for u in uses]
    first = refs[0]
    if not isinstance(first, ConstRef) or any(r is not first for r in refs):
        return None
    if first.dtype not in FLOAT_TYPES or len(constants.consumers[first.value]) != len(uses):
        return None
    c = numpy_helper.to_array(first.tensor)
    if adapter.bias_vector(uses[0].proto, c, geom.rows * geom.groups) is None:
        return None
    return first


def select(layers: list[Layer], patterns: list[str]) -> list[Layer]:
    return [l for l in layers if any(matches(l, p) for p in patterns)]


def matches(layer: Layer, pattern: str) -> bool:
    return fnmatch.fnmatchcase(layer.name, pattern) or fnmatch.fnmatchcase(layer.weight_name, pattern)


# ----------------------------------------------------------------------------- writing weights back

def write_tensor(ref: ConstRef, values: np.ndarray) -> None:
    """Replace a constant's contents in its own dtype, keeping its name and place."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(ref.dtype)
    new = numpy_helper.from_array(np.asarray(values).astype(dtype), ref.tensor.name)
    ref.tensor.CopyFrom(new)
