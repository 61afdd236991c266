"""The ONNX side: load and save models, find prunable layers, read and write their weights.

A weight is found wherever it lives: an initializer or a Constant node, in the main graph or in
an If/Loop/Scan body (names resolve lexically, as in ONNX, so a body can use an outer weight),
possibly behind Identity nodes. A weight is pruned once even when several nodes use it; when a
use cannot be pruned consistently the layer is reported as skipped with the reason.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_model, set_external_data, uses_external_data

from .atomic import publish
from .errors import LobsError
from .layers import ADAPTERS, UNSUPPORTED_WEIGHTED, WEIGHTED_OPS, Geometry

FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
               TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}
PROTOBUF_LIMIT = 2_000_000_000
SUBGRAPH_OPS = ("If", "Loop", "Scan")
PASS_THROUGH = ("Identity", "Cast", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")  # keep "quantized"


# ----------------------------------------------------------------------------- loading, saving

@dataclass
class LoadedModel:
    model: ModelProto
    path: str
    external: set[str] = field(default_factory=set)  # tensors that lived in external data


def load_model(path: str) -> LoadedModel:
    """Load a model with its external data; every failure is one line naming the file."""
    if os.path.isdir(path):
        raise LobsError(f"{path}: is a folder, not a model file")
    if not os.path.isfile(path):
        raise LobsError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except OSError as e:
        raise LobsError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # protobuf raises several unrelated types for garbage input
        raise LobsError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise LobsError(f"{path}: not an ONNX model (no graph)")
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            raise LobsError(f"{path}: opset {op.version} is newer than the newest this onnx knows ({newest})")
    external = {t.name for t in _all_tensors(model) if uses_external_data(t)}
    try:
        load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as e:
        raise LobsError(f"{path}: cannot read its external data ({one_line(e)})") from None
    try:
        onnx.checker.check_model(model if model.ByteSize() < PROTOBUF_LIMIT else path)
    except Exception as e:
        raise LobsError(f"{path}: invalid ONNX model: {one_line(e)}") from None
    for t in _all_tensors(model):
        if t.name not in external:  # (external data was checked against its declared length on loading)
            _check_tensor(t, path)
    return LoadedModel(model, path, external)


# Element types stored several to a byte: their raw size is not count * itemsize.
PACKED_TYPES = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                if hasattr(TensorProto, n)}


def _check_tensor(t: TensorProto, path: str) -> None:
    """The checker accepts a constant whose bytes do not fit its shape and type; say so by name."""
    if t.data_type == TensorProto.STRING or t.data_type in PACKED_TYPES:
        return
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        raise LobsError(f"{path}: tensor '{t.name}' has an unknown element type ({t.data_type})") from None
    if t.HasField("raw_data"):
        have, need = len(t.raw_data), math.prod(t.dims) * itemsize
        if have != need:
            kind = TensorProto.DataType.Name(t.data_type).lower()
            raise LobsError(f"{path}: tensor '{t.name}' holds {have} bytes, but {list(t.dims)} of {kind} takes {need}")


def one_line(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line (checker messages print whole nodes), cut to a length."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _all_tensors(model: ModelProto):
    for g in iter_graphs(model.graph):
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t


def iter_graphs(graph: GraphProto):
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from iter_graphs(g)


def save_model(model: ModelProto, path: str, external: bool | None = None) -> None:
    """Write atomically: each file is written out of sight in the target's folder, then renamed
    into place -- the external data (with external=True, the default for models over the 2 GB
    protobuf limit: PATH.data beside it) first, then the model -- with SIGINT, SIGTERM and
    SIGHUP held back from the first rename to the last. Where the system offers anonymous files
    (Linux O_TMPFILE), a write cut short leaves nothing behind even under SIGKILL: the file gets
    a hidden name only just before its rename. Elsewhere it is a hidden temporary file, removed
    on any error or Ctrl-C.
    """
    name = os.path.basename(path)
    big = model.ByteSize() >= PROTOBUF_LIMIT if external is None else external
    if not big:
        publish(path, [(name, lambda f: f.write(model.SerializeToString()))])
        return
    copy = ModelProto()  # the weights move to the data file: the caller's model stays intact
    copy.CopyFrom(model)
    publish(path, [(name + ".data", lambda f: _externalize(copy, name + ".data", f)),
                    (name, lambda f: f.write(copy.SerializeToString()))])


EXTERNAL_THRESHOLD = 1024  # initializers of at least this many bytes go to the data file (as onnx does)


def _externalize(model: ModelProto, location: str, out) -> None:
    """Move every initializer's raw bytes of at least EXTERNAL_THRESHOLD, in every graph, into
    the open file `out`, leaving location, offset and length in the tensor."""
    offset = 0
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            data = t.raw_data if t.HasField("raw_data") else b""  # (one copy of the bytes, not two)
            if len(data) >= EXTERNAL_THRESHOLD:
                size = out.write(data)
                del data
                set_external_data(t, location, offset, size)
                t.ClearField("raw_data")
                offset += size


def model_inputs(model: ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller must feed: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


# ----------------------------------------------------------------------------- constants and scopes

@dataclass(eq=False)
class ConstRef:
    """A constant tensor in place: an initializer, or a Constant node's value."""

    tensor: TensorProto
    graph: GraphProto
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
    node: NodeProto
    index: int  # which input of the node
    scope: tuple  # ((parent node, attribute name), ...) from the main graph down to the node's graph


