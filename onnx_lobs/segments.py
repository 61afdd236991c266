"""Sequential mode's calibration with each node run once per model, not once per stage.

Stage s needs its layers' inputs as the model pruned through stage s-1 computes them. Running
the whole model from its inputs for every stage costs a forward pass per stage (about fifty on
a ResNet-50). Instead the top-level graph is cut into segments: segment s holds the nodes that
stage s's inputs need and that no earlier segment ran. It runs once with the dense weights and
once with the weights as pruned so far, reading the tensors that earlier segments left (kept
per batch, in memory up to MEMORY_BYTES and in .npy files in a temporary folder beyond, so memory
stays bounded) and leaving the ones later segments read. In all, two forward passes plus the
traffic of the cut tensors.

Only the top-level graph is cut: when a stage's layer input is defined inside an If/Loop/Scan
body, plan() returns None and the caller runs whole passes instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from . import rewrite
from .activations import Collector, Reading, add_time, share
from .calibration import DataSource
from .graph import Layer
from .index import GraphIndex, Site, read_ir, subgraphs
from .memory import physical
from .rewrite.segment import Cut, ExtractSegment
from .runtime import make_session, run


@dataclass
class Segment:
    nodes: list[int]  # indices into graph.node, in graph order
    reads: list[str]  # stored tensors the nodes consume
    keeps: list[str]  # tensors the nodes produce that later segments (or stages) read
    exposed: list[str]  # the stage's layer inputs
    frees: list[str] = field(default_factory=list)  # stored tensors nothing after this reads


def _used_names(site: Site) -> set[str]:
    """Explicit inputs plus the outer-scope names its bodies read."""
    names = {v.name for v in site.node.inputs if v is not None and v.name}
    inner, todo = set(), [b for _, b in subgraphs(site.node)]
    while todo:
        g = todo.pop()
        inner.add(g)
        todo += [b for n in g for _, b in subgraphs(n)]
    for g in inner:
        for n in g:
            for v in n.inputs:
                if v is None or not v.name:
                    continue
                where = v.producer().graph if v.producer() is not None else v.graph
                if where not in inner:
                    names.add(v.name)
    return names


def plan(model: onnx.ModelProto, stages: list[list[Layer]]) -> list[Segment] | None:
    """One segment per stage, or None when some layer input lives inside a subgraph."""
    index = GraphIndex(model)
    main = index.main()
    producer = {v.name: k for k, site in enumerate(main) for v in site.node.outputs if v.name}
    uses = [_used_names(site) for site in main]
    outputs = [{v.name for v in site.node.outputs} for site in main]
    inits = set(index.ir.graph.initializers) | index.sparse_names(index.ir.graph)
    inputs = {v.name for v in index.ir.graph.inputs}
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
        made = {o for k in order for o in outputs[k]}
        reads = sorted({n for k in order for n in uses[k] if n not in made and (n in producer or n not in inits)}
                       | {x for x in wanted if x not in made})
        segments.append(Segment(order, reads, [], sorted(set(wanted))))
    # What each segment keeps: its products read by later segments or exposed later.
    later: set[str] = set()
    for seg in reversed(segments):
        made = {o for k in seg.nodes for o in outputs[k]}
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
    """The model cut down to the segment's nodes (rewrite/segment.py), fed the stored tensors it reads."""
    if not seg.nodes:
        return None
    small = _nodes_alone(model, seg.nodes, seg.reads, types)
    m = read_ir(small)
    inputs = tuple((n, types[n][0], types[n][1]) for n in seg.reads if n in types)
    rewrite.apply(ExtractSegment(), m, Cut(tuple(range(len(seg.nodes))), inputs, tuple(seg.keeps)))
    return rewrite.to_proto(m, small)


def _nodes_alone(model: onnx.ModelProto, nodes: list[int], reads: list[str], types: dict) -> onnx.ModelProto:
    """The main graph's given nodes with the initializers they read and the stored values as
    inputs (those the segment reads, whether its nodes do or a layer reads them as they are): the
    rule's input. Read into onnx-ir whole for every stage and side, a model of 480
    nodes cost 0.14 s a time (ocr-v6-rec at 2:4: 15 of its 25 s in sequential mode)."""
    g = model.graph
    kept = [g.node[k] for k in nodes]
    used, todo = set(), list(kept)
    while todo:
        n = todo.pop()
        used.update(n.input)
        for a in n.attribute:
            todo += list(a.g.node) + [x for body in a.graphs for x in body.node]
    made = {o for n in kept for o in n.output}
    graph = helper.make_graph(
        kept, g.name, [helper.make_tensor_value_info(n, types[n][0], [None] * types[n][1])
                       for n in sorted((used | set(reads)) & set(types)) if n not in made]
        + [i for i in g.input if i.name in used and i.name not in types],
        [], [t for t in g.initializer if t.name in used],
        value_info=[v for v in g.value_info if v.name in made],
        sparse_initializer=[t for t in g.sparse_initializer if t.values.name in used])
    small = onnx.ModelProto(ir_version=model.ir_version, graph=graph)
    small.opset_import.extend(model.opset_import)
    small.functions.extend(model.functions)
    return small


SHARED = "s"  # the side of the model inputs, the same for the dense and the pruned model


