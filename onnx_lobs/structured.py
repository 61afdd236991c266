"""Structured pruning: whole channels removed from coupled groups, the graph really shrinks.

One calibration pass collects the Hessian of every consumer's input; each group then chooses
its channels (solvers/channels.py) and its consumers get their compensated weights; the graph
is rewritten (rewrite/shrink.py). Before anything is returned, the shrunk model is checked
(onnx checker, strict shape inference) and run beside its dense-shaped equivalent, the original
model with only the consumers' compensated weights written (the removed channels' columns are
zero there): the two must agree to float rounding on the held-out samples, or nothing is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import rewrite
from .activations import Collector, Reading, Session, collect
from .calibration import open_source
from .errors import LobsError, one_line
from .evaluate import Fidelity
from .graph import Constants, Layer, find_layers, matches
from .groups import Group, find_groups, static_shapes
from .hessian import damped_inverse, layer_error, output_energy
from .index import GraphIndex, read_ir
from .modelio import PROTOBUF_LIMIT, iter_graphs
from .rewrite.shrink import (ForgetShape, SetAttr, SetEntry, SetInput, ShrinkChannels, SliceInput,
                             constant_array)
from .runtime import make_session, output_names, run
from .solvers.channels import (STRUCTURED_METHODS, View, kept_count, magnitude_scores, obs_channels,
                               rank_without_compensation, wanda_scores)

METADATA_KEY = "onnx_lobs.structured"
DEFAULT_DAMP = 0.01
CHECK_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9, np.dtype(np.float16): 2e-2}


@dataclass
class GroupRecord:
    label: str
    producers: list[str]
    consumers: list[str]
    channels: int
    kept: int | None = None
    removed: list[int] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    predicted_error: float | None = None  # sum over consumers of e(M) / energy (calibration)
    measured_error: float | None = None  # the same measured exactly through H (calibration)
    holdout_error: float | None = None
    blocked: str | None = None


@dataclass
class Outcome:
    model: onnx.ModelProto
    groups: list[GroupRecord]
    summary: dict
    fidelity: dict | None
    samples: dict
    timings: dict


@dataclass(eq=False)
class _Active:
    group: Group
    record: GroupRecord
    n_remove: int
    keep: np.ndarray | None = None


def inspect_groups(loaded) -> list[GroupRecord]:
    """The channel groups of a model and why any is kept whole, without calibration."""
    return [_record(g) for g in _groups(loaded)[1]]


def _groups(loaded):
    index = GraphIndex(loaded.model)
    layers, _ = find_layers(loaded, index)
    groups = find_groups(index, Constants(index), layers, static_shapes(loaded.model))
    return layers, groups


def _record(g: Group) -> GroupRecord:
    return GroupRecord(g.label, [p.name for p in g.producers], [c.layer.name for c in g.consumers], g.channels,
                       blocked=g.blocked)


def check_config(config) -> None:
    if config.method not in STRUCTURED_METHODS:
        raise LobsError(f"--structured works with --method {', '.join(STRUCTURED_METHODS)}, not {config.method}")
    for flag, set_ in (("--pattern", config.pattern is not None), ("--max-error", config.max_error is not None),
                       ("--global", config.global_sparsity is not None), ("--sequential", config.sequential),
                       ("--layer-sparsity", bool(config.layer_sparsity))):
        if set_:
            raise LobsError(f"{flag} cannot be combined with --structured yet")
    if config.round_to < 1:
        raise LobsError(f"--round-to must be at least 1, got {config.round_to}")


def prune_structured(loaded, calibration, config) -> Outcome:
    timings: dict = {}
    t = time.perf_counter()
    layers, groups = _groups(loaded)
    active = _plan(groups, config)
    timings["load"] = time.perf_counter() - t
    if not active:
        raise LobsError(f"{loaded.path or 'model'}: no channel group can be pruned "
                        f"({_why_none(groups)}); `onnx-lobs inspect --structured` lists them")
    consumers = {id(c.layer): c.layer for a in active for c in a.group.consumers}
    collectors = {k: Collector(layer, False) for k, layer in consumers.items()}
    source = open_source(calibration, loaded.model, seed=config.seed, samples=config.samples)
    t = time.perf_counter()
    session = Session(loaded.model, list(collectors.values()), loaded.path)
    timings["prepare"] = time.perf_counter() - t
    result = collect(session, None, list(collectors.values()), source,
                     Reading(config.batch_size, config.samples, config.progress), timings, keep_held=True,
                     label="calibrating (structured)")
    if result.samples["calibration"] == 0:
        raise LobsError(f"{source.origin}: no calibration samples")
    t = time.perf_counter()
    weights: dict[int, tuple] = {}  # id(layer) -> (compensated weight, bias) in dense shape
    for a in active:
        _solve_group(a, collectors, config, weights)
    timings["solve"] = time.perf_counter() - t
    t = time.perf_counter()
    reference = _rewrite(loaded.model, _dense_edits(layers, weights))
    shrunk = _rewrite(loaded.model, _shrink_edits(layers, active, weights))
    _check(shrunk, reference, result.held_feeds, active, loaded, layers, weights)
    fidelity = _fidelity(shrunk, result.held_feeds, result.held_dense) if result.held_feeds else None
    _stamp(shrunk, active)
    timings["verify"] = time.perf_counter() - t
    timings["total"] = sum(timings.values())
    records = [a.record for a in active] + [_record(g) for g in groups if g.blocked or not _is_active(g, active)]
    return Outcome(shrunk, records, _summary(loaded.model, shrunk), fidelity, result.samples, timings)


def _is_active(g: Group, active) -> bool:
    return any(a.group is g for a in active)


def _why_none(groups: list[Group]) -> str:
    if not groups:
        return "it has no Conv, Gemm or MatMul layer with constant weights"
    reasons = sorted({g.blocked for g in groups if g.blocked})
    return "; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else "") if reasons else "nothing to remove"


def _plan(groups: list[Group], config) -> list[_Active]:
    active = []
    for g in groups:
        rec = _record(g)
        if g.blocked:
            continue
        # --exclude names the layers whose output channels stay: the groups they produce
        excluded = next((p for p in config.exclude for l in g.producers if matches(l, p)), None)
        if excluded:
            g.block(f"excluded by '{excluded}'")
            continue
        keep = kept_count(g.channels, config.sparsity, config.round_to)
        if keep >= g.channels:
            g.block("nothing to remove at this sparsity")
            continue
        rec.kept = keep
        active.append(_Active(g, rec, g.channels - keep))
    return active


# ----------------------------------------------------------------------------- choosing channels

def _columns(layer: Layer, block: int, channels: int) -> np.ndarray:
    """[channels, m]: the consumer's matrix columns that each group channel occupies."""
    node = layer.uses[0].node
    out = []
    for c in range(channels):
        units = c * block + np.arange(block)
        out.append(np.flatnonzero(layer.adapter.input_columns(node, layer.shape, units)[0]))
    return np.stack(out)


