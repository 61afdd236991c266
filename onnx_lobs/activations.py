"""Calibration passes: layer inputs exposed as extra outputs, one pass of the data through
onnxruntime, every wanted layer input folded into its layer's Hessians.

Independent mode runs the dense model once and accumulates H = mean x x^T per layer. Sequential
mode runs the dense model and the model as pruned so far side by side, and accumulates the joint
Hessian of [x_dense, x_pruned], whose blocks are H_d, C = mean x_d x_p^T and H_p: everything the
error-correcting solve and its exact error need. Activations are dropped after each batch.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import ModelProto
from tqdm import tqdm

from . import rewrite
from .calibration import DataSource
from .graph import Layer
from .hessian import HeldOut, HessianAccumulator
from .index import address, read_ir
from .layers import unfold
from .rewrite.expose import ExposeValue, Request
from .runtime import make_session, run


# ----------------------------------------------------------------------------- exposing activations

def expose(model: ModelProto, tensors: list[tuple[str, tuple, np.dtype]]) -> tuple[ModelProto, dict]:
    """A copy of the model whose outputs also carry each (name, scope, dtype) tensor, and where
    each shows up (rewrite/expose.py), keyed by (name, address of the scope)."""
    m = read_ir(model)
    result = {}
    for name, scope, dtype in tensors:
        key = (name, address(scope))
        if key not in result:
            result[key] = rewrite.apply(ExposeValue(), m, Request(name, key[1], np.dtype(dtype)))
    return rewrite.to_proto(m, model), result


# ----------------------------------------------------------------------------- passes

@dataclass(eq=False)
class Collector:
    """The accumulators of one layer: calibration and held-out samples kept apart."""

    layer: Layer
    joint: bool  # accumulate [x_dense, x_pruned] (sequential mode)
    bias: bool | None = None  # augment with a 1 (default: when the layer's bias is in the solve)
    calib: HessianAccumulator = field(init=False)
    hold: HessianAccumulator = field(init=False)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        """Empty accumulators sized by the layer's geometry as it is now (a rewrite may change it)."""
        g = self.layer.geometry
        cols = g.cols * (2 if self.joint else 1)
        bias = self.layer.bias is not None if self.bias is None else self.bias
        self.calib = HessianAccumulator(g.groups, cols, bias)
        self.hold = HeldOut(g.groups, cols, bias)

    def release(self) -> None:
        """Drop the sums once the layer is solved, keeping their counts (the report's rows per
        sample): under a memory budget only one block's sums are alive (memory.py)."""
        for name, kind in (("calib", HessianAccumulator), ("hold", HeldOut)):
            old = getattr(self, name)
            spent = kind(0, 0, old.bias)
            spent.n = old.n
            setattr(self, name, spent)

    def fold(self, held: bool, node, xd: np.ndarray, xp: np.ndarray | None) -> None:
        """One use's input batch (dense, and pruned in joint mode) into the accumulator."""
        acc = self.hold if held else self.calib
        adapter, shape = self.layer.adapter, self.layer.shape
        cols_d = unfold(adapter, node, xd, shape)
        if xp is None:
            for cols in cols_d:
                acc.add(cols)
            return
        for cd, cp in zip(cols_d, unfold(adapter, node, xp, shape)):
            acc.add(np.concatenate([cd, cp], axis=2))

    def input_key(self) -> tuple:
        """Equal for collectors whose accumulators receive identical columns."""
        layer = self.layer
        return (self.joint, self.calib.bias, layer.weight.compute_dtype,
                tuple((u.x, address(u.x_scope), layer.adapter.columns_key(u.node, layer.shape))
                      for u in layer.uses))

    def hessians(self, acc: HessianAccumulator):
        """(H_p, C, H_d) of one of this collector's accumulators; (H, H, H) in independent mode."""
        if self.joint:
            return acc.blocks(self.layer.geometry.cols)
        h = acc.hessian()
        return h, h, h


