"""Sequential mode's calibration with each node run once per model, not once per stage.

Stage s needs its layers' inputs as the model pruned through stage s-1 computes them. Running
the whole model from its inputs for every stage costs a forward pass per stage (about fifty on
a ResNet-50). Instead the top-level graph is cut into segments: segment s holds the nodes that
stage s's inputs need and that no earlier segment ran. It runs once with the dense weights and
once with the weights as pruned so far, reading the tensors that earlier segments left (kept
per batch in .npy files in a temporary folder, so memory stays one batch) and leaving the ones
later segments read. In all, two forward passes plus the disk traffic of the cut tensors.

Only the top-level graph is cut: when a stage's layer input is defined inside an If/Loop/Scan
body, plan() returns None and the caller runs whole passes instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from .activations import Collector, _fold
from .calibration import make_session, run
from .graph import Layer


@dataclass
class Segment:
    nodes: list[int]  # indices into graph.node, in graph order
    reads: list[str]  # stored tensors the nodes consume
    keeps: list[str]  # tensors the nodes produce that later segments (or stages) read
    exposed: list[str]  # the stage's layer inputs
    frees: list[str] = field(default_factory=list)  # stored tensors nothing after this reads


def _used_names(node: onnx.NodeProto) -> set[str]:
    """Explicit inputs plus the outer-scope names its subgraphs read."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            names |= _outer_names(g)
    return names


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used = set()
    for node in graph.node:
        used |= _used_names(node) - defined
        defined |= set(node.output)
    return used


def plan(model: onnx.ModelProto, stages: list[list[Layer]]) -> list[Segment] | None:
    """One segment per stage, or None when some layer input lives inside a subgraph."""
    graph = model.graph
    producer = {o: k for k, node in enumerate(graph.node) for o in node.output if o}
    uses = [_used_names(node) for node in graph.node]
    inits = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs = {i.name for i in graph.input}
    done: set[int] = set()
    segments = []
    for stage in stages:
        wanted = []
        for layer in stage:
            for u in layer.uses:
                if u.x_scope or (u.x not in producer and u.x not in inputs):
                    return None
                wanted.append(u.x)
        nodes, todo = set(), [producer[x] for x in wanted if x in producer]
        while todo:
            k = todo.pop()
            if k in done or k in nodes:
                continue
            nodes.add(k)
            todo += [producer[n] for n in uses[k] if n in producer]
        done |= nodes
        order = sorted(nodes)
        made = {o for k in order for o in graph.node[k].output}
        reads = sorted({n for k in order for n in uses[k] if n not in made and (n in producer or n not in inits)}
                       | {x for x in wanted if x not in made})
        segments.append(Segment(order, reads, [], sorted(set(wanted))))
    # What each segment keeps: its products read by later segments or exposed later.
    later: set[str] = set()
    for seg in reversed(segments):
        made = {o for k in seg.nodes for o in graph.node[k].output}
        seg.keeps = sorted(made & (later | set(seg.exposed)))
        later |= set(seg.reads) | set(seg.exposed)
    # When a stored tensor is last read, it can go.
    last: dict[str, int] = {}
    for s, seg in enumerate(segments):
        for n in seg.reads:
            last[n] = s
    for n, s in last.items():
        segments[s].frees.append(n)
    return segments


def _segment_model(model: onnx.ModelProto, seg: Segment, types: dict) -> onnx.ModelProto | None:
    if not seg.nodes:
        return None
    graph = model.graph
    nodes = [graph.node[k] for k in seg.nodes]
    used = set().union(*(_used_names(n) for n in nodes))
    inputs = [n for n in seg.reads if n in types]
    g = helper.make_graph(
        nodes, "segment",
        [helper.make_tensor_value_info(n, types[n][0], [None] * types[n][1]) for n in inputs],
        [onnx.ValueInfoProto(name=n) for n in seg.keeps],
        initializer=[t for t in graph.initializer if t.name in used and t.name not in types],
        sparse_initializer=[t for t in graph.sparse_initializer if t.values.name in used])
    m = helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


SHARED = "s"  # the side of the model inputs, the same for the dense and the pruned model


