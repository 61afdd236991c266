"""Structured pruning: whole channels removed from coupled groups, the graph really shrinks.

One calibration pass collects the Hessian of every consumer's input; each group then chooses
its channels (solvers/channels.py) and its consumers get their compensated weights; the graph
is rewritten (rewrite/shrink.py). Before anything is returned, the shrunk model is checked
(onnx checker, strict shape inference) and run beside its dense-shaped equivalent, the original
model with only the consumers' compensated weights written (the removed channels' columns are
zero there): the two must agree to float rounding on the held-out samples, or nothing is written.
With --sequential the groups are solved stage by stage, each stage calibrated on the model as
pruned so far against the dense model's outputs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import rewrite
from .activations import Collector, Reading, Session, collect
from .calibration import open_source
from .errors import LobsError
from .graph import Constants, Layer, find_layers, matches
from .cuts import dense_edits, removed_units, shrink_edits
from .flops import Flops, count, params_per_node
from .groups import Group, find_groups, static_shapes
from .hessian import damped_inverse, damped_solve, layer_error, output_energy
from .index import GraphIndex, read_ir
from .rewrite.shrink import SetInput, ShrinkChannels, constant_array
from .solve import Objective
from .sensitivity import output_probe
from .structured_allocation import Allocation, Trial, choose_counts, touched_nodes, unit_multiple
from .structured_checks import check_shrunk, fidelity, latency_feed, summary
from .topology import layer_stages
from .solvers.channels import (STRUCTURED_METHODS, Reader, View, kept_count, magnitude_scores, obs_channels,
                               rank_without_compensation, replay, wanda_scores)

METADATA_KEY = "onnx_lobs.structured"
DEFAULT_DAMP = 0.01


@dataclass
class GroupRecord:
    label: str
    producers: list[str]
    consumers: list[str]
    channels: int
    width: int = 1  # producer output units per channel (a head's size; 1 for plain channels)
    kept: int | None = None
    removed: list[int] = field(default_factory=list)
    flops_before: int = 0  # of the layers the group touches (producers, consumers, depthwise), batch 1
    flops_after: int | None = None
    params_before: int = 0  # the same layers' constant inputs
    params_after: int | None = None
    predicted_error: float | None = None  # sum over consumers of e(M) / energy (calibration)
    measured_error: float | None = None  # the same measured exactly through H (calibration)
    holdout_error: float | None = None
    output_error: float | None = None  # --flops/--global by output: this group alone, squared rel L2 of the outputs
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
    trial: object = None  # the allocation's trial run (solvers.channels.Chosen), from the same views


def inspect_groups(loaded) -> list[GroupRecord]:
    """The channel groups of a model and why any is kept whole, without calibration."""
    _, _, groups = _groups(loaded)
    dense = count(loaded.model)
    records = [_record(g) for g in groups]
    for r, g in zip(records, groups):
        r.flops_before = sum(dense.per_node.get(n, 0) for n in touched_nodes(g))
    return records


def _groups(loaded):
    index = GraphIndex(loaded.model)
    layers, _ = find_layers(loaded, index)
    groups = find_groups(index, Constants(index), layers, static_shapes(loaded.model))
    return index, layers, groups


def _record(g: Group) -> GroupRecord:
    return GroupRecord(g.label, [p.layer.name for p in g.producers], [c.layer.name for c in g.consumers],
                       g.channels, g.width, blocked=g.blocked)


def check_config(config) -> None:
    if config.method not in STRUCTURED_METHODS:
        raise LobsError(f"--structured works with --method {', '.join(STRUCTURED_METHODS)}, not {config.method}")
    for flag, set_ in (("--pattern", config.pattern is not None), ("--max-error", config.max_error is not None),
                       ("--layer-sparsity", bool(config.layer_sparsity))):
        if set_:
            raise LobsError(f"{flag} cannot be combined with --structured yet")
    if config.round_to < 1:
        raise LobsError(f"--round-to must be at least 1, got {config.round_to}")
    if config.flops is not None and not 0 < config.flops <= 1:
        raise LobsError(f"--flops must be in (0, 1] (with --structured), got {config.flops}")
    if config.allocation is not None and config.flops is None and config.global_sparsity is None:
        raise LobsError("--allocation decides between groups: give it with --flops or --global")
    if config.flops is not None and config.global_sparsity is not None:
        raise LobsError("--flops and --global cannot be combined (with --structured, give one)")


def prune_structured(loaded, calibration, config) -> Outcome:
    timings: dict = {}
    t = time.perf_counter()
    index, layers, groups = _groups(loaded)
    dense_flops = count(loaded.model)
    active = _plan(groups, config)
    timings["load"] = time.perf_counter() - t
    if not active:
        raise LobsError(f"{loaded.path or 'model'}: no channel group can be pruned "
                        f"({_why_none(groups)}); `onnx-lobs inspect --structured` lists them")
    source = open_source(calibration, loaded.model, seed=config.seed, samples=config.samples)
    damp = config.damp if config.damp is not None else DEFAULT_DAMP
    allocated = config.global_sparsity is not None or config.flops is not None
    result, collectors, views = None, {}, {}
    biases = _add_biases(index, _consumers(active))
    if allocated or not config.sequential:
        result, collectors, views = _calibrated(loaded, loaded.model, _consumers(active), None, source, config,
                                                timings, damp, "calibrating (structured)", biases)
    t = time.perf_counter()
    allocation = None
    if allocated:
        probe = _output_probe(loaded, layers, views, biases, result, config)
        active, allocation = _allocate(active, views, config, dense_flops, layers, probe)
        timings["allocate"] = time.perf_counter() - t
        t = time.perf_counter()
    _forget_shared_trials(active, config.sequential)
    if config.sequential:
        done = _sequential(loaded, layers, active, source, config, timings, damp, result, biases)
        result, collectors, views = done.passed, done.collectors, done.views
    else:
        for a in active:
            _solve_group(a, collectors, views, config.method)
    weights = {k: _to_layer(collectors[k].layer, v.w) for k, v in views.items()}  # dense-shaped
    timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    extra = _bias_edits(biases, views)
    reference = _rewrite(loaded.model, extra + dense_edits(layers, weights))
    shrunk = _cut(loaded, index, layers, active, weights, extra)
    outs = check_shrunk(shrunk, reference, result.held_feeds,
                        [(a.group.label, lambda a=a: _cut(loaded, index, layers, [a], weights, extra))
                         for a in active], loaded.path)
    fid = fidelity(outs, result.held_dense) if outs else None
    _stamp(shrunk, active)
    timings["verify"] = time.perf_counter() - t
    records = [a.record for a in active] + [_record(g) for g in groups if g.blocked or not _is_active(g, active)]
    _costs(records, groups, loaded.model, shrunk, dense_flops)
    feed = latency_feed(result.held_feeds, config.batch_size, loaded.model)
    totals = summary(loaded.model, shrunk, dense_flops, feed, config)
    if allocation is not None:
        totals["allocation"] = allocation.summary()
    timings["total"] = sum(timings.values())
    return Outcome(shrunk, records, totals, fid, result.samples, timings)


def _output_probe(loaded, layers, views: dict, biases: dict, passed, config):
    """probe(a, n): the held-out output error of the model with only group a's first n removals
    of its trial (dense-shaped: the consumers' compensated weights written); None when the
    allocation is by layer-wise cost or there is nothing held out to measure on."""
    if config.allocation == "layer":
        return None
    outputs = output_probe(passed.held_feeds, passed.held_dense, loaded.path)
    if outputs is None:
        if config.allocation == "output":
            raise LobsError(f"{loaded.path or 'model'}: --allocation output needs held-out samples "
                            "(give at least 2 calibration samples)")
        return None

    def probe(a: _Active, n: int) -> float:
        trial = {id(c.layer): views[id(c.layer)].copy() for c in a.group.consumers}
        _choose(a, trial, config.method, n)
        weights = {k: _to_layer(v_layer, trial[k].w) for k, v_layer in _consumers([a]).items()}
        return outputs.error(_rewrite(loaded.model, _bias_edits(biases, trial) + dense_edits(layers, weights)))
    return probe


def _consumers(active: list[_Active]) -> dict[int, Layer]:
    return {id(c.layer): c.layer for a in active for c in a.group.consumers}


@dataclass(frozen=True)
class _AddBias:
    """A MatMul's bias as exporters write it: the Add of a constant vector over its outputs."""

    node: int  # the Add's main-graph position
    input: int
    shape: tuple
    dtype: np.dtype
    vector: np.ndarray


def _add_biases(index: GraphIndex, layers: dict) -> dict[int, _AddBias]:
    """The consumers whose output's one reader adds a constant per output feature: that vector
    joins the solve as their bias, so what removed channels carried on average moves into it."""
    out = {}
    for k, layer in layers.items():
        site = layer.uses[0].site
        if layer.op != "MatMul" or len(layer.uses) != 1 or site.scope or len(layer.shape) != 2:
            continue
        y = site.node.outputs[0]
        uses = list(y.uses())
        if len(uses) != 1 or y.is_graph_output() or uses[0].node.op_type != "Add" or len(uses[0].node.inputs) != 2:
            continue
        add, other = uses[0].node, 1 - uses[0].idx
        arr = constant_array(add.inputs[other])
        if arr is None or arr.dtype.kind != "f" or arr.size != layer.shape[1] or arr.shape[-1] != layer.shape[1]:
            continue
        out[k] = _AddBias(index.site(add).path[-1], other, arr.shape, arr.dtype, arr.reshape(-1).astype(np.float64))
    return out


def _bias_edits(biases: dict, views: dict) -> list:
    return [SetInput(b.node, b.input, views[k].w[:, -1].reshape(b.shape).astype(b.dtype))
            for k, b in biases.items() if k in views]


def _calibrated(loaded, pruned, layers: dict, held, source, config, timings, damp, label, biases):
    """One pass over the calibration data for the given consumers: (pass result, collectors,
    views). pruned: the model as pruned so far (sequential mode: joint with the dense model)."""
    joint = pruned is not loaded.model
    collectors = {k: Collector(layer, joint, bias=True if k in biases else None) for k, layer in layers.items()}
    t = time.perf_counter()
    dense = Session(loaded.model, list(collectors.values()), loaded.path)
    after = Session(pruned, list(collectors.values()), loaded.path) if joint else None
    timings["prepare"] = timings.get("prepare", 0.0) + time.perf_counter() - t
    result = collect(dense, after, list(collectors.values()), source,
                     Reading(config.batch_size, config.samples, config.progress), timings, keep_held=held is None,
                     label=label)
    if result.samples["calibration"] == 0:
        raise LobsError(f"{source.origin}: no calibration samples")
    t = time.perf_counter()
    views = {k: _view(c, damp, biases.get(k)) for k, c in collectors.items()}  # one damped inverse each
    timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    return result, collectors, views


@dataclass
class _Sequential:
    passed: object
    collectors: dict
    views: dict


def _sequential(loaded, layers, active, source, config, timings, damp, held, biases) -> _Sequential:
    """Groups in the order of their first consumer, stage by stage: each stage's consumers are
    calibrated on the model as pruned so far (its dense-shaped equivalent) against the dense
    model's inputs, so every consumer's target stays the dense output. A consumer shared with
    an earlier stage keeps its view."""
    collectors, views = {}, {}
    working = loaded.model
    stages = _stages(loaded.model, active)
    for k, stage in enumerate(stages):
        new = {i: layer for i, layer in _consumers(stage).items() if i not in views}
        if new:
            passed, cs, vs = _calibrated(loaded, working if k else _copy(loaded.model), new, held, source, config,
                                         timings, damp, f"stage {k + 1}/{len(stages)} (structured)", biases)
            held = held or passed
            collectors.update(cs)
            views.update(vs)
        t = time.perf_counter()
        for a in stage:
            _solve_group(a, collectors, views, config.method)
        if k + 1 < len(stages):  # the next stage calibrates on the model as pruned so far
            weights = {i: _to_layer(collectors[i].layer, v.w) for i, v in views.items()}
            working = _rewrite(loaded.model, _bias_edits(biases, views) + dense_edits(layers, weights))
        timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    return _Sequential(held, collectors, views)


def _stages(model: onnx.ModelProto, active: list[_Active]) -> list[list[_Active]]:
    """Active groups by the stage (topology.layer_stages) of their earliest consumer."""
    consumers = list(_consumers(active).values())
    stage_of = {id(layer): k for k, stage in enumerate(layer_stages(model, consumers)) for layer in stage}
    by: dict[int, list] = {}
    for a in active:
        by.setdefault(min(stage_of[id(c.layer)] for c in a.group.consumers), []).append(a)
    return [by[k] for k in sorted(by)]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _forget_shared_trials(active: list[_Active], sequential: bool) -> None:
    """A trial is replayed only by a group whose consumers no other active group reads, and only
    in the independent mode (sequential views are new)."""
    readers = Counter(id(c.layer) for a in active for c in a.group.consumers)
    for a in active:
        if sequential or any(readers[id(c.layer)] > 1 for c in a.group.consumers):
            a.trial = None


def _is_active(g: Group, active) -> bool:
    return any(a.group is g for a in active)


def _why_none(groups: list[Group]) -> str:
    if not groups:
        return "it has no Conv, Gemm or MatMul layer with constant weights"
    reasons = sorted({g.blocked for g in groups if g.blocked})
    return "; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else "") if reasons else "nothing to remove"


def _plan(groups: list[Group], config) -> list[_Active]:
    """The groups that lose channels, each with its count (the most it may lose when an
    allocation over the model decides later)."""
    allocated = config.global_sparsity is not None or config.flops is not None
    active = []
    for g in groups:
        if g.blocked:
            continue
        # --exclude names the layers whose output channels stay: the groups they produce
        excluded = next((p for p in config.exclude for pr in g.producers if matches(pr.layer, p)), None)
        if excluded:
            g.block(f"excluded by '{excluded}'")
            continue
        multiple = unit_multiple(g, config.round_to)
        keep = multiple if allocated else kept_count(g.channels, config.sparsity, multiple)
        if keep >= g.channels:
            g.block("nothing to remove at this sparsity" if not allocated else "too few channels to remove any")
            continue
        rec = _record(g)
        rec.kept = keep
        active.append(_Active(g, rec, g.channels - keep))
    return active


def _allocate(active: list[_Active], views: dict, config, dense: Flops, layers,
              probe) -> tuple[list[_Active], Allocation]:
    """Counts per group (structured_allocation): each group's greedy run to the most it may lose
    on copies of the views, then one model-wide choice of counts; probe(a, n) measures a group's effect on
    the outputs when the allocation is by output."""
    trials = []
    for a in active:
        trial = {id(c.layer): views[id(c.layer)].copy() for c in a.group.consumers}
        a.trial = _choose(a, trial, config.method, a.n_remove)
        trials.append(Trial(a.group, a.trial.removed, a.trial.costs))
    measure = None if probe is None else (lambda g, n: probe(active[g], n))
    allocation = choose_counts(trials, config, dense, layers, measure)
    out = []
    for k, (a, n) in enumerate(zip(active, allocation.counts)):
        if n:
            a.n_remove, a.record.kept = n, a.group.channels - n
            a.record.output_error = allocation.output_errors[k] if allocation.output_errors else None
            out.append(a)
    return out, allocation


# ----------------------------------------------------------------------------- choosing channels

def _reader(layer: Layer, view: View, port, channels: int) -> Reader:
    """The consumer's matrix columns of each group channel it reads (port: where they sit on its input)."""
    node = layer.uses[0].node
    present = np.array([port.lo <= c < port.hi for c in range(channels)])
    cols = []
    for c in range(channels):
        units = port.units([c]) if present[c] else port.units([port.lo])
        cols.append(np.flatnonzero(layer.adapter.input_columns(node, layer.shape, units)[0]))
    return Reader(view, np.stack(cols), present)


def _view(c: Collector, damp: float, add: _AddBias | None = None) -> View:
    layer = c.layer
    node = layer.uses[0].node
    m = layer.adapter.to_matrices(node, layer.read().astype(np.float64))[0]
    bias = layer.read_bias()
    if add is not None:
        w = np.c_[m, add.vector]
    else:
        w = m if bias is None else np.c_[m, layer.adapter.bias_vector(node, bias, m.shape[0])[0]]
    hp, cross, hd = (x[0] for x in c.hessians(c.calib))
    inv = damped_inverse(hp, damp)
    hinv = inv.hinv
    if inv.dead.any():  # an input that never moved costs nothing to remove, and moves nothing else
        hinv[inv.dead, inv.dead] = 1e6 * float(np.mean(np.diagonal(hinv)))
    if not c.joint:
        return View(w, hinv, hp)
    # sequential: start from the optimum on the pruned inputs, W0 = W C H_p^-1 (solve.py), with
    # the dampening the removals use (then they stay exact for that objective), and remove around
    # it; errors and energies stay the dense target's
    objective = Objective(w, hp, cross, hd, True)
    w0 = damped_solve(hp, inv.damp, (w @ cross).T).T
    view = View(w0 if objective.error(w0) < objective.error(w) else w.copy(), hinv, hp)
    view.w0, view.energy = w, 0.5 * float(np.sum((w @ hd) * w)) or 1.0
    return view


def _hessians(c: Collector, v: View) -> tuple:
    """(calibration, held-out or None) Hessian triples (H_p, C, H_d) of one consumer, read from
    its accumulators once per group solve (independent mode: the view's own H for calibration)."""
    calib = (v.h, v.h, v.h) if not c.joint else tuple(x[0] for x in c.hessians(c.calib))
    return calib, (tuple(x[0] for x in c.hessians(c.hold)) if c.hold.n else None)


def _errors(views: list[View], olds: list[np.ndarray], hessians: list, joint: list[bool]) -> tuple:
    """Sum over the views of their relative layer-wise error now, on calibration and held-out data."""
    calib, hold = 0.0, 0.0
    for v, old, (hc, hh), j in zip(views, olds, hessians, joint):
        calib += _error(hc, j, old, v.w)
        if hh is not None:
            hold += _error(hh, j, old, v.w)
    return calib, hold if all(hh is not None for _, hh in hessians) else None


def _error(triple: tuple, joint: bool, old: np.ndarray, w: np.ndarray) -> float:
    """The relative layer-wise error of w against the dense output (sequential: from the
    pruned model's inputs)."""
    hp, cross, hd = triple
    energy = output_energy(old, hd) or 1.0
    if not joint:
        return layer_error(old, w, hp) / energy
    return Objective(old, hp, cross, hd, True).error(w) / energy


def _choose(a: _Active, views: dict, method: str, n_remove: int):
    g = a.group
    readers = [_reader(c.layer, views[id(c.layer)], c.port, g.channels) for c in g.consumers]
    if method == "lobs" and a.trial is not None:
        # the allocation ran this group's greedy on copies of the same views: when no other group
        # changed them since (its consumers are its own), its first n_remove steps are the answer
        return replay(readers, a.trial, n_remove)
    if method == "lobs":
        return obs_channels(readers, g.channels, n_remove)
    if method == "wanda":
        return rank_without_compensation(wanda_scores(readers, g.channels), readers, n_remove)
    return rank_without_compensation(magnitude_scores([_rows(p, g.channels) for p in g.producers]),
                                     readers, n_remove)


def _solve_group(a: _Active, collectors: dict, views: dict, method: str) -> None:
    g = a.group
    cs = [collectors[id(c.layer)] for c in g.consumers]
    vs = [views[id(c.layer)] for c in g.consumers]
    olds = [v.w0 for v in vs]
    hessians, joint = [_hessians(c, v) for c, v in zip(cs, vs)], [c.joint for c in cs]
    before = _errors(vs, olds, hessians, joint)
    chosen = _choose(a, views, method, a.n_remove)
    after = _errors(vs, olds, hessians, joint)
    a.keep = np.setdiff1d(np.arange(g.channels), chosen.removed)
    a.record.removed = sorted(chosen.removed)
    a.record.predicted_error = float(sum(chosen.costs))
    a.record.measured_error = after[0] - before[0]
    a.record.holdout_error = None if after[1] is None else after[1] - before[1]


def _rows(p, channels: int) -> np.ndarray:
    """[channels, cols]: a producer's matrix rows of each group channel (zero where it makes none)."""
    m = p.layer.adapter.to_matrices(p.layer.uses[0].node, p.layer.read().astype(np.float64))[0]
    out = np.zeros((channels, p.port.block * m.shape[1]))
    for c in range(p.port.lo, p.port.hi):
        out[c] = m[p.port.units([c])].ravel()
    return out


def _to_layer(layer: Layer, w: np.ndarray) -> tuple:
    node = layer.uses[0].node
    cols = layer.geometry.cols
    weight = layer.adapter.from_matrices(node, w[None, :, :cols], layer.read())
    bias = None if layer.bias is None else layer.adapter.bias_from_vector(node, w[None, :, cols], layer.read_bias())
    return weight, bias


def _cut(loaded, index, layers, active: list[_Active], weights: dict, extra: list) -> onnx.ModelProto:
    """The shrunk model: extra (the Add biases) first, then every edit that removes the units."""
    removed = removed_units([(a.group, list(a.record.removed)) for a in active])
    return _rewrite(loaded.model, extra + shrink_edits(index, layers, [a.group for a in active], removed, weights))


def _rewrite(model: onnx.ModelProto, edits: list) -> onnx.ModelProto:
    m = read_ir(model)
    rewrite.apply(ShrinkChannels(), m, edits)
    return rewrite.to_proto(m, model)


def _stamp(model: onnx.ModelProto, active: list[_Active]) -> None:
    value = json.dumps({a.group.label: {"channels": a.group.channels, "kept": int(len(a.keep)),
                                        "removed": [int(c) for c in a.record.removed]} for a in active})
    model.metadata_props.add(key=METADATA_KEY, value=value)


def _costs(records, groups, before, after, dense: Flops) -> None:
    """FLOPs and parameters of the layers each group touches, before and after (the nodes keep
    their positions: the rewrite changes tensors, never the node list)."""
    shrunk = count(after)
    p_before, p_after = params_per_node(before), params_per_node(after)
    by_label = {g.label: g for g in groups}
    for r in records:
        nodes = touched_nodes(by_label[r.label])
        r.flops_before = sum(dense.per_node.get(n, 0) for n in nodes)
        r.params_before = sum(p_before.get(n, 0) for n in nodes)
        if r.kept is not None:
            r.flops_after = sum(shrunk.per_node.get(n, 0) for n in nodes)
            r.params_after = sum(p_after.get(n, 0) for n in nodes)
