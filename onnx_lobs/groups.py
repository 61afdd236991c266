"""Coupled channel groups, found on the ONNX graph: what structured pruning removes together.

A set of channels flows from its producers (layers whose output rows make it), through ops that
act channel by channel, to its consumers (layers whose reduction axis reads it). Residual Adds,
squeeze-excite gates and other elementwise ops between produced tensors tie their spaces into
one group: every member removes the same channels. A group is explored from one producer's
output, in both directions, one op at a time (`_relate`); each value in it is a Port: the axis
its channels sit on and how many units along that axis one channel spans (a flatten into a
Gemm turns each channel into a block of columns). An op that is not understood, a graph output,
a read inside a subgraph or a shape computed at run time keeps the group whole, and the reason
names the op. Only what the rule list below understands is ever shrunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import ModelProto, numpy_helper

from .graph import ConstRef, Constants, Layer
from .index import GraphIndex

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus",
         "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Sin", "Cos",
         "Floor", "Ceil", "Round", "Sign", "Identity", "ThresholdedRelu", "Shrink", "Dropout", "Cast", "Clip"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}  # per-channel inputs
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
          "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"}


@dataclass(frozen=True)
class Port:
    """Where a group's channels sit on one value: channel c is units [c*block, (c+1)*block) of axis."""

    value: str
    axis: int
    block: int


@dataclass(frozen=True)
class Edit:
    """Something outside the layers' weights that changes with the channels kept.

    kind "slice": a constant input of the node, sliced along axis (units of block per channel);
    "entry": one entry of a constant shape/sizes input set to the units kept; "depthwise": a
    depthwise Conv's weight rows, bias and group attribute."""

    kind: str
    node: tuple  # the node's Site.path
    label: str
    input: int = 0
    axis: int = 0
    block: int = 1


@dataclass(frozen=True)
class Consumer:
    layer: Layer
    block: int  # input units (channels or columns) per group channel


@dataclass(eq=False)
class Group:
    label: str
    channels: int
    producers: list[Layer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    ports: dict[str, Port] = field(default_factory=dict)
    blocked: str | None = None  # why the group is kept whole

    def block(self, why: str) -> None:
        if self.blocked is None:
            self.blocked = why


@dataclass(frozen=True)
class _Rel:
    ports: tuple = ()
    edits: tuple = ()
    producer: Layer | None = None
    consumer: Consumer | None = None


class _Context:
    def __init__(self, index: GraphIndex, constants: Constants, layers: list[Layer], shapes: dict):
        self.index, self.constants, self.shapes = index, constants, shapes
        self.layer_of = {u.site.node: l for l in layers for u in l.uses}
        self.opset = next((o.version for o in index.model.opset_import if o.domain in ("", "ai.onnx")), 1)

    def const(self, value: ir.Value | None):
        c = self.constants.of(value)
        return c if isinstance(c, ConstRef) else None

    def array(self, value) -> np.ndarray | None:
        c = self.const(value)
        return None if c is None else numpy_helper.to_array(c.tensor)

    def dims(self, value: ir.Value | None) -> tuple | None:
        if value is None:
            return None
        c = self.const(value)
        if c is not None:
            return tuple(c.tensor.dims)
        return self.shapes.get(value.name)

    def rank(self, value) -> int | None:
        d = self.dims(value)
        return None if d is None else len(d)

    def attr(self, node: ir.Node, name: str, default=None):
        a = node.attributes.get(name)
        return default if a is None else a.value

    def path(self, node: ir.Node) -> tuple:
        return self.index.site(node).path

    def label(self, node: ir.Node) -> str:
        return self.index.site(node).label


def static_shapes(model: ModelProto) -> dict[str, tuple]:
    """Main-graph value name -> shape (ints; the dim_param name, or None, where symbolic), by onnx shape inference on a
    copy without the large tensors' data (inference needs their dims only)."""
    light = ModelProto()
    light.CopyFrom(_without_data(model))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # shapes are a help here: a model inference rejects keeps what it declares
        inferred = light
    out = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in t.shape.dim)
    return out


def _without_data(model: ModelProto) -> ModelProto:
    m = ModelProto()
    for f in ("ir_version", "producer_name", "domain"):
        setattr(m, f, getattr(model, f))
    m.opset_import.extend(model.opset_import)
    g = m.graph
    src = model.graph
    g.name = src.name
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for t in src.initializer:
        g.initializer.append(_light_tensor(t))
    for n in src.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" \
                and math.prod(n.attribute[0].t.dims) > 64:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.attribute[0].t.CopyFrom(_light_tensor(n.attribute[0].t))
            g.node.append(c)
        else:
            g.node.append(n)
    m.functions.extend(model.functions)
    return m