def share(collectors: list[Collector]) -> list[Collector]:
    """The collectors that fold, one per distinct input: layers reading one tensor alike (q/k/v,
    gate/up) take the first one's accumulators, so each sum is built once and held once. Only
    empty accumulators are shared, so a pass never drops what an earlier one folded."""
    owners, folding, seen = {}, [], set()
    for c in collectors:
        if c.calib.n == 0 and c.hold.n == 0:
            owner = owners.setdefault(c.input_key(), c)
            if owner is not c:
                c.calib, c.hold = owner.calib, owner.hold
        if id(c.calib) not in seen:  # each accumulator folds once a batch
            seen.add(id(c.calib))
            folding.append(c)
    return folding


def _requests(collectors):
    out = []
    for c in collectors:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(c.layer.weight.compute_dtype)
        out += [(u.x, u.x_scope, np_dtype) for u in c.layer.uses]
    return out


def _key(u):
    return (u.x, address(u.x_scope))


class Session:
    """An onnxruntime session over a model with the given layers' inputs exposed."""

    def __init__(self, model: onnx.ModelProto, collectors: list[Collector], origin: str | None = None):
        aug, self.exposed = expose(model, _requests(collectors))
        self.outputs = [o.name for o in model.graph.output]
        self.inputs = {i.name for i in aug.graph.input}
        self.session = make_session(aug, origin)

    def run(self, feed: dict, origin: str, outputs: bool, collectors) -> tuple[list, dict]:
        """The model's outputs (when asked) and the named values the collectors need."""
        exposed = [self.exposed[_key(u)] for c in collectors for u in c.layer.uses]
        wanted = {e.output for e in exposed} | {e.shape for e in exposed if e.shape}
        extra = sorted(wanted - (set(self.outputs) if outputs else set()) - self.inputs)
        names = (self.outputs if outputs else []) + extra
        outs = run(self.session, names, feed, origin) if names else []
        values = dict(feed)
        values.update(zip(names, outs))
        return (outs[:len(self.outputs)] if outputs else []), values

    def inputs_of(self, values: dict, collector: Collector):
        return [self.exposed[_key(u)].value(values) for u in collector.layer.uses]


@dataclass
class PassResult:
    samples: dict
    held_feeds: list
    held_dense: list


@dataclass(frozen=True)
class Reading:
    """How a pass reads its source: feeds of batch_size, at most `samples`, a bar or not."""

    batch_size: int
    samples: int | None = None
    progress: bool = False

    def bar(self, label: str, total: int | None = None) -> tqdm:
        return tqdm(desc=label, unit="sample", total=total, disable=None if self.progress else True,
                    file=sys.stderr, leave=False)


def add_time(timings: dict, phase: str, since: float) -> None:
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - since


def collect(dense: Session, pruned: Session | None, collectors: list[Collector], source: DataSource,
            reading: Reading, timings: dict, keep_held: bool, label: str = "calibrating") -> PassResult:
    """Stream the data once; fold each batch's layer inputs into the collectors' accumulators."""
    samples = {"calibration": 0, "held_out": 0}
    held_feeds, held_dense = [], []
    folding = share(collectors)
    bar = reading.bar(label)
    try:
        for feed, held in source.batches(reading.batch_size, reading.samples):
            t = time.perf_counter()
            outs, dense_values = dense.run(feed, source.origin, keep_held and held, collectors)
            pruned_values = pruned.run(feed, source.origin, False, collectors)[1] if pruned is not None else None
            add_time(timings, "forward", t)
            t = time.perf_counter()
            for c in folding:
                xs = dense.inputs_of(dense_values, c)
                xps = pruned.inputs_of(pruned_values, c) if pruned is not None else [None] * len(xs)
                for u, xd, xp in zip(c.layer.uses, xs, xps):
                    c.fold(held, u.node, xd, xp)
            add_time(timings, "hessian", t)
            n = source.count(feed)
            samples["held_out" if held else "calibration"] += n
            if held and keep_held:
                held_feeds.append(feed)
                held_dense.append(outs)
            bar.update(n)
    finally:
        bar.close()
    return PassResult(samples, held_feeds, held_dense)
