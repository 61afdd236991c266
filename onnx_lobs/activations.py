"""One pass of calibration data through onnxruntime, every wanted layer input folded into Hessians.

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
from tqdm import tqdm

from .calibration import make_session, run
from .graph import Layer
from .topology import expose
from .hessian import HessianAccumulator
from .layers import unfold


@dataclass(eq=False)
class Collector:
    """The accumulators of one layer: calibration and held-out samples kept apart."""

    layer: Layer
    joint: bool  # accumulate [x_dense, x_pruned] (sequential mode)
    calib: HessianAccumulator = field(init=False)
    hold: HessianAccumulator = field(init=False)

    def __post_init__(self):
        g = self.layer.geometry
        cols = g.cols * (2 if self.joint else 1)
        bias = self.layer.bias is not None
        self.calib = HessianAccumulator(g.groups, cols, bias)
        self.hold = HessianAccumulator(g.groups, cols, bias)

    def hessians(self, acc: HessianAccumulator):
        """(H_p, C, H_d) of one of this collector's accumulators; (H, H, H) in independent mode."""
        if self.joint:
            return acc.blocks(self.layer.geometry.cols)
        h = acc.hessian()
        return h, h, h


def _requests(collectors):
    out = []
    for c in collectors:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(c.layer.weight.compute_dtype)
        out += [(u.x, u.x_scope, np_dtype) for u in c.layer.uses]
    return out


def _key(u):
    return (u.x, tuple((id(n), a) for n, a in u.x_scope))


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


def collect(dense: Session, pruned: Session | None, collectors: list[Collector], source, config,
            timings: dict, keep_held: bool, label: str = "calibrating") -> PassResult:
    """Stream the data once; fold each batch's layer inputs into the collectors' accumulators."""
    samples = {"calibration": 0, "held_out": 0}
    held_feeds, held_dense = [], []
    origin = getattr(source, "origin", "calibration data")
    bar = tqdm(desc=label, unit="sample", disable=None if config.progress else True, file=sys.stderr, leave=False)
    try:
        for feed, held in source.batches(config.batch_size, config.samples):
            t = time.perf_counter()
            outs, dense_values = dense.run(feed, origin, keep_held and held, collectors)
            pruned_values = pruned.run(feed, origin, False, collectors)[1] if pruned is not None else None
            timings["forward"] = timings.get("forward", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            for c in collectors:
                acc = c.hold if held else c.calib
                xs = dense.inputs_of(dense_values, c)
                xps = pruned.inputs_of(pruned_values, c) if pruned is not None else [None] * len(xs)
                for u, xd, xp in zip(c.layer.uses, xs, xps):
                    _fold(acc, c.layer, u.node, xd, xp)
            timings["hessian"] = timings.get("hessian", 0.0) + time.perf_counter() - t
            first = next(iter(feed.values()))
            n = source.count(feed) if hasattr(source, "count") else (first.shape[0] if first.ndim else 1)
            samples["held_out" if held else "calibration"] += n
            if held and keep_held:
                held_feeds.append(feed)
                held_dense.append(outs)
            bar.update(n)
    finally:
        bar.close()
    return PassResult(samples, held_feeds, held_dense)


def _fold(acc, layer, node, xd, xp):
    cols_d = unfold(layer.adapter, node, xd, layer.shape)
    if xp is None:
        for cols in cols_d:
            acc.add(cols)
        return
    for cd, cp in zip(cols_d, unfold(layer.adapter, node, xp, layer.shape)):
        acc.add(np.concatenate([cd, cp], axis=2))