def _view(c: Collector, block: int, channels: int, damp: float) -> View:
    layer = c.layer
    node = layer.uses[0].node
    m = layer.adapter.to_matrices(node, layer.read().astype(np.float64))[0]
    bias = layer.read_bias()
    w = m if bias is None else np.c_[m, layer.adapter.bias_vector(node, bias, m.shape[0])[0]]
    h = c.calib.hessian()[0]
    inv = damped_inverse(h, damp)
    hinv = inv.hinv
    if inv.dead.any():  # an input that never moved costs nothing to remove, and moves nothing else
        hinv[inv.dead, inv.dead] = 1e6 * float(np.mean(np.diagonal(hinv)))
    return View(w, hinv, h, _columns(layer, block, channels))


def _solve_group(a: _Active, collectors: dict, config, weights: dict) -> None:
    g = a.group
    damp = config.damp if config.damp is not None else DEFAULT_DAMP
    cs = [collectors[id(c.layer)] for c in g.consumers]
    views = [_view(c, con.block, g.channels, damp) for c, con in zip(cs, g.consumers)]
    olds = [v.w.copy() for v in views]
    if config.method == "lobs":
        chosen = obs_channels(views, a.n_remove)
    elif config.method == "wanda":
        chosen = rank_without_compensation(wanda_scores(views), views, a.n_remove)
    else:
        rows = [p.adapter.drop_outputs(p.uses[0].node, p.read(), np.arange(g.channels)) for p in g.producers]
        chosen = rank_without_compensation(magnitude_scores(rows), views, a.n_remove)
    a.keep = np.setdiff1d(np.arange(g.channels), chosen.removed)
    a.record.removed = sorted(chosen.removed)
    a.record.predicted_error = float(sum(chosen.costs))
    calib, hold = 0.0, 0.0
    for c, old, new in zip(cs, olds, chosen.weights):
        calib += layer_error(old, new, c.calib.hessian()[0]) / (output_energy(old, c.calib.hessian()[0]) or 1.0)
        if c.hold.n:
            hh = c.hold.hessian()[0]
            hold += layer_error(old, new, hh) / (output_energy(old, hh) or 1.0)
        weights[id(c.layer)] = _to_layer(c.layer, new)
    a.record.measured_error = calib
    a.record.holdout_error = hold if all(c.hold.n for c in cs) else None


