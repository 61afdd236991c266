"""Coupled channel groups, found on the ONNX graph: what structured pruning removes together.

A set of channels flows from its producers (layers whose output rows make it), through ops that
act channel by channel, to its consumers (layers whose reduction axis reads it). Residual Adds,
squeeze-excite gates and other elementwise ops between produced tensors tie their spaces into
one group: every member removes the same channels. A group is explored from one producer's
output, in both directions, one op at a time (channel_layout.relate); where its channels sit on
each value is a Port. An op that is not understood, a graph output, a read inside a subgraph or
a shape computed at run time keeps the group whole, and the reason names the op. Only what the
op table understands is ever shrunk.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field, replace

import onnx
import onnx_ir as ir
from onnx import ModelProto

from .channel_layout import relate
from .channel_ops import Coarser, Consumer, Context, Edit, Port, Producer, depthwise, out_axis
from .graph import Constants, Layer
from .index import GraphIndex


@dataclass(eq=False)
class Group:
    label: str
    channels: int
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    ports: dict[str, Port] = field(default_factory=dict)
    blocked: str | None = None  # why the group is kept whole
    width: int = 1  # producer output units per channel: a head's size, 1 for plain channels
    coarser: int = 1  # the block of channels an op could follow (Coarser), for a second exploration
    # activation MatMuls it reaches (attention's): main-graph position -> (output, its channel axis's size)
    products: dict[int, tuple[str, int | None]] = field(default_factory=dict)

    def block(self, why: str) -> None:
        if self.blocked is None:
            self.blocked = why


def static_shapes(model: ModelProto) -> dict[str, tuple]:
    """Main-graph value name -> shape (ints; the dim_param name, or None, where symbolic), by onnx shape inference on a
    copy without the large tensors' data (inference needs their dims only)."""
    light = ModelProto()
    light.CopyFrom(_without_data(model))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # shapes are a help here: a model inference rejects keeps what it declares
        inferred = light
    out = _shapes_of(inferred)
    if any(not all(isinstance(d, int) for d in shape[1:]) for shape in out.values()):
        _refine(out, light)
    return out


def _shapes_of(model: ModelProto) -> dict[str, tuple]:
    out = {}
    g = model.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in t.shape.dim)
    return out


def _refine(out: dict, light: ModelProto) -> None:
    """Sizes onnx inference leaves open where exporters compute shapes at run time (a head size
    as the hidden size over the head count): onnxruntime's symbolic inference evaluates them."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    bare = ModelProto()
    bare.CopyFrom(light)  # the tensors without data become inputs: it would read their values
    kept = [t for t in bare.graph.initializer if t.dims and not _has_data(t)]
    for t in kept:
        bare.graph.initializer.remove(t)
        bare.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        with warnings.catch_warnings(), _elsewhere():
            warnings.simplefilter("ignore")
            sym = _shapes_of(SymbolicShapeInference.infer_shapes(bare, auto_merge=True))
    except Exception:  # a help only: what onnx inferred stands
        return
    for name, shape in sym.items():
        mine = out.get(name)
        if mine is None or len(mine) != len(shape):
            continue
        out[name] = tuple(b if isinstance(b, int) and not isinstance(a, int) else a for a, b in zip(mine, shape))


@contextlib.contextmanager
def _elsewhere():
    """Where symbolic inference gives up it saves its partial model into the working directory:
    the user's, unless it runs in a directory of its own."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnx-lobs-") as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(here)


def _has_data(t: onnx.TensorProto) -> bool:
    return bool(t.raw_data or t.float_data or t.int32_data or t.int64_data or t.double_data or t.uint64_data
                or t.string_data or t.external_data)


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
    ctx = Context(index, constants, layers, shapes)
    groups, taken = [], set()
    for layer in layers:
        site = layer.uses[0].site
        out = site.node.outputs[0]
        if out.name in taken or depthwise(ctx, site.node):
            continue
        channels = layer.adapter.channels(site.proto, layer.shape)[1]
        if site.scope:
            g = Group(layer.name, channels)
            g.producers.append(Producer(layer, Port(out.name, 1, hi=channels)))
            g.block(f"{layer.name} is inside a subgraph")
        else:
            g = _grouped(ctx, layer.name, out, out_axis(ctx, layer), channels)
        taken |= {name for name, p in g.ports.items() if p.span() == (0, channels)}
        groups.append(g)
    _check_axes(groups)
    return groups