def _cast_target(node: NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _scan_constants(model: ModelProto, keep: list):
    """Every node's constant inputs, and every constant's consumers, across all subgraphs.

    Results are keyed by id() of protobuf wrappers, which stay the same object only while
    alive, so every wrapper seen is appended to `keep` for the caller to hold.
    """
    consumers: dict[int, list[Consumer]] = {}
    refs: dict[int, ConstRef] = {}
    node_consts: dict[int, dict[int, ConstRef]] = {}
    escaped: set[int] = set()  # constants that are graph outputs

    def visit(graph, outer: dict, scope: tuple, label: str):
        table = dict(outer)
        for i in graph.input:
            table[i.name] = None
        for t in graph.initializer:
            keep.append(t)
            table[t.name] = ConstRef(t, graph, None, f"{label}initializer")
        for t in graph.sparse_initializer:
            table[t.values.name] = "sparse"
        keep.append(graph)
        for node in graph.node:
            keep.append(node)
            consts = {}
            for k, name in enumerate(node.input):
                ref = table.get(name)
                if isinstance(ref, ConstRef):
                    consts[k] = ref
                    refs[id(ref.tensor)] = ref
                    consumers.setdefault(id(ref.tensor), []).append(Consumer(node, k, scope))
                elif ref in ("sparse", "quantized"):
                    consts[k] = ref
            node_consts[id(node)] = consts
            for a in node.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for sub in subs:
                    visit(sub, table, scope + ((node, a.name),),
                          f"{label}{node.name or node.op_type}/{a.name}: ")
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                keep.append(node.attribute[0].t)
                table[node.output[0]] = ConstRef(node.attribute[0].t, graph, node, f"{label}Constant node")
            elif node.op_type == "Identity" and isinstance(consts.get(0), ConstRef):
                # An alias: the Identity itself is not a real use of the weight.
                consumers[id(consts[0].tensor)].pop()
                table[node.output[0]] = consts[0]
            elif (node.op_type == "Cast" and isinstance(consts.get(0), ConstRef)
                  and _cast_target(node) in FLOAT_TYPES and consts[0].dtype in FLOAT_TYPES):
                # Weights stored in fp16/bf16 and cast up for compute: prune the stored tensor.
                consumers[id(consts[0].tensor)].pop()
                c = consts[0]
                table[node.output[0]] = ConstRef(c.tensor, c.graph, c.node, c.where + " (through Cast)",
                                                 _cast_target(node))
            elif node.op_type == "DequantizeLinear" or (node.op_type in PASS_THROUGH and consts.get(0) == "quantized"):
                table[node.output[0]] = "quantized"  # a quantized weight, dequantized at run time
            else:
                for o in node.output:
                    table[o] = None
        for o in graph.output:
            ref = table.get(o.name)
            if isinstance(ref, ConstRef):
                escaped.add(id(ref.tensor))

    visit(model.graph, {}, (), "")
    return node_consts, consumers, refs, escaped


# ----------------------------------------------------------------------------- layers

@dataclass(eq=False)
class Use:
    node: NodeProto
    x: str  # the activation input's name
    x_scope: tuple  # the subgraph scope in which x is defined (may be outer to the node's)


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


def _node_label(node: NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def find_layers(loaded: LoadedModel) -> tuple[list[Layer], list[Skipped]]:
    """Every prunable layer, and every weighted op that will not be pruned with the reason."""
    model = loaded.model
    keep: list = []  # holds protobuf wrappers alive while their id()s are used as keys
    node_consts, consumers, refs, escaped = _scan_constants(model, keep)
    candidates: dict[int, list] = {}  # weight tensor id -> [(label, node, scope)]
    skipped: list[Skipped] = []
    order: list[int] = []
    index = 0
    labels: dict[int, str] = {}

    def walk(graph, scope):
        nonlocal index
        for node in graph.node:
            label = _node_label(node, index)
            labels[id(node)] = label
            index += 1
            if node.op_type in WEIGHTED_OPS:
                _classify(node, label, scope)
            elif node.op_type in UNSUPPORTED_WEIGHTED and node_consts[id(node)]:
                first = node.input[min(node_consts[id(node)])]
                skipped.append(Skipped(label, node.op_type, first, UNSUPPORTED_WEIGHTED[node.op_type]))
            for a in node.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for sub in subs:
                    walk(sub, scope + ((node, a.name),))

    def _classify(node, label, scope):
        adapter = ADAPTERS.get(node.op_type)
        consts = node_consts[id(node)]
        wname = node.input[1] if len(node.input) > 1 else None
        if adapter is None:
            reason = ("quantized operator" if "Integer" in node.op_type or "QLinear" in node.op_type
                      else f"{node.op_type} is not supported yet")
            skipped.append(Skipped(label, node.op_type, wname, reason))
            return
        ref = consts.get(adapter.weight_input)
        if ref in ("sparse", "quantized"):
            why = "weight is a sparse initializer" if ref == "sparse" else "quantized weight (DequantizeLinear)"
            skipped.append(Skipped(label, node.op_type, wname, why))
            return
        if ref is None:
            why = ("constant is the first operand (x @ W form only)" if isinstance(consts.get(0), ConstRef)
                   else "weight is computed at run time, not a constant")
            skipped.append(Skipped(label, node.op_type, wname, why))
            return
        if ref.dtype not in FLOAT_TYPES:
            skipped.append(Skipped(label, node.op_type, wname,
                                   f"weight has non-float type {TensorProto.DataType.Name(ref.dtype)}"))
            return
        reason = adapter.skip_reason(node, tuple(ref.tensor.dims))
        if reason:
            skipped.append(Skipped(label, node.op_type, wname, reason))
            return
        if id(ref.tensor) not in candidates:
            order.append(id(ref.tensor))
        candidates.setdefault(id(ref.tensor), []).append((label, node, scope))

    walk(model.graph, ())
    layers: list[Layer] = []
    used_names: set[str] = set()
    for tid in order:
        ref = refs[tid]
        uses = candidates[tid]
        label, first, _ = uses[0]
        adapter = ADAPTERS[first.op_type]
        wname = first.input[adapter.weight_input]
        shape = tuple(ref.tensor.dims)
        reason = _sharing_problem(ref, uses, consumers[tid], tid in escaped, labels) or _not_finite(ref, wname)
        geom = adapter.geometry(first, shape)
        bias = _common_bias(adapter, uses, node_consts, consumers, geom)
        if not reason and bias is not None:
            reason = _not_finite(bias, first.input[adapter.bias_input])
        if reason:
            for lab, node, _ in uses:
                skipped.append(Skipped(lab, node.op_type, wname, reason))
            continue
        name = label
        while name in used_names:
            name += "'"
        used_names.add(name)
        layers.append(Layer(name, first.op_type, ref, shape, geom,
                            [Use(n, n.input[0], _defining_scope(model, n.input[0], s)) for _, n, s in uses],
                            bias,
                            external=ref.tensor.name in loaded.external))
    return layers, skipped


def _not_finite(ref: ConstRef, name: str) -> str | None:
    """A constant with NaN or Inf cannot be solved for (every compensation would carry it)."""
    try:
        values = numpy_helper.to_array(ref.tensor)
    except Exception as e:  # a constant the loader did not vet (a model given as a ModelProto)
        return f"{name} cannot be read ({one_line(e, 120)})"
    if values.size and not np.isfinite(values).all():
        return f"{name} contains NaN or Inf"
    return None


def _defining_scope(model: ModelProto, name: str, scope: tuple) -> tuple:
    """The innermost enclosing scope whose graph defines `name` (outer names are visible inside)."""
    for depth in range(len(scope), 0, -1):
        parent, attr = scope[depth - 1]
        g = _body(parent, attr)
        if any(name in n.output for n in g.node) or any(name == i.name for i in g.input):
            return scope[:depth]
    return ()


def _attrs_key(node: NodeProto) -> tuple:
    keep = {"transB", "group"}
    return tuple(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name in keep))


def _sharing_problem(ref, uses, consumers, escaped, labels) -> str | None:
    if escaped:
        return "weight is also a graph output"
    prunable = {id(n) for _, n, _ in uses}
    others = [c for c in consumers if id(c.node) not in prunable or c.index != 1]
    if others:
        c = others[0]
        return (f"weight is also used by {labels.get(id(c.node), c.node.op_type)} "
                f"({c.node.op_type} input {c.index}); pruning it would change that node too")
    kinds = {(n.op_type, _attrs_key(n)) for _, n, _ in uses}
    if len(kinds) > 1:
        return "weight is shared by nodes that view it as different matrices"
    return None


def _common_bias(adapter, uses, node_consts, consumers, geom) -> ConstRef | None:
    """The bias joins the solve only if every use adds the same constant, and nothing else reads it."""
    if adapter.bias_input is None:
        return None
    refs = [node_consts[id(n)].get(adapter.bias_input) for _, n, _ in uses]
    first = refs[0]
    if not isinstance(first, ConstRef) or any(r is not first for r in refs):
        return None
    if first.dtype not in FLOAT_TYPES or len(consumers[id(first.tensor)]) != len(uses):
        return None
    c = numpy_helper.to_array(first.tensor)
    if adapter.bias_vector(uses[0][1], c, geom.rows * geom.groups) is None:
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


def _body(node: NodeProto, attr: str) -> GraphProto:
    return next(a.g for a in node.attribute if a.name == attr)