def _light_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    if math.prod(t.dims) <= 64:
        return t
    light = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
    return light


# ----------------------------------------------------------------------------- exploring

def find_groups(index: GraphIndex, constants: Constants, layers: list[Layer],
                shapes: dict[str, tuple]) -> list[Group]:
    """Every channel group whose producers are layers of the main graph, in graph order."""
    ctx = _Context(index, constants, layers, shapes)
    groups, taken = [], set()
    for layer in layers:
        site = layer.uses[0].site
        out = site.node.outputs[0]
        if out.name in taken or _depthwise(ctx, site.node):
            continue
        g = Group(layer.name, layer.adapter.channels(site.proto, layer.shape)[1])
        if site.scope:
            g.producers.append(layer)
            g.block(f"{layer.name} is inside a subgraph")
        else:
            _explore(ctx, g, out, _out_axis(ctx, layer))
        taken |= set(g.ports)
        groups.append(g)
    return groups


def _out_axis(ctx: _Context, layer: Layer) -> int:
    out = layer.uses[0].site.node.outputs[0]
    if layer.op == "MatMul":
        r = ctx.rank(out)
        return -1 if r is None else r - 1
    return 1


def _explore(ctx: _Context, g: Group, start: ir.Value, axis: int) -> None:
    queue = [(start, axis, 1)]
    seen: set = set()
    while queue:
        v, axis, block = queue.pop()
        if axis < 0:
            g.block(f"the rank of '{v.name}' is not known")
            continue
        port = Port(v.name, axis, block)
        if v.name in g.ports:
            if g.ports[v.name] != port:
                g.block(f"'{v.name}' carries the channels in two layouts")
            continue
        g.ports[v.name] = port
        if v.is_graph_output():
            g.block(f"channels reach the graph output '{v.name}'")
        producer = v.producer()
        if producer is None:
            g.block(f"channels come from the graph input '{v.name}'")
        nodes = ([producer] if producer is not None else []) + [u.node for u in v.uses()]
        for node in nodes:
            key = (node, v.name) if node in ctx.layer_of and not _depthwise(ctx, node) else node
            if key in seen:
                continue
            seen.add(key)
            if node.graph is not ctx.index.ir.graph:
                g.block(f"'{v.name}' is read inside a subgraph ({node.op_type})")
                continue
            rel = _relate(ctx, node, v, port, g.channels)
            if isinstance(rel, str):
                g.block(f"{node.op_type} '{ctx.label(node)}': {rel}")
                continue
            queue.extend(rel.ports)
            g.edits.extend(e for e in rel.edits if e not in g.edits)
            if rel.producer is not None and rel.producer not in g.producers:
                g.producers.append(rel.producer)
            if rel.consumer is not None:
                g.consumers.append(rel.consumer)
    if not g.consumers and g.blocked is None:
        g.block("the channels reach no layer")


