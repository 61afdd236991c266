"""From the channels chosen per group to the edits of the shrink rule (rewrite/shrink.py).

Every group says which of its channels go; through its ports that is a set of units removed
from each value it reaches. Concat lets several groups remove units from one value, so the
edits are derived from the union per value, never group by group: a producer loses the rows of
its output's removed units, a consumer the columns of its input's, a per-channel constant, a
depthwise Conv, a Split's part sizes, a Slice's range and a Reshape's target shape follow the
values they act on.
"""

from __future__ import annotations

import numpy as np

from .channel_ops import Edit, is_depthwise
from .graph import Layer
from .groups import Group
from .index import GraphIndex
from .rewrite.shrink import ForgetShape, NewInput, SetAttr, SetEntry, SetInput, SliceInput, constant_array


def removed_units(chosen: list[tuple[Group, list[int]]]) -> dict[str, np.ndarray]:
    """Value name -> sorted units removed from its channel axis, over every group's choice."""
    out: dict[str, set] = {}
    for g, removed in chosen:
        for name, port in g.ports.items():
            units = port.units(removed)
            if units.size:
                out.setdefault(name, set()).update(units.tolist())
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items()}


def _kept(total: int, gone: np.ndarray | None) -> np.ndarray:
    return np.setdiff1d(np.arange(total), gone if gone is not None else [])


def dense_edits(layers: list[Layer], weights: dict) -> list:
    """The consumers' compensated weights written in their dense shapes (the reference model)."""
    out = []
    for layer in layers:
        if id(layer) in weights:
            w, b = weights[id(layer)]
            pos = layer.uses[0].site.path[-1]
            out.append(SetInput(pos, layer.adapter.weight_input, w))
            if b is not None:
                out.append(SetInput(pos, layer.adapter.bias_input, b))
    return out


def shrink_edits(index: GraphIndex, layers: list[Layer], groups: list[Group], removed: dict, weights: dict) -> list:
    """Every edit that removes the units `removed` (removed_units) from the model."""
    edits: list = []
    for layer in layers:
        site = layer.uses[0].site
        if site.scope or is_depthwise(layer):
            continue
        edits += _layer_edits(layer, removed, weights)
    seen = set()
    for g in groups:
        for e in g.edits:
            key = (e.kind, e.node, e.input, e.axis)
            if key not in seen and (e.ref in removed or e.ref2 in removed or e.kind == "split"):
                seen.add(key)
                edits += _edit(index, layers, e, removed)
    return edits + [ForgetShape(name) for name in removed]


def _layer_edits(layer: Layer, removed: dict, weights: dict) -> list:
    node, adapter = layer.uses[0].node, layer.adapter
    site = layer.uses[0].site
    x, y = site.node.inputs[0].name, site.node.outputs[0].name
    compensated = id(layer) in weights
    w, b = weights[id(layer)] if compensated else (layer.read(), None)
    n_in, n_out = adapter.channels(node, layer.shape)
    changed = compensated
    if x in removed:
        w, changed = adapter.drop_inputs(node, w, _kept(n_in, removed[x])), True
    pos, out = site.path[-1], []
    bias_k = adapter.bias_input
    has_bias = bias_k is not None and len(node.input) > bias_k and node.input[bias_k]
    if y in removed:
        keep = _kept(n_out, removed[y])
        w, changed = adapter.drop_outputs(node, w, keep), True
        if has_bias:
            b = adapter.drop_bias(node, b if b is not None else constant_array(site.node.inputs[bias_k]), keep)
    if changed:
        out.append(SetInput(pos, adapter.weight_input, w))
    if has_bias and b is not None:
        out.append(SetInput(pos, bias_k, b))
    return out


def _edit(index: GraphIndex, layers: list[Layer], e: Edit, removed: dict) -> list:
    site = index.at(e.node)
    node, pos = site.node, e.node[-1]
    gone = removed.get(e.ref, np.zeros(0, np.int64))
    if e.kind == "slice":
        arr = constant_array(node.inputs[e.input])
        return [SliceInput(pos, e.input, e.axis, _kept(arr.shape[e.axis], gone))]
    if e.kind == "entry":
        arr = constant_array(node.inputs[e.input]).reshape(-1)
        return [SetEntry(pos, e.input, e.axis, int(arr[e.axis]) - len(gone))]
    if e.kind == "literal":
        return [NewInput(pos, e.input, np.array([e.data[0] - len(gone)], dtype=np.int64))]
    if e.kind == "depthwise":
        layer = next(l for l in layers if l.uses[0].site.node is node)
        rows = _kept(layer.shape[0], gone)
        out = [SetInput(pos, 1, np.take(layer.read(), rows, axis=0))]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            out.append(SetInput(pos, 2, np.take(constant_array(node.inputs[2]), rows, axis=0)))
        groups = node.attributes["group"].value
        return out + [SetAttr(pos, "group", groups - len(removed.get(e.ref2, ())))]
    if e.kind == "split":
        return _split_edit(node, pos, e, removed)
    return _range_edit(node, pos, e, gone)


def _split_edit(node, pos: int, e: Edit, removed: dict) -> list:
    if e.input == 1:
        sizes = constant_array(node.inputs[1]).reshape(-1).tolist()
    else:
        sizes = list(node.attributes["split"].value)
    new = [int(s) - len(removed.get(o.name, ())) for s, o in zip(sizes, node.outputs)]
    if e.input == 1:
        return [SetInput(pos, 1, np.array(new, dtype=np.int64))]
    return [SetAttr(pos, "split", new)]


def _range_edit(node, pos: int, e: Edit, gone: np.ndarray) -> list:
    """A Slice on the channel axis keeps [start, end): both move down by the units removed before them."""
    new = [int(v - np.sum(gone < v)) for v in e.data]
    if len(node.inputs) == 1:  # opset < 10: attributes
        out = []
        for k, name in ((0, "starts"), (1, "ends")):
            vals = list(node.attributes[name].value)
            vals[e.input] = new[k]
            out.append(SetAttr(pos, name, vals))
        return out
    return [SetEntry(pos, 1, e.input, new[0]), SetEntry(pos, 2, e.input, new[1])]
