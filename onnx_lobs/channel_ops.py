"""How each op carries channels: the one place that knows which ops act channel by channel.

A group's channels sit on a value as a Port: channel c (for lo <= c < hi) is the units
[offset + (c - lo) * block, ... + block) of one axis. `relate` takes an op reached through one
of its inputs or outputs and says where the same channels sit on its other inputs and outputs
(Concat and Split move them to an offset, a flatten makes each one a block of columns, a
depthwise Conv multiplies them), which constants change with them (Edit), whether the op is a
layer that produces or consumes them, or why it cannot be seen through (a string).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir
from onnx import numpy_helper

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
    value: str
    axis: int
    block: int = 1
    offset: int = 0
    lo: int = 0
    hi: int = 0  # channels lo..hi-1 of the group sit here

    def units(self, channels) -> np.ndarray:
        """The units of the given channels (those in lo..hi-1) along the axis, sorted."""
        c = np.asarray([x for x in np.asarray(channels, dtype=np.int64).ravel() if self.lo <= x < self.hi],
                       dtype=np.int64)
        return np.sort((self.offset + (c[:, None] - self.lo) * self.block + np.arange(self.block)).ravel())

    def span(self) -> tuple[int, int]:
        return self.offset, self.offset + (self.hi - self.lo) * self.block


@dataclass(frozen=True)
class Edit:
    """A constant or attribute that changes with the units removed from the value `ref`.

    kind "slice": a constant input sliced along its axis; "entry": entry `axis` of a constant
    shape/sizes input; "literal": a computed 1-element shape piece replaced by the new size
    (data: the size before); "depthwise": a depthwise Conv's rows (ref: its output) and group (its
    input, `ref2`); "split": a Split's part sizes; "range": a Slice's starts and ends (ref: its input)."""

    kind: str
    node: tuple  # the node's Site.path
    label: str
    ref: str
    input: int = 0
    axis: int = 0
    ref2: str = ""
    data: tuple = ()  # "range": the kept [start, end) on the channel axis, normalised


@dataclass(frozen=True)
class Coarser:
    """The channels can be followed only in blocks of `factor` of them (a Reshape into attention
    heads): the group is explored again with each block as one channel."""

    factor: int
    why: str


@dataclass(frozen=True)
class Producer:
    layer: Layer
    port: Port


@dataclass(frozen=True)
class Consumer:
    layer: Layer
    port: Port


@dataclass(frozen=True)
class Rel:
    ports: tuple = ()  # (ir.Value, Port)
    edits: tuple = ()
    producer: Producer | None = None
    consumer: Consumer | None = None


class Context:
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
        return tuple(c.tensor.dims) if c is not None else self.shapes.get(value.name)

    def rank(self, value) -> int | None:
        d = self.dims(value)
        return None if d is None else len(d)

    def size(self, value, axis: int) -> int | None:
        d = self.dims(value)
        return d[axis] if d is not None and axis < len(d) and isinstance(d[axis], int) else None

    def attr(self, node: ir.Node, name: str, default=None):
        a = node.attributes.get(name)
        return default if a is None else a.value

    def edit(self, kind, node, ref, **kw) -> Edit:
        site = self.index.site(node)
        return Edit(kind, site.path, site.label, ref.name if isinstance(ref, ir.Value) else ref, **kw)


def at(port: Port, value: ir.Value, **changes) -> tuple:
    return value, replace(port, value=value.name, **changes)


def out_axis(ctx: Context, layer: Layer) -> int:
    if layer.op == "MatMul":
        r = ctx.rank(layer.uses[0].site.node.outputs[0])
        return -1 if r is None else r - 1
    return 1


def is_depthwise(layer: Layer) -> bool:
    """A Conv with one input channel per group and more than one group: it acts channel by channel."""
    node = layer.uses[0].site.node
    group = node.attributes.get("group")
    return layer.op == "Conv" and group is not None and group.value > 1 and layer.shape[1] == 1


def depthwise(ctx: Context, node: ir.Node) -> bool:
    return node in ctx.layer_of and is_depthwise(ctx.layer_of[node])


LAYOUT = ("Flatten", "Reshape", "Concat", "Split", "Slice")  # seen through by channel_layout.py


def relate_simple(ctx: Context, node: ir.Node, v: ir.Value, port: Port, channels: int):
    """How node relates the channels on v to its other inputs and outputs, or why it cannot (the
    layout ops, which move channels along the axis, are channel_layout.py's)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"custom op {node.domain}.{op} is not understood"
    if node in ctx.layer_of:
        return _layer_role(ctx, node, v, port)
    if op == "Conv":
        return "its weight is not a prunable constant"
    if op == "MatMul":
        return _product(ctx, node, v, port)
    if op == "Shape":
        return _shape(ctx, node, port)
    extra = [o for o in node.outputs[1:] if o.uses() or o.is_graph_output()]
    if extra and op != "Split":
        return f"its output '{extra[0].name}' is used"
    if op in UNARY:
        return _unary(ctx, node, port)
    if op in ELEMENTWISE:
        return _elementwise(ctx, node, v, port, channels)
    if op in NORMS:
        return _norm(ctx, node, v, port, NORMS[op])
    if op in POOLS:
        return _same(node, port) if port.axis == 1 else "pools with the channels off axis 1"
    if op in ("Transpose", "Squeeze", "Unsqueeze"):
        return _axes_op(ctx, node, v, port)
    if op in REDUCE:
        return _reduce(ctx, node, v, port)
    if op in ("Pad", "Resize", "Upsample"):
        return _spatial(ctx, node, v, port)
    if op in ("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization"):
        return _normalised(ctx, node, port)
    return f"{op} is not understood on the channel axis"


def _same(node: ir.Node, port: Port) -> Rel:
    return Rel(ports=(at(port, node.inputs[0]), at(port, node.outputs[0])))


def _layer_role(ctx: Context, node: ir.Node, v: ir.Value, port: Port):
    layer = ctx.layer_of[node]
    if len(layer.uses) > 1:
        return "its weight is shared by several nodes"
    if depthwise(ctx, node):
        return _depthwise_rel(ctx, node, v, port, layer)
    group = ctx.attr(node, "group", 1)
    if group != 1:
        return f"grouped {layer.op} (group={group})"
    if node.outputs[0] is v:
        if port.axis != out_axis(ctx, layer):
            return "produces the channels on another axis"
        b = layer.adapter.bias_input
        if b is not None and b < len(node.inputs) and node.inputs[b] is not None and ctx.const(node.inputs[b]) is None:
            return "its bias is computed at run time"
        return Rel(producer=Producer(layer, port))
    if node.inputs[0] is not v:
        return "reads the channels as its weight operand"
    if layer.op == "Gemm" and (ctx.attr(node, "transA", 0) or port.axis != 1):
        return "Gemm reads the channels on its sample axis"
    if layer.op == "MatMul" and port.axis != (ctx.rank(v) or 0) - 1:
        return "MatMul reads the channels off its reduction axis"
    if layer.op in ("Conv", "ConvTranspose") and port.axis != 1:
        return "reads the channels off axis 1"
    return Rel(consumer=Consumer(layer, port))


def _depthwise_rel(ctx: Context, node: ir.Node, v: ir.Value, port: Port, layer: Layer):
    mult = layer.shape[0] // ctx.attr(node, "group", 1)
    if port.axis != 1:
        return "reads the channels off axis 1"
    x, y = node.inputs[0], node.outputs[0]
    if x is v:
        p_in, p_out = port, replace(port, value=y.name, block=port.block * mult, offset=port.offset * mult)
    elif port.block % mult or port.offset % mult:
        return f"its {mult} outputs per channel split a channel"
    else:
        p_in, p_out = replace(port, value=x.name, block=port.block // mult, offset=port.offset // mult), port
    edit = ctx.edit("depthwise", node, y, ref2=x.name)
    return Rel(ports=((x, p_in), (y, p_out)), edits=(edit,))


def _unary(ctx: Context, node: ir.Node, port: Port):
    if node.op_type == "Clip":
        for k in (1, 2):
            if k < len(node.inputs) and node.inputs[k] is not None:
                a = ctx.array(node.inputs[k])
                if a is None or a.size != 1:
                    return "its bounds are not constant scalars"
    if node.op_type == "Cast" and ctx.attr(node, "to") not in (1, 10, 11, 16):
        return "casts to a non-float type"
    return _same(node, port)


def full_size(ctx: Context, v: ir.Value, port: Port, channels: int) -> int | None:
    """The length of the channel axis on v: its static size, or the group's when it fills the axis."""
    size = ctx.size(v, port.axis)
    if size is None and port.offset == 0 and port.lo == 0 and port.hi == channels:
        return channels * port.block
    return size


def _elementwise(ctx: Context, node: ir.Node, v: ir.Value, port: Port, channels: int):
    """Broadcasting ops: a constant with the channel axis is sliced, a produced tensor with it is
    tied into the group, anything of size 1 there broadcasts."""
    out = node.outputs[0]
    r_out = ctx.rank(out)
    if r_out is None:
        return f"the rank of '{out.name}' is not known"
    axis_out = port.axis if v is out else port.axis + r_out - (ctx.rank(v) or 0)
    units = full_size(ctx, v, port, channels)
    if units is None:
        return f"the channel axis of '{v.name}' has no static size"
    ports, edits = [at(port, out, axis=axis_out)], []
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
            edits.append(ctx.edit("slice", node, out, input=k, axis=a))
        else:
            ports.append(at(port, x, axis=a))
    return Rel(ports=tuple(ports), edits=tuple(edits))


def _product(ctx: Context, node: ir.Node, v: ir.Value, port: Port):
    """A MatMul of two computed tensors (attention's q.k and probs.v): channels on a batch axis
    (heads) tie both operands and the output, on A's rows or B's columns they pass to the
    output's; on the contracted axis they would mix."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    ranks = [ctx.rank(x) for x in (a, b, y)]
    if None in ranks or min(ranks[:2]) < 2 or a is b:
        return "a product whose operand ranks are not known, or with a vector or itself"
    ra, rb, ry = ranks
    ax = port.axis
    if v is a and ax == ra - 1 or v is b and ax == rb - 2:
        return "contracts the channels with another computed tensor"
    if v is a and ax == ra - 2 or v is y and ax == ry - 2:
        return Rel(ports=(at(port, a, axis=ra - 2), at(port, y, axis=ry - 2)))
    if v is b and ax == rb - 1 or v is y and ax == ry - 1:
        return Rel(ports=(at(port, b, axis=rb - 1), at(port, y, axis=ry - 1)))
    y_ax = ax + ry - ctx.rank(v)  # a batch axis, broadcast from the right
    ports = [at(port, y, axis=y_ax)]
    for x, r in ((a, ra), (b, rb)):
        x_ax = y_ax - (ry - r)
        size = None if x is v or x_ax < 0 else ctx.size(x, x_ax)
        if x is v or x_ax < 0 or size == 1:
            continue
        if size is None:
            return f"the size of '{x.name}' on the channel axis is not known"
        if ctx.const(x) is not None:
            return f"its operand '{x.name}' is a constant that is not a layer"
        ports.append(at(port, x, axis=x_ax))
    return Rel(ports=tuple(ports))


def _shape(ctx: Context, node: ir.Node, port: Port):
    """A Shape whose every reader takes other entries than the channel count (Gather or Slice of
    constant positions, as exporters compute batch and sequence sizes) does not see it."""
    r = ctx.rank(node.inputs[0])
    if r is None:
        return "the rank of its input is not known"
    start, end = ctx.attr(node, "start", 0), ctx.attr(node, "end", r)
    start, end = (clamp(x, r) for x in (start, end))
    if not start <= port.axis < end:
        return Rel()
    for use in node.outputs[0].uses():
        reader = use.node
        if reader.op_type == "Gather" and ctx.attr(reader, "axis", 0) == 0 and use.idx == 0:
            picked = ctx.array(reader.inputs[1])
            if picked is not None and port.axis - start not in {int(i) % (end - start) for i in picked.reshape(-1)}:
                continue
        if reader.op_type == "Slice" and use.idx == 0:
            spec = slice_range(ctx, reader, end - start)
            if spec is not None and not spec[0] <= port.axis - start < spec[1]:
                continue
        return f"the channel count is read at run time (by {reader.op_type} '{ctx.index.site(reader).label}')"
    return Rel()


def slice_range(ctx: Context, node: ir.Node, size: int) -> tuple[int, int] | None:
    """[start, end) of a step-1 Slice of a 1-D tensor of the given size, or None when not constant."""
    args = [ctx.array(node.inputs[k]) if k < len(node.inputs) and node.inputs[k] is not None else None
            for k in range(1, 5)]
    if args[0] is None or args[1] is None or (args[3] is not None and int(args[3].reshape(-1)[0]) != 1):
        return None
    s, e = (int(a.reshape(-1)[0]) for a in args[:2])
    return clamp(s, size), clamp(e, size)


def clamp(index: int, size: int) -> int:
    """A start or end index of ONNX's Slice/Shape conventions (negative from the end), in [0, size]."""
    return max(0, min(size, index + size if index < 0 else index))


def _norm(ctx: Context, node: ir.Node, v: ir.Value, port: Port, per_channel: tuple):
    if port.axis != 1:
        return "normalises with the channels off axis 1"
    edits = []
    for k in per_channel:
        if k < len(node.inputs) and node.inputs[k] is not None:
            if ctx.const(node.inputs[k]) is None:
                return f"its input {k} is not a constant"
            edits.append(ctx.edit("slice", node, node.outputs[0], input=k, axis=0))
    return Rel(ports=_same(node, port).ports, edits=tuple(edits))


def axes_of(ctx: Context, node: ir.Node) -> list[int] | None:
    a = ctx.attr(node, "axes")
    if a is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = ctx.array(node.inputs[1])
        if arr is None:
            return None
        a = arr.reshape(-1).tolist()
    return list(a) if a is not None else []


def _axes_op(ctx: Context, node: ir.Node, v: ir.Value, port: Port):
    """Transpose, Squeeze, Unsqueeze: the channel axis moves, the units stay."""
    x, out = node.inputs[0], node.outputs[0]
    r_in, r_out = ctx.rank(x), ctx.rank(out)
    if r_in is None or r_out is None:
        return "the ranks around it are not known"
    if node.op_type == "Transpose":
        perm = list(ctx.attr(node, "perm", None) or reversed(range(r_in)))
        mapping = {p: i for i, p in enumerate(perm)}  # input axis -> output axis
    else:
        axes = axes_of(ctx, node)
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
        return Rel(ports=(at(port, x), at(port, out, axis=mapping[port.axis])))
    inverse = {o: i for i, o in mapping.items()}
    return Rel(ports=(at(port, x, axis=inverse[port.axis]), at(port, out)))


def _reduce(ctx: Context, node: ir.Node, v: ir.Value, port: Port):
    x, out = node.inputs[0], node.outputs[0]
    r = ctx.rank(x)
    if r is None:
        return "the rank of its input is not known"
    axes = axes_of(ctx, node)
    if axes is None:
        return "its axes are computed at run time"
    axes = {a % r for a in axes} or set(range(r))
    keep = ctx.attr(node, "keepdims", 1)
    mapping = {i: (i if keep else i - sum(a < i for a in axes)) for i in range(r) if i not in axes}
    if v is x:
        if port.axis not in mapping:
            return "reduces over the channel axis"
        return Rel(ports=(at(port, out, axis=mapping[port.axis]), at(port, x)))
    inverse = {o: i for i, o in mapping.items()}
    return Rel(ports=(at(port, x, axis=inverse[port.axis]), at(port, out)))


def _spatial(ctx: Context, node: ir.Node, v: ir.Value, port: Port):
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
        axes = axes_of(ctx, node) if len(node.inputs) > 3 else None
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
            return Rel(ports=ports, edits=(ctx.edit("entry", node, node.outputs[0], input=k, axis=port.axis),))
    scales = ctx.attr(node, "scales")
    if scales is not None and scales[port.axis] != 1:
        return "rescales the channel axis"
    return Rel(ports=ports)


def _normalised(ctx: Context, node: ir.Node, port: Port):
    r = ctx.rank(node.inputs[0])
    if r is None:
        return "the rank of its input is not known"
    if node.op_type == "LayerNormalization":
        if port.axis >= ctx.attr(node, "axis", -1) % r:
            return "normalises over the channel axis"
        return _same(node, port)
    axis = ctx.attr(node, "axis", -1 if ctx.opset >= 13 else 1) % r
    if port.axis == axis or (ctx.opset < 13 and port.axis >= axis):
        return "normalises over the channel axis"
    return _same(node, port)
