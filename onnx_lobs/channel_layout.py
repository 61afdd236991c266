"""Ops that move channels along or across axes: Flatten and Reshape (a channel becomes a block of
columns, or a block is split inside), Concat (each input's channels at an offset of the output),
Split and Slice (a range of the channels, shifted). `relate` is the whole op table: these here,
the channel-by-channel ops in channel_ops.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import onnx_ir as ir

from .channel_ops import LAYOUT, Coarser, Context, Port, Rel, at, clamp, relate_simple


def relate(ctx: Context, node: ir.Node, v: ir.Value, port: Port, channels: int):
    """How node relates the channels on v to its other inputs and outputs, or why it cannot."""
    if node.op_type not in LAYOUT or node.domain not in ("", "ai.onnx") or node in ctx.layer_of:
        return relate_simple(ctx, node, v, port, channels)
    if node.op_type in ("Flatten", "Reshape"):
        return _reshape(ctx, node, v, port)
    if node.op_type == "Concat":
        return _concat(ctx, node, v, port)
    if node.op_type == "Split":
        return _split(ctx, node, v, port)
    return _slice(ctx, node, v, port)


def within(port: Port, start: int, end: int):
    """The part of a port inside units [start, end), shifted to start at 0: a Port, None when no
    channel lies there, or why not (a channel straddles the boundary)."""
    lo_u, hi_u = port.span()
    for edge in (start, end):
        if lo_u < edge < hi_u and (edge - port.offset) % port.block:
            return "splits a channel between two parts"
    first = port.lo + max(0, -(-(start - port.offset) // port.block))
    last = port.lo + min(port.hi - port.lo, (end - port.offset) // port.block)
    if first >= last:
        return None
    return replace(port, lo=first, hi=last, offset=port.offset + (first - port.lo) * port.block - start)


def _parts(ctx: Context, values, axis: int) -> list[int] | None:
    sizes = [ctx.size(x, axis) for x in values]
    return None if None in sizes else sizes


def _spread(port: Port, targets, sizes) -> tuple | str:
    """The port on a value cut into consecutive parts (Concat's inputs, Split's outputs)."""
    ports, start = [], 0
    for x, size in zip(targets, sizes):
        p = within(port, start, start + size)
        if isinstance(p, str):
            return p
        if p is not None:
            ports.append(at(p, x))
        start += size
    return tuple(ports)


def _concat(ctx: Context, node: ir.Node, v: ir.Value, port: Port):
    out = node.outputs[0]
    r = ctx.rank(out)
    if r is None:
        return "the rank of its output is not known"
    axis = ctx.attr(node, "axis", 0) % r
    inputs = list(node.inputs)
    if axis != port.axis:  # joined along another axis: every input carries the same channels
        return Rel(ports=tuple(at(port, x) for x in inputs) + (at(port, out),))
    sizes = _parts(ctx, inputs, axis)
    if sizes is None:
        return "the sizes of its inputs on the channel axis are not known"
    if v is out:
        ports = _spread(port, inputs, sizes)
        return ports if isinstance(ports, str) else Rel(ports=ports + (at(port, out),))
    if inputs.count(v) > 1:
        return f"joins '{v.name}' with itself"
    j = inputs.index(v)
    return Rel(ports=(at(port, v), at(port, out, offset=port.offset + sum(sizes[:j]))))


def _split_sizes(ctx: Context, node: ir.Node, axis: int):
    """(part sizes, where they are written: 'input' or 'attribute'), or why they cannot be changed."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = ctx.array(node.inputs[1])
        if arr is None:
            return "its part sizes are computed at run time"
        return [int(s) for s in arr.reshape(-1)], "input"
    sizes = ctx.attr(node, "split")
    if sizes is not None:
        return list(sizes), "attribute"
    return "splits into equal parts without sizes (removing channels would change them)"


def _split(ctx: Context, node: ir.Node, v: ir.Value, port: Port):
    x = node.inputs[0]
    r = ctx.rank(x)
    if r is None:
        return "the rank of its input is not known"
    axis = ctx.attr(node, "axis", 0) % r
    outs = list(node.outputs)
    if axis != port.axis:
        return Rel(ports=(at(port, x),) + tuple(at(port, o) for o in outs))
    found = _split_sizes(ctx, node, axis)
    if isinstance(found, str):
        return found
    sizes, where = found
    edit = ctx.edit("split", node, x, input=1 if where == "input" else -1, axis=axis)
    if v is x:
        ports = _spread(port, outs, sizes)
        return ports if isinstance(ports, str) else Rel(ports=ports + (at(port, x),), edits=(edit,))
    k = outs.index(v)
    return Rel(ports=(at(port, v), at(port, x, offset=port.offset + sum(sizes[:k]))), edits=(edit,))