def _grouped(ctx: Context, label: str, out: ir.Value, axis: int, units: int) -> Group:
    """The group of a layer's output channels; if an op can follow them only in blocks (a
    Reshape into heads), the group of those blocks instead."""
    width = 1
    while True:
        g = Group(label, units // width, width=width)
        _explore(ctx, g, out, Port(out.name, axis, block=width, hi=units // width))
        if not g.blocked or g.coarser == 1 or units % (width * g.coarser) or width * g.coarser >= units:
            return g
        width *= g.coarser


def _explore(ctx: Context, g: Group, start: ir.Value, port: Port) -> None:
    """Breadth over values; a value reached again with an adjacent range of the same channels
    (the parts of a Split joined again by a Concat) gets the union, and its ops are seen again."""
    queue = [(start, port)]
    seen: set = set()
    producers, consumers = {}, {}
    while queue:
        v, port = queue.pop()
        if port.axis < 0:
            g.block(f"the rank of '{v.name}' is not known")
            continue
        if v.name in g.ports:
            merged = _union(g.ports[v.name], port)
            if merged is None:
                g.block(f"'{v.name}' carries the channels in two layouts")
                continue
            if merged == g.ports[v.name]:
                continue
            port = merged
        g.ports[v.name] = port
        if v.is_graph_output():
            g.block(f"channels reach the graph output '{v.name}'")
        producer = v.producer()
        if producer is None:
            g.block(f"channels come from the graph input '{v.name}'")
        for node in ([producer] if producer is not None else []) + [u.node for u in v.uses()]:
            key = (node, v.name, port)
            if key in seen:
                continue
            seen.add(key)
            if node.graph is not ctx.index.ir.graph:
                g.block(f"'{v.name}' is read inside a subgraph ({node.op_type})")
                continue
            rel = relate(ctx, node, v, port, g.channels)
            if isinstance(rel, Coarser):
                g.coarser = math.lcm(g.coarser, rel.factor)
                rel = rel.why
            if isinstance(rel, str):
                g.block(f"{node.op_type} '{ctx.index.site(node).label}': {rel}")
                continue
            if node.op_type == "MatMul" and node not in ctx.layer_of:
                y = node.outputs[0]
                axis = next(p.axis for x, p in rel.ports if x is y)
                g.products[ctx.index.site(node).path[-1]] = (y.name, ctx.size(y, axis))
            queue.extend(rel.ports)
            g.edits.extend(e for e in rel.edits if e not in g.edits)
            if rel.producer is not None:
                producers[id(rel.producer.layer)] = rel.producer
            if rel.consumer is not None:
                consumers[id(rel.consumer.layer)] = rel.consumer
    def order(x):
        return x.layer.uses[0].site.path

    g.producers += sorted((p for p in producers.values() if p not in g.producers), key=order)
    g.consumers = sorted(consumers.values(), key=order)
    if not g.consumers and g.blocked is None:
        g.block("the channels reach no layer")


def _union(a: Port, b: Port) -> Port | None:
    """One port for two ranges of the same channels on a value, when they touch and agree."""
    if (a.axis, a.block) != (b.axis, b.block) or a.offset - a.lo * a.block != b.offset - b.lo * b.block:
        return None
    if max(a.lo, b.lo) > min(a.hi, b.hi):  # a gap between them
        return None
    lo = min(a.lo, b.lo)
    return replace(a, lo=lo, hi=max(a.hi, b.hi), offset=a.offset + (lo - a.lo) * a.block)


def _check_axes(groups: list[Group]) -> None:
    """Units removed by several groups from one value must lie on one axis."""
    axis: dict[str, int] = {}
    for g in groups:
        for name, p in g.ports.items():
            if axis.setdefault(name, p.axis) != p.axis:
                g.block(f"'{name}' carries channels of two groups on different axes")