class Store:
    """Per-batch tensors of the dense ("d") and the pruned ("p") model, on disk between segments."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="onnx-lobs-seq-")
        self.names: dict[str, int] = {}
        self.shared: set[str] = set()
        self.types: dict[str, tuple[int, int]] = {}  # name -> (onnx elem type, rank)

    def _path(self, side: str, name: str, b: int) -> str:
        if side == SHARED:
            self.shared.add(name)
        if name in self.shared:
            side = SHARED
        idx = self.names.setdefault(name, len(self.names))
        return os.path.join(self.folder, f"{side}-{idx}-{b}.npy")

    def put(self, side: str, name: str, b: int, value: np.ndarray) -> None:
        value = np.asarray(value)
        self.types.setdefault(name, (helper.np_dtype_to_tensor_dtype(value.dtype), value.ndim))
        np.save(self._path(side, name, b), value, allow_pickle=False)

    def get(self, side: str, name: str, b: int) -> np.ndarray:
        return np.load(self._path(side, name, b), allow_pickle=False)

    def drop(self, name: str, batches: int) -> None:
        for side in ("d", "p", SHARED):
            for b in range(batches):
                try:
                    os.remove(self._path(side, name, b))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Feeds:
    """The calibration batches as read once from the source."""

    held: list[bool]
    sizes: list[int]
    held_feeds: list[dict]


class SegmentedPass:
    """Runs stage after stage; call stage(k, ...) for k = 0, 1, ... in order."""

    def __init__(self, segments: list[Segment], source, config, timings: dict, model_path: str | None = None):
        self.segments, self.config, self.timings, self.model_path = segments, config, timings, model_path
        self.store = Store()
        self.origin = getattr(source, "origin", "calibration data")
        needed = set().union(*(s.reads for s in segments)) if segments else set()
        held, sizes, held_feeds = [], [], []
        for b, (feed, is_held) in enumerate(source.batches(config.batch_size, config.samples)):
            for name, value in feed.items():
                if name in needed:
                    self.store.put(SHARED, name, b, value)
            v = next(iter(feed.values()))
            held.append(is_held)
            sizes.append(source.count(feed) if hasattr(source, "count") else (v.shape[0] if v.ndim else 1))
            if is_held:
                held_feeds.append(feed)
        self.feeds = Feeds(held, sizes, held_feeds)

    def samples(self) -> dict:
        f = self.feeds
        return {"calibration": sum(n for n, h in zip(f.sizes, f.held) if not h),
                "held_out": sum(n for n, h in zip(f.sizes, f.held) if h)}

    def stage(self, k: int, dense: onnx.ModelProto, pruned: onnx.ModelProto, collectors: list[Collector],
              label: str) -> None:
        seg = self.segments[k]
        t = time.perf_counter()
        sessions = {}
        for side, model in (("d", dense), ("p", pruned)):
            m = _segment_model(model, seg, self.store.types)
            sessions[side] = make_session(m, self.model_path) if m is not None else None
        self.timings["prepare"] = self.timings.get("prepare", 0.0) + time.perf_counter() - t
        bar = tqdm(desc=label, unit="sample", total=sum(self.feeds.sizes), disable=None if self.config.progress else True,
                   file=sys.stderr, leave=False)
        try:
            for b, (n, held) in enumerate(zip(self.feeds.sizes, self.feeds.held)):
                t = time.perf_counter()
                values = {}
                for side, sess in sessions.items():
                    got = {name: self.store.get(side, name, b) for name in seg.reads}
                    if sess is not None:
                        feed = {name: got[name] for name in seg.reads if name in self.store.types}
                        got.update(zip(seg.keeps, run(sess, seg.keeps, feed, self.origin)))
                    for name in seg.keeps:
                        self.store.put(side, name, b, got[name])
                    values[side] = got
                self.timings["forward"] = self.timings.get("forward", 0.0) + time.perf_counter() - t
                t = time.perf_counter()
                for c in collectors:
                    acc = c.hold if held else c.calib
                    for u in c.layer.uses:
                        _fold(acc, c.layer, u.node, values["d"][u.x], values["p"][u.x])
                self.timings["hessian"] = self.timings.get("hessian", 0.0) + time.perf_counter() - t
                bar.update(n)
        finally:
            bar.close()
        for name in seg.frees:
            self.store.drop(name, len(self.feeds.sizes))

    def close(self) -> None:
        self.store.close()