def _to_layer(layer: Layer, w: np.ndarray) -> tuple:
    node = layer.uses[0].node
    cols = layer.geometry.cols
    weight = layer.adapter.from_matrices(node, w[None, :, :cols], layer.read())
    bias = None if layer.bias is None else layer.adapter.bias_from_vector(node, w[None, :, cols], layer.read_bias())
    return weight, bias


# ----------------------------------------------------------------------------- rewriting

def _units(keep: np.ndarray, block: int) -> np.ndarray:
    return (keep[:, None] * block + np.arange(block)[None]).reshape(-1)


def _position(layer: Layer) -> int:
    return layer.uses[0].site.path[-1]


def _dense_edits(layers: list[Layer], weights: dict) -> list:
    out = []
    for layer in layers:
        if id(layer) in weights:
            w, b = weights[id(layer)]
            out.append(SetInput(_position(layer), layer.adapter.weight_input, w))
            if b is not None:
                out.append(SetInput(_position(layer), layer.adapter.bias_input, b))
    return out


def _shrink_edits(layers: list[Layer], active: list[_Active], weights: dict) -> list:
    """Every edit that removes the chosen channels: one final array per layer input."""
    by_node = {u.site.path[-1]: l for l in layers for u in l.uses if not u.site.scope}
    final: dict[tuple, np.ndarray] = {}  # (position, input) -> array

    def current(layer: Layer, k: int) -> np.ndarray:
        key = (_position(layer), k)
        if key not in final:
            w, b = weights.get(id(layer), (layer.read(), layer.read_bias()))
            if k == layer.adapter.weight_input:
                final[key] = w
            else:
                final[key] = b if b is not None else _const(layer, k)
        return final[key]

    edits: list = []
    for a in active:
        g, keep = a.group, a.keep
        for c in g.consumers:
            node, k = c.layer.uses[0].node, c.layer.adapter.weight_input
            final[(_position(c.layer), k)] = c.layer.adapter.drop_inputs(node, current(c.layer, k),
                                                                         _units(keep, c.block))
            if c.layer.bias is not None:  # compensated, even when no group of this layer's own goes
                current(c.layer, c.layer.adapter.bias_input)
        for p in g.producers:
            _drop_outputs(p, keep, current, final)
        for e in g.edits:
            if e.kind == "depthwise":
                layer = by_node[e.node[-1]]
                mult = layer.shape[0] // layer.geometry.groups
                rows = _units(keep, e.block * mult)  # whole groups go: slice, the group count changes
                for k in (layer.adapter.weight_input, layer.adapter.bias_input):
                    if len(layer.uses[0].node.input) > k and layer.uses[0].node.input[k]:
                        final[(e.node[-1], k)] = np.take(current(layer, k), rows, axis=0)
                edits.append(SetAttr(e.node[-1], "group", len(keep) * e.block))
            elif e.kind == "slice":
                edits.append(SliceInput(e.node[-1], e.input, e.axis, _units(keep, e.block)))
            else:
                edits.append(SetEntry(e.node[-1], e.input, e.axis, len(keep) * e.block))
        edits += [ForgetShape(name) for name in g.ports]
    return [SetInput(pos, k, arr) for (pos, k), arr in final.items()] + edits