def _relate(ctx: _Context, node: ir.Node, v: ir.Value, port: Port, channels: int):
    """How node relates the channels on v to its other inputs and outputs, or why it cannot."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"custom op {node.domain}.{op} is not understood"
    if node in ctx.layer_of:
        return _layer_role(ctx, node, v, port)
    if op == "Conv":
        return "its weight is not a prunable constant"
    extra = [o for o in node.outputs[1:] if o.uses() or o.is_graph_output()]
    if extra and op not in ("Split",):
        return f"its output '{extra[0].name}' is used"
    if op in UNARY:
        return _unary(ctx, node, port)
    if op in ELEMENTWISE:
        return _elementwise(ctx, node, v, port, channels)
    if op in NORMS:
        return _norm(ctx, node, port, NORMS[op])
    if op in POOLS:
        return _same(node, port) if port.axis == 1 else "pools with the channels off axis 1"
    if op in ("Transpose", "Squeeze", "Unsqueeze"):
        return _axes_op(ctx, node, v, port)
    if op in ("Flatten", "Reshape"):
        return _reshape(ctx, node, v, port, channels)
    if op in REDUCE:
        return _reduce(ctx, node, v, port)
    if op in ("Pad", "Resize", "Upsample"):
        return _spatial(ctx, node, v, port)
    if op in ("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization"):
        return _normalised(ctx, node, port)
    return f"{op} is not understood on the channel axis"


def _same(node: ir.Node, port: Port) -> _Rel:
    return _Rel(ports=((node.inputs[0], port.axis, port.block), (node.outputs[0], port.axis, port.block)))


def _layer_role(ctx: _Context, node: ir.Node, v: ir.Value, port: Port):
    layer = ctx.layer_of[node]
    site = ctx.index.site(node)
    if len(layer.uses) > 1:
        return "its weight is shared by several nodes"
    if _depthwise(ctx, node):
        return _depthwise_rel(ctx, node, v, port, layer)
    g = site.proto.attribute
    group = next((a.i for a in g if a.name == "group"), 1)
    if group != 1:
        return f"grouped Conv (group={group})"
    if node.outputs[0] is v:
        if port.block != 1 or port.axis != _out_axis(ctx, layer):
            return "produces the channels on another axis"
        return _Rel(producer=layer)
    if node.inputs[0] is not v:
        return "reads the channels as its weight operand"
    if layer.op == "Gemm" and (ctx.attr(node, "transA", 0) or port.axis != 1):
        return "Gemm reads the channels on its sample axis"
    if layer.op == "MatMul" and port.axis != (ctx.rank(v) or 0) - 1:
        return "MatMul reads the channels off its reduction axis"
    if layer.op in ("Conv", "ConvTranspose") and port.axis != 1:
        return "reads the channels off axis 1"
    return _Rel(consumer=Consumer(layer, port.block))


def _depthwise(ctx: _Context, node: ir.Node) -> bool:
    """A Conv with one input channel per group and more than one group: it acts channel by channel."""
    if node.op_type != "Conv" or node not in ctx.layer_of:
        return False
    layer = ctx.layer_of[node]
    return ctx.attr(node, "group", 1) > 1 and layer.shape[1] == 1


def _depthwise_rel(ctx: _Context, node: ir.Node, v: ir.Value, port: Port, layer: Layer):
    groups = ctx.attr(node, "group", 1)
    mult = layer.shape[0] // groups
    if port.axis != 1:
        return "reads the channels off axis 1"
    if node.inputs[0] is v:
        block_in, block_out = port.block, port.block * mult
    elif port.block % mult:
        return f"its {mult} outputs per channel split a channel"
    else:
        block_in, block_out = port.block // mult, port.block
    edit = Edit("depthwise", ctx.path(node), ctx.label(node), block=block_in)
    return _Rel(ports=((node.inputs[0], 1, block_in), (node.outputs[0], 1, block_out)), edits=(edit,))


def _unary(ctx: _Context, node: ir.Node, port: Port):
    if node.op_type == "Clip":
        for k in (1, 2):
            if k < len(node.inputs) and node.inputs[k] is not None:
                a = ctx.array(node.inputs[k])
                if a is None or a.size != 1:
                    return "its bounds are not constant scalars"
    if node.op_type == "Cast" and ctx.attr(node, "to") not in (1, 10, 11, 16):
        return "casts to a non-float type"
    return _same(node, port)


def _elementwise(ctx: _Context, node: ir.Node, v: ir.Value, port: Port, channels: int):
    """Broadcasting ops: a constant with the channel axis is sliced, a produced tensor with it is
    tied into the group, anything of size 1 there broadcasts."""
    out = node.outputs[0]
    r_out = ctx.rank(out)
    if r_out is None:
        return f"the rank of '{out.name}' is not known"
    axis_out = port.axis if v is out else port.axis + r_out - (ctx.rank(v) or 0)
    units = channels * port.block
    ports, edits = [(out, axis_out, port.block)], []
    for k, x in enumerate(node.inputs):
        if x is None or x is v:
            continue
        dims = ctx.dims(x)
        if dims is None:
            return f"the shape of '{x.name}' is not known"
        a = axis_out - (r_out - len(dims))
        if a < 0 or dims[a] == 1:
            continue
        if dims[a] != units:
            return f"'{x.name}' has {dims[a]} entries on the channel axis, not {units}"
        if ctx.const(x) is not None:
            edits.append(Edit("slice", ctx.path(node), ctx.label(node), k, a, port.block))
        else:
            ports.append((x, a, port.block))
    if v is not out:
        ports.append((v, port.axis, port.block))
    return _Rel(ports=tuple(ports), edits=tuple(edits))


def _norm(ctx: _Context, node: ir.Node, port: Port, per_channel: tuple):
    if port.axis != 1:
        return "normalises with the channels off axis 1"
    edits = []
    for k in per_channel:
        if k < len(node.inputs) and node.inputs[k] is not None:
            if ctx.const(node.inputs[k]) is None:
                return f"its input {k} is not a constant"
            edits.append(Edit("slice", ctx.path(node), ctx.label(node), k, 0, port.block))
    return _Rel(ports=_same(node, port).ports, edits=tuple(edits))


def _axes(ctx: _Context, node: ir.Node) -> list[int] | None:
    a = ctx.attr(node, "axes")
    if a is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = ctx.array(node.inputs[1])
        if arr is None:
            return None
        a = arr.reshape(-1).tolist()
    return list(a) if a is not None else []


def _axes_op(ctx: _Context, node: ir.Node, v: ir.Value, port: Port):
    """Transpose, Squeeze, Unsqueeze: the channel axis moves, the units stay."""
    x, out = node.inputs[0], node.outputs[0]
    r_in, r_out = ctx.rank(x), ctx.rank(out)
    if r_in is None or r_out is None:
        return "the ranks around it are not known"
    if node.op_type == "Transpose":
        perm = list(ctx.attr(node, "perm", None) or reversed(range(r_in)))
        mapping = {p: i for i, p in enumerate(perm)}  # input axis -> output axis
    else:
        axes = _axes(ctx, node)
        if axes is None:
            return "its axes are computed at run time"
        big = r_in if node.op_type == "Squeeze" else r_out
        axes = {a % big for a in axes} if axes else {i for i, d in enumerate(ctx.dims(x)) if d == 1}
        kept = [i for i in range(big) if i not in axes]
        mapping = ({i: j for j, i in enumerate(kept)} if node.op_type == "Squeeze"
                   else {j: i for j, i in enumerate(kept)})
    if v is x:
        if port.axis not in mapping:
            return "removes the channel axis"
        axis_in, axis_out = port.axis, mapping[port.axis]
    else:
        inverse = {o: i for i, o in mapping.items()}
        axis_in, axis_out = inverse[port.axis], port.axis
    return _Rel(ports=((x, axis_in, port.block), (out, axis_out, port.block)))


def _reshape(ctx: _Context, node: ir.Node, v: ir.Value, port: Port, channels: int):
    """Flatten/Reshape keep a group when the channel axis merges with the axes after it (each
    channel becomes a longer block) or splits inside a block; anything else mixes channels."""
    x, out = node.inputs[0], node.outputs[0]
    s_in, s_out = ctx.dims(x), ctx.dims(out)
    if s_in is None or s_out is None:
        return "its shapes are not known"
    known, other = (s_in, s_out) if v is x else (s_out, s_in)
    o = _leading_match(known[:port.axis], other)
    if o is None:
        o = _trailing_match(known[port.axis:], other)
    if o is None or o >= len(other):
        return "mixes the channel axis with the axes before it (or their sizes are not known)"
    if not all(isinstance(d, int) for d in known[port.axis:] + other[o:]):
        return "the sizes from the channel axis on are not known statically"
    block = _remapped_block(known, port.axis, port.block, other, o)
    if block is None:
        return "mixes channels (the channel axis does not stay whole)"
    edits = ()
    if node.op_type == "Reshape":
        shape = ctx.array(node.inputs[1])
        if shape is None:
            return "its target shape is computed at run time"
        axis_out = o if v is x else port.axis
        if shape.reshape(-1)[axis_out] > 0:
            edits = (Edit("entry", ctx.path(node), ctx.label(node), 1, axis_out,
                          block if v is x else port.block),)
        elif shape.reshape(-1)[axis_out] == 0:
            return "copies the channel count from its input (shape entry 0)"
    ports = (((x, port.axis, port.block), (out, o, block)) if v is x
             else ((x, o, block), (out, port.axis, port.block)))
    return _Rel(ports=ports, edits=edits)


def _leading_match(lead: tuple, other: tuple) -> int | None:
    """How many leading axes of other hold exactly the axes lead: the same symbols, or equal
    products when every size is known."""
    if other[:len(lead)] == lead and None not in lead:
        return len(lead)
    if all(isinstance(d, int) for d in lead):
        total = math.prod(lead)
        for i in range(len(other) + 1):
            head = other[:i]
            if all(isinstance(d, int) for d in head) and math.prod(head) == total:
                return i
    return None


def _trailing_match(tail: tuple, other: tuple) -> int | None:
    """Where in other the axes tail start, by equal products of static sizes (the element count
    is the same on both sides, so what comes before matches too)."""
    if not all(isinstance(d, int) for d in tail):
        return None
    total = math.prod(tail)
    for i in range(len(other) - 1, -1, -1):
        rest = other[i:]
        if not all(isinstance(d, int) for d in rest) or math.prod(rest) > total:
            return None
        if math.prod(rest) == total:
            return i
    return None


def _remapped_block(known, axis, block, other, o) -> int | None:
    if other[o] == known[axis]:
        return block
    if other[o] > known[axis]:  # merge: known[axis:axis+t] -> other[o]
        t, size = axis, 1
        while t < len(known) and size < other[o]:
            size *= known[t]
            t += 1
        return block * math.prod(known[axis + 1:t]) if size == other[o] else None
    t, size = o, 1  # split: known[axis] -> other[o:t], the trailing part inside one block
    while t < len(other) and size < known[axis]:
        size *= other[t]
        t += 1
    inner = math.prod(other[o + 1:t])
    return block // inner if size == known[axis] and block % inner == 0 else None


def _reduce(ctx: _Context, node: ir.Node, v: ir.Value, port: Port):
    x, out = node.inputs[0], node.outputs[0]
    r = ctx.rank(x)
    if r is None:
        return "the rank of its input is not known"
    axes = _axes(ctx, node)
    if axes is None:
        return "its axes are computed at run time"
    axes = {a % r for a in axes} or set(range(r))
    keep = ctx.attr(node, "keepdims", 1)
    mapping = {i: (i if keep else i - sum(a < i for a in axes)) for i in range(r) if i not in axes}
    if v is x:
        if port.axis not in mapping:
            return "reduces over the channel axis"
        return _Rel(ports=((out, mapping[port.axis], port.block), (x, port.axis, port.block)))
    inverse = {o: i for i, o in mapping.items()}
    return _Rel(ports=((x, inverse[port.axis], port.block), (out, port.axis, port.block)))


def _spatial(ctx: _Context, node: ir.Node, v: ir.Value, port: Port):
    """Pad and Resize act per channel as long as they leave the channel axis alone."""
    op = node.op_type
    if op == "Pad":
        pads = ctx.attr(node, "pads")
        if pads is None:
            arr = ctx.array(node.inputs[1]) if len(node.inputs) > 1 else None
            if arr is None:
                return "its pads are computed at run time"
            pads = arr.tolist()
        r = len(pads) // 2
        axes = _axes(ctx, node) if len(node.inputs) > 3 else None
        axes = list(range(r)) if not axes else [a % (ctx.rank(node.inputs[0]) or r) for a in axes]
        if any(pads[i] or pads[i + r] for i, a in enumerate(axes) if a == port.axis):
            return "pads the channel axis"
        return _same(node, port)
    ports = _same(node, port).ports
    for k in (range(1, 2) if op == "Upsample" else range(1, len(node.inputs))):
        x = node.inputs[k] if k < len(node.inputs) else None
        if x is None or (k == 1 and op == "Resize"):  # Resize's roi does not touch the channel axis
            continue
        arr = ctx.array(x) if ctx.dims(x) != (0,) else np.zeros(0)
        if arr is None:
            return "its scales or sizes are computed at run time"
        if arr.size == 0:
            continue
        if arr.dtype.kind == "f":
            if arr.reshape(-1)[port.axis] != 1:
                return "rescales the channel axis"
        else:
            return _Rel(ports=ports, edits=(Edit("entry", ctx.path(node), ctx.label(node), k, port.axis,
                                                 port.block),))
    scales = ctx.attr(node, "scales")
    if scales is not None and scales[port.axis] != 1:
        return "rescales the channel axis"
    return _Rel(ports=ports)


def _normalised(ctx: _Context, node: ir.Node, port: Port):
    r = ctx.rank(node.inputs[0])
    if r is None:
        return "the rank of its input is not known"
    if node.op_type == "LayerNormalization":
        axis = ctx.attr(node, "axis", -1) % r
        if port.axis >= axis:
            return "normalises over the channel axis"
        return _same(node, port)
    axis = ctx.attr(node, "axis", -1 if ctx.opset >= 13 else 1) % r
    if port.axis == axis or (ctx.opset < 13 and port.axis >= axis):
        return "normalises over the channel axis"
    return _same(node, port)