# Cut tensors are kept in memory up to this many bytes, the rest on disk: writing and reading
# every one as .npy cost ocr-v6-rec at 2:4 about 3 of its 6 forward seconds.
MEMORY_BYTES = max(256 << 20, physical() // 16)


class Store:
    """Per-batch tensors of the dense ("d") and the pruned ("p") model between segments: in
    memory while MEMORY_BYTES lasts, then in .npy files in a temporary folder."""

    def __init__(self, budget: int | None = None):
        self.folder = tempfile.mkdtemp(prefix="onnx-lobs-seq-")
        self.names: dict[str, int] = {}
        self.shared: set[str] = set()
        self.types: dict[str, tuple[int, int]] = {}  # name -> (onnx elem type, rank)
        self.budget = MEMORY_BYTES if budget is None else budget
        self.held: dict[str, np.ndarray] = {}  # path -> the tensor, for those kept in memory
        self.bytes = 0

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
        path = self._path(side, name, b)
        self._forget(path)
        if self.bytes + value.nbytes <= self.budget:
            self.held[path] = value
            self.bytes += value.nbytes
        else:
            np.save(path, value, allow_pickle=False)

    def get(self, side: str, name: str, b: int) -> np.ndarray:
        path = self._path(side, name, b)
        value = self.held.get(path)
        return np.load(path, allow_pickle=False) if value is None else value

    def _forget(self, path: str) -> None:
        value = self.held.pop(path, None)
        if value is not None:
            self.bytes -= value.nbytes
            return
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def drop(self, name: str, batches: int) -> None:
        for side in ("d", "p", SHARED):
            for b in range(batches):
                self._forget(self._path(side, name, b))

    def close(self) -> None:
        self.held.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Feeds:
    """The calibration batches as read once from the source."""

    held: list[bool]
    sizes: list[int]
    held_feeds: list[dict]


class SegmentedPass:
    """Runs stage after stage; call stage(k, ...) for k = 0, 1, ... in order."""

    def __init__(self, segments: list[Segment], source: DataSource, reading: Reading, timings: dict,
                 model_path: str | None = None):
        self.segments, self.reading, self.timings, self.model_path = segments, reading, timings, model_path
        self.store = Store()
        self.origin = source.origin
        needed = set().union(*(s.reads for s in segments)) if segments else set()
        held, sizes, held_feeds = [], [], []
        for b, (feed, is_held) in enumerate(source.batches(reading.batch_size, reading.samples)):
            for name, value in feed.items():
                if name in needed:
                    self.store.put(SHARED, name, b, value)
            held.append(is_held)
            sizes.append(source.count(feed))
            if is_held:
                held_feeds.append(feed)
        self.feeds = Feeds(held, sizes, held_feeds)

    def samples(self) -> dict:
        f = self.feeds
        return {"calibration": sum(n for n, h in zip(f.sizes, f.held) if not h),
                "held_out": sum(n for n, h in zip(f.sizes, f.held) if h)}

    def stage(self, k: int, dense: onnx.ModelProto, pruned: onnx.ModelProto | None, collectors: list[Collector],
              label: str) -> None:
        """Stage k's pass; with pruned None, the dense side alone (independent mode's blocks)."""
        seg = self.segments[k]
        t = time.perf_counter()
        sessions = {}
        for side, model in (("d", dense), ("p", pruned)) if pruned is not None else (("d", dense),):
            m = _segment_model(model, seg, self.store.types)
            sessions[side] = make_session(m, self.model_path) if m is not None else None
        add_time(self.timings, "prepare", t)
        folding = share(collectors)
        bar = self.reading.bar(label, sum(self.feeds.sizes))
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
                add_time(self.timings, "forward", t)
                t = time.perf_counter()
                for c in folding:
                    for u in c.layer.uses:
                        c.fold(held, u.node, values["d"][u.x], values["p"][u.x] if c.joint else None)
                add_time(self.timings, "hessian", t)
                bar.update(n)
        finally:
            bar.close()
        for name in seg.frees:
            self.store.drop(name, len(self.feeds.sizes))

    def close(self) -> None:
        self.store.close()


# ----------------------------------------------------------------------------- probe tails

@dataclass
class Tail:
    """The main graph from node `start` on: all that a change to weights first read there can
    move, fed the values it reads from before (an output probe then skips the nodes before)."""

    start: int
    reads: list[str]  # values made before `start`, or graph inputs, that its nodes read
    outputs: list[str]  # the model's outputs its nodes make (the others cannot change)


def first_reads(model: onnx.ModelProto, names: set[str]) -> dict[str, int]:
    """Each name's first reader in the main graph, by position (a node reads what its bodies read)."""
    first: dict[str, int] = {}
    for k, site in enumerate(GraphIndex(model).main()):
        for n in _used_names(site) & names:
            first.setdefault(n, k)
    return first


def tails(model: onnx.ModelProto, starts: list[int]) -> list[Tail]:
    """The tails from these node positions (main-graph order is topological)."""
    index = GraphIndex(model)
    main = index.main()
    uses = [_used_names(site) for site in main]
    made_at = {v.name: k for k, site in enumerate(main) for v in site.node.outputs if v.name}
    inits = set(index.ir.graph.initializers) | index.sparse_names(index.ir.graph)
    inputs = [v.name for v in index.ir.graph.inputs if v.name not in inits]
    outputs = [v.name for v in index.ir.graph.outputs]
    out = []
    for s in starts:
        read = set().union(*uses[s:]) if s < len(main) else set()
        reads = sorted(n for n in read if made_at.get(n, len(main)) < s) + [n for n in inputs if n in read]
        out.append(Tail(s, reads, [n for n in outputs if made_at.get(n, -1) >= s]))
    return out


def tail_model(model: onnx.ModelProto, tail: Tail, types: dict) -> onnx.ModelProto:
    """The model cut down to the tail, its reads as inputs (types: name -> (onnx elem type, rank))."""
    m = read_ir(model)
    nodes = tuple(range(tail.start, len(m.graph)))
    inputs = tuple((n, *types[n]) for n in tail.reads)
    rewrite.apply(ExtractSegment(), m, Cut(nodes, inputs, tuple(tail.outputs)))
    return rewrite.to_proto(m, model)