def _drop_outputs(layer: Layer, keep: np.ndarray, current, final: dict) -> None:
    """The layer's output channels keep (its rows, and its bias when it has one as an input)."""
    node, adapter = layer.uses[0].node, layer.adapter
    pos = _position(layer)
    final[(pos, adapter.weight_input)] = adapter.drop_outputs(node, current(layer, adapter.weight_input), keep)
    b = adapter.bias_input
    if b is not None and len(node.input) > b and node.input[b]:
        final[(pos, b)] = adapter.drop_bias(node, current(layer, b), keep)


def _const(layer: Layer, k: int) -> np.ndarray:
    a = constant_array(layer.uses[0].site.node.inputs[k])
    if a is None:
        raise LobsError(f"layer {layer.name}: input {k} is computed at run time; its channels cannot be removed")
    return a


def _rewrite(model: onnx.ModelProto, edits: list) -> onnx.ModelProto:
    m = read_ir(model)
    rewrite.apply(ShrinkChannels(), m, edits)
    return rewrite.to_proto(m, model)


# ----------------------------------------------------------------------------- checking

def _check(shrunk, reference, feeds, active, loaded, layers, weights) -> None:
    """The shrunk model is valid ONNX and computes what the dense-shaped equivalent computes."""
    where = loaded.path or "model"
    try:
        if shrunk.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(shrunk, full_check=True)
            onnx.shape_inference.infer_shapes(shrunk, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise LobsError(f"{where}: the structurally pruned model fails the ONNX checks "
                        f"({one_line(e, 200)}); nothing was written") from None
    if not feeds:
        return
    bad = _disagreement(shrunk, reference, feeds)
    if bad is None:
        return
    culprit = next((a.group.label for a in active
                    if _disagreement(_rewrite(loaded.model, _shrink_edits(layers, [a], weights)),
                                     _rewrite(loaded.model, _dense_edits(_consumers_of(a), weights)), feeds)),
                   "several groups together")
    raise LobsError(f"{where}: removing the channels of group '{culprit}' changes the outputs ({bad}); "
                    "this is a bug in onnx-lobs, nothing was written")


def _consumers_of(a: _Active) -> list[Layer]:
    return [c.layer for c in a.group.consumers]


def _disagreement(model, reference, feeds) -> str | None:
    s, r = make_session(model), make_session(reference)
    names = output_names(reference)
    for feed in feeds:
        for name, x, y in zip(names, run(s, names, feed, "shrunk model"), run(r, names, feed, "reference")):
            if x.shape != y.shape:
                return f"output '{name}' has shape {list(x.shape)}, expected {list(y.shape)}"
            if x.dtype.kind != "f":
                if not np.array_equal(x, y):
                    return f"output '{name}' differs"
                continue
            scale = float(np.max(np.abs(y.astype(np.float64)))) if y.size else 0.0
            err = float(np.max(np.abs(x.astype(np.float64) - y))) if y.size else 0.0
            if err > CHECK_RTOL.get(y.dtype, 1e-4) * max(scale, 1e-6) or not np.isfinite(err) and np.isfinite(scale):
                return f"output '{name}' differs by {err:.3g} at scale {scale:.3g}"
    return None


def _fidelity(model, feeds, dense_outs) -> dict:
    sess, names = make_session(model), output_names(model)
    fid = Fidelity()
    for feed, dense in zip(feeds, dense_outs):
        fid.add(dense, run(sess, names, feed, "structurally pruned model"))
    return fid.result()


def _stamp(model: onnx.ModelProto, active: list[_Active]) -> None:
    value = json.dumps({a.group.label: {"channels": a.group.channels, "kept": int(len(a.keep)),
                                        "removed": [int(c) for c in a.record.removed]} for a in active})
    model.metadata_props.add(key=METADATA_KEY, value=value)


def parameters(model: onnx.ModelProto) -> int:
    """Elements of every float constant: initializers and Constant nodes, bodies included."""
    total = 0
    for g in iter_graphs(model.graph):
        tensors = list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute
                                         if a.name == "value"]
        total += sum(int(np.prod(t.dims)) for t in tensors if t.data_type in (1, 10, 11, 16))
    return total


def _summary(before: onnx.ModelProto, after: onnx.ModelProto) -> dict:
    return {"params_before": parameters(before), "params_after": parameters(after),
            "bytes_before": before.ByteSize(), "bytes_after": after.ByteSize()}

