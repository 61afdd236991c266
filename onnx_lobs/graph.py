"""The ONNX side: load and save models, find prunable layers, read and write their weights.

A weight is found wherever it lives: an initializer or a Constant node, in the main graph or in
an If/Loop/Scan body (names resolve lexically, as in ONNX, so a body can use an outer weight),
possibly behind Identity nodes. A weight is pruned once even when several nodes use it; when a
use cannot be pruned consistently the layer is reported as skipped with the reason.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from .errors import LobsError
from .layers import ADAPTERS, WEIGHTED_OPS, Geometry

FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
               TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}
PROTOBUF_LIMIT = 2_000_000_000
SUBGRAPH_OPS = ("If", "Loop", "Scan")


# ----------------------------------------------------------------------------- loading, saving

@dataclass
class LoadedModel:
    model: ModelProto
    path: str
    external: set[str] = field(default_factory=set)  # tensors that lived in external data


def load_model(path: str) -> LoadedModel:
    """Load a model with its external data; every failure is one line naming the file."""
    if not os.path.isfile(path):
        raise LobsError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises several unrelated types for garbage input
        raise LobsError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise LobsError(f"{path}: not an ONNX model (no graph)")
    external = {t.name for t in _all_tensors(model) if uses_external_data(t)}
    try:
        load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as e:
        raise LobsError(f"{path}: cannot read its external data ({e})") from None
    try:
        onnx.checker.check_model(model if model.ByteSize() < PROTOBUF_LIMIT else path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LobsError(f"{path}: invalid ONNX model: {first}") from None
    return LoadedModel(model, path, external)


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
    """Write atomically: into a temporary folder beside the target, then rename into place.

    With external=True (the default for models over the 2 GB protobuf limit) the weights go
    to PATH.data beside it.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise LobsError(f"{path}: output folder does not exist")
    try:
        tmp = tempfile.mkdtemp(prefix=".onnx-lobs-", dir=folder)
    except OSError as e:
        raise LobsError(f"{path}: cannot write there ({e.strerror})") from None
    name = os.path.basename(path)
    try:
        big = model.ByteSize() >= PROTOBUF_LIMIT if external is None else external
        if big:  # onnx rewrites the tensors it externalises: keep the caller's model intact
            copy = ModelProto()
            copy.CopyFrom(model)
            model = copy
        data_name = name + ".data"
        onnx.save_model(model, os.path.join(tmp, name), save_as_external_data=big,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        if big:
            os.replace(os.path.join(tmp, data_name), os.path.join(folder, data_name))
        os.replace(os.path.join(tmp, name), path)
    except OSError as e:
        raise LobsError(f"{path}: cannot write there ({e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
                elif ref == "sparse":
                    consts[k] = "sparse"
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
        if ref == "sparse":
            skipped.append(Skipped(label, node.op_type, wname, "weight is a sparse initializer"))
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
        reason = _sharing_problem(ref, uses, consumers[tid], tid in escaped, labels)
        if reason:
            for lab, node, _ in uses:
                skipped.append(Skipped(lab, node.op_type, wname, reason))
            continue
        name = label
        while name in used_names:
            name += "'"
        used_names.add(name)
        geom = adapter.geometry(first, shape)
        bias = _common_bias(adapter, uses, node_consts, consumers, geom)
        layers.append(Layer(name, first.op_type, ref, shape, geom,
                            [Use(n, n.input[0], _defining_scope(model, n.input[0], s)) for _, n, s in uses],
                            bias,
                            external=ref.tensor.name in loaded.external))
    return layers, skipped


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


# ----------------------------------------------------------------------------- exposing activations

@dataclass
class Exposed:
    """Where a layer input shows up in the augmented model's outputs."""

    output: str  # output (or graph input) name to read
    stacked: int  # leading axes added by Loop/Scan iterations, to be merged into the sample axis


def expose(model: ModelProto, tensors: list[tuple[str, tuple, np.dtype]]) -> tuple[ModelProto, dict]:
    """A copy of the model whose outputs also carry each (name, scope, dtype) tensor.

    A tensor inside an If branch becomes an extra output of both branches (the other branch
    yields an empty tensor); inside a Loop or Scan body it becomes a scan output, one slice per
    iteration. Outputs are added untyped, so no shape inference is needed.
    """
    aug = ModelProto()
    aug.CopyFrom(model)
    graph_inputs = {i.name for i in model_inputs(model)}
    outputs = {o.name for o in aug.graph.output}
    taken = {n for g in iter_graphs(aug.graph) for node in g.node for n in node.output} | outputs
    result = {}
    node_map = _node_map(model, aug)

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
        current, stacked = name, 0
        for depth in range(len(scope) - 1, -1, -1):
            parent, attr = scope[depth]
            parent = node_map[id(parent)][1]
            current, added = _lift(parent, attr, current, fresh, dtype)
            stacked += added
        aug.graph.output.append(onnx.ValueInfoProto(name=current))
        result[key] = Exposed(current, stacked)
    return aug, result


def _node_map(model: ModelProto, aug: ModelProto) -> dict[int, NodeProto]:
    """id(original node) -> (that node, kept alive so the id stays its own; the same node in the copy)."""
    mapping = {}
    for g0, g1 in zip(iter_graphs(model.graph), iter_graphs(aug.graph)):
        for n0, n1 in zip(g0.node, g1.node):
            mapping[id(n0)] = (n0, n1)
    return mapping


def _body(node: NodeProto, attr: str) -> GraphProto:
    return next(a.g for a in node.attribute if a.name == attr)


def _lift(parent: NodeProto, attr: str, name: str, fresh, dtype) -> tuple[str, int]:
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
        other.node.append(onnx.helper.make_node(
            "Constant", [], [empty],
            value=numpy_helper.from_array(np.zeros((0,), dtype=dtype), empty + "_value")))
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