def slice_spec(ctx: Context, node: ir.Node):
    """[(axis, start, end, step)] of a Slice with constant arguments, or None."""
    if len(node.inputs) == 1:  # opset < 10: attributes
        starts, ends = ctx.attr(node, "starts"), ctx.attr(node, "ends")
        axes, steps = ctx.attr(node, "axes"), None
    else:
        args = [ctx.array(node.inputs[k]) if k < len(node.inputs) and node.inputs[k] is not None else None
                for k in range(1, 5)]
        if args[0] is None or args[1] is None or any(
                a is None for a, k in zip(args[2:], (3, 4)) if k < len(node.inputs) and node.inputs[k] is not None):
            return None
        starts, ends, axes, steps = (None if a is None else a.reshape(-1).tolist() for a in args)
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)
    return list(zip(axes, starts, ends, steps))


def _slice(ctx: Context, node: ir.Node, v: ir.Value, port: Port):
    x, out = node.inputs[0], node.outputs[0]
    spec, r = slice_spec(ctx, node), ctx.rank(x)
    if spec is None or r is None:
        return "its starts, ends, axes or steps are computed at run time"
    mine = [(k, s, e, st) for k, (a, s, e, st) in enumerate(spec) if a % r == port.axis]
    if not mine:
        return Rel(ports=(at(port, x), at(port, out)))
    k, s, e, step = mine[0]
    size = ctx.size(x, port.axis)
    if step != 1 or size is None:
        return "slices the channel axis with a step, or of unknown size"
    s, e = clamp(s, size), clamp(e, size)
    edit = ctx.edit("range", node, x, input=k, axis=port.axis, data=(s, e))
    if v is x:
        p = within(port, s, e)
        if isinstance(p, str):
            return p
        return Rel(ports=((x, port),) + (() if p is None else (at(p, out),)), edits=(edit,))
    return Rel(ports=(at(port, out), at(port, x, offset=port.offset + s)), edits=(edit,))


def _reshape(ctx: Context, node: ir.Node, v: ir.Value, port: Port):
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
    factor = _factor(known, port.axis, other, o)
    if factor is None:
        return "mixes channels (the channel axis does not stay whole)"
    num, den = factor
    if (port.offset * num) % den:
        return "splits a channel across axes"
    if (port.block * num) % den:  # into heads: whole blocks of channels stay together
        return Coarser(den // math.gcd(port.block * num, den), "splits a channel across axes")
    moved = replace(port, axis=o, block=port.block * num // den, offset=port.offset * num // den)
    edits = ()
    if node.op_type == "Reshape":
        edits = _target_entry(ctx, node, o if v is x else port.axis)
        if isinstance(edits, str):
            return edits
    ports = ((x, port), at(moved, out)) if v is x else (at(moved, x), (out, port))
    return Rel(ports=ports, edits=edits)


def _target_entry(ctx: Context, node: ir.Node, axis: int):
    """The edit that keeps a Reshape's target size on the channel axis right: an entry of its
    constant shape, of a constant piece of the Concat that builds it (exporters' [batch, seq,
    heads, -1]), or a piece computed at run time that becomes the new literal size."""
    out, target = node.outputs[0], node.inputs[1]
    where, k, entry = node, 1, axis
    shape = ctx.array(target)
    if shape is None:
        cat = target.producer()
        if cat is None or cat.op_type != "Concat" or cat.graph is not node.graph:
            return "its target shape is computed at run time"
        where, start = cat, 0
        for k, piece in enumerate(cat.inputs):
            n = ctx.size(piece, 0)
            if n is None or ctx.rank(piece) != 1:
                return "its target shape is computed at run time"
            if start <= axis < start + n:
                break
            start += n
        entry, shape = axis - start, ctx.array(piece)
        if shape is None:
            size = ctx.size(out, axis)
            if n != 1 or size is None:
                return "its target size on the channel axis is computed at run time"
            return (ctx.edit("literal", cat, out, input=k, data=(size,)),)
    value = shape.reshape(-1)[entry]
    if value == 0:
        return "copies the channel count from its input (shape entry 0)"
    return (ctx.edit("entry", where, out, input=k, axis=entry),) if value > 0 else ()


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


def _factor(known, axis, other, o) -> tuple[int, int] | None:
    """Units of other's axis o per unit of known's axis, as (num, den): a merge with the axes
    after (num > 1), a split inside (den > 1), or 1."""
    if other[o] == known[axis]:
        return 1, 1
    if other[o] > known[axis]:  # merge: known[axis:t] -> other[o]
        t, size = axis, 1
        while t < len(known) and size < other[o]:
            size *= known[t]
            t += 1
        return (math.prod(known[axis + 1:t]), 1) if size == other[o] else None
    t, size = o, 1  # split: known[axis] -> other[o:t]
    while t < len(other) and size < known[axis]:
        size *= other[t]
        t += 1
    return (1, math.prod(other[o + 1:t])) if size == known[axis] else None
