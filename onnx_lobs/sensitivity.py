"""How much a change to the weights moves the model's final outputs, measured on held-out samples.

Layer-wise errors do not say what reaches the output: an error in a residual branch is damped by
the stream it joins, one just before the logits is not (ResNet-50 at 70% of its FLOPs: the same
layer-wise error costs 40 times more output error in the last stage's stream than in a block's
inner channels). Allocations that want the output's error measure it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from . import activations, rewrite, segments
from .errors import LobsError
from .runtime import make_session, output_names, run

PROBE_SAMPLES = 32  # held-out samples a probe runs on: the ranking needs ratios, not decimals
# ... and at least this many feeds, up to 4 x PROBE_SAMPLES: a feed's first axis is not always a
# batch of independent samples (silero VAD's is 32 rows of one second of audio, and one second
# ranked choices by that second alone)
PROBE_FEEDS = 3


# A channel holding under this share of its tensor's mean channel energy is measured against
# that share instead: a class score that stays near zero on the probe must not weigh a million
# times more than the rest for a change of a few thousandths.
CHANNEL_FLOOR = 1e-6

# Probes of one layer run from the latest of up to TAILS points before it (segments.Tail): on a
# chain, half the forward pass on average instead of all of it. Each tail is a session holding
# its part of the weights, so there are fewer on large models (TAIL_MODEL_BYTES over the
# weights' size), and none if the dense values fed to them would pass TAIL_VALUE_BYTES. The
# first starts at the graph's start; in each, only the weights of the layers it serves (those
# first read before the next one starts) are inputs: onnxruntime packs the others as constants
# (ResNet-50 on 3 images: 125 ms a run with none fed, 208 with all).
TAILS = 4
TAIL_MODEL_BYTES = 1 << 30
TAIL_VALUE_BYTES = 1 << 30


@dataclass
class _Tail:
    cut: segments.Tail
    session: object
    names: set  # the overridable initializers it holds
    reads: list[dict]  # per feed: the dense values it reads
    dense: list[list[np.ndarray]]  # per feed: its dense outputs
    index: list[int]  # its outputs' positions among the model's


@dataclass
class OutputProbe:
    """The dense model's outputs on some held-out feeds, to compare changed models against.

    The error is relative per channel: each float output counts alike, and within one of rank 3
    or more each channel of axis 1 (NCHW maps, a detector's [N, 4 + classes, anchors]) counts
    alike, its squared change over its own energy. By energy alone YOLO's box coordinates, in
    pixels, held all of it and its class scores, which decide the detections, none."""

    feeds: list[dict]
    dense: list[list[np.ndarray]]
    origin: str | None = None
    runs: int = field(default=0, init=False)
    energy: float = field(default=0.0, init=False)
    _weights: dict = field(default_factory=dict, init=False, repr=False)  # feeds -> per output: 1 / energy
    _axes: list = field(default_factory=list, init=False, repr=False)  # per output: its channel axis or None
    _open: tuple | None = field(default=None, init=False, repr=False)  # overridable's (session, outputs, names)
    _tails: list = field(default_factory=list, init=False, repr=False)  # overridable's _Tail, by start
    _first: dict = field(default_factory=dict, init=False, repr=False)  # weight -> its first reader's position
    single: int | None = field(default=None, init=False)  # the feed count the tails serve (overridable)

    def __post_init__(self):
        self._measure()

    def _measure(self) -> None:
        # axis 1 is a channel axis only if its size never varies (a recogniser's is its time steps)
        first = self.dense[0] if self.dense else []
        self._axes = [1 if ref.ndim >= 3 and len({outs[t].shape[1] for outs in self.dense}) == 1 else None
                      for t, ref in enumerate(first)]
        self._weights = {}
        self.energy = sum(float(np.sum(e)) for e in self._energies(len(self.dense)) if e is not None)

    def error(self, model: onnx.ModelProto, feeds: int | None = None) -> float:
        """The changed model's mean squared relative change over the float outputs' channels (for
        one output with one channel, the square of the held-out relative L2). feeds: on the first
        that many feeds only (a cheaper, rougher probe)."""
        session, names = make_session(model, self.origin), output_names(model)
        origin = self.origin or "changed model"
        return self._compare(lambda i: enumerate(zip(run(session, names, self.feeds[i], origin), self.dense[i])),
                             feeds)

    def _compare(self, pairs, feeds: int | None) -> float:
        """pairs(i): (output index, (changed, dense)) for the outputs that may differ on feed i."""
        n = len(self.dense) if feeds is None else min(feeds, len(self.dense))
        weights = self._weights_for(n)
        diff = 0.0
        for i in range(n):
            for t, (a, ref) in pairs(i):
                if weights[t] is not None:  # squared in float32 at least, summed in float64
                    sq = np.subtract(a, ref, dtype=np.result_type(a.dtype, ref.dtype, np.float32))
                    diff += float(np.sum(_channel_sums(np.square(sq, out=sq), self._axes[t]) * weights[t]))
        self.runs += 1
        return diff

    def overridable(self, model: onnx.ModelProto, names: set[str], tail_feeds: int | None = None,
                    values: int | None = None, least: int = 1) -> None:
        """Let error_with replace these values of `model` (as it is now, dense), main-graph
        initializers or Constant nodes' outputs, by feeding them: one session in which they are
        inputs with their values as defaults, instead of a session per changed model (ddddocr:
        0.39 s a probe against 0.65). With tail_feeds, probes on that many feeds also get tails:
        sessions of the graph from a few points on, fed the dense values it reads there, so that
        a change first read late skips the nodes before (each tail's outputs are compared with
        its own dense run, so an unchanged tail measures exactly 0). With values, they may take
        fewer samples than tail_feeds feeds hold, `least` at least (_lead). `single` is then the
        feed count the tails serve, for the caller's cheaper probes."""
        base = _as_initializers(model, names)  # Constant nodes' weights fed alike
        names = set(names) & _feedable(base)
        self._open, self._tails = None, []
        self.single = None if tail_feeds is None else min(tail_feeds, len(self.feeds))
        if not names:
            return
        try:
            self._open = (make_session(_opened(base, names), self.origin), output_names(model), names)
        except LobsError:  # onnxruntime wants some of them constant: a session per probe, as before
            return
        if self.single and values:
            self.single = self._lead(model, self.single, values, least)
        if self.single:
            self._first = segments.first_reads(base, names)
            self._tails = self._make_tails(base, names, self.single)

    def _lead(self, model: onnx.ModelProto, feeds: int, values: int, least: int) -> int:
        """Fewer feeds for the cheaper probes, where the feeds are batches of independent samples
        and fewer samples than the first `feeds` hold give `values` float output values (and
        `least` samples: on one image NudeNet's allocation fell from F1 0.958 to 0.927): the
        first feeds that do, the first one split in two if it alone holds more. ResNet-50's 12
        held-out images made each probe cost 0.65 s; on 2 or 4 of them its allocation's probes
        took a quarter or half the time, and its result's held-out rel L2 was 0.00631 against
        0.00633. The parts' dense outputs are run, not sliced, and a probe on all feeds measures
        what it did, the parts summing to the whole."""
        first = self.feeds[0]
        batch = _batch(model, first)
        per = sum(o.size for o in self.dense[0] if o.dtype.kind == "f") / batch if batch else 0
        sizes = [_samples(f) for f in self.feeds[:feeds]]
        need = max(math.ceil(values / per), least) if per else sum(sizes)
        if need >= sum(sizes) or not all(_batch(model, f) for f in self.feeds[1:feeds]):
            return feeds
        if batch == 1 or need >= batch:
            return next(k + 1 for k in range(feeds) if sum(sizes[:k + 1]) >= need)
        session, names, _ = self._open
        parts = [{k: v[:need] for k, v in first.items()}, {k: v[need:] for k, v in first.items()}]
        try:
            dense = [run(session, names, p, self.origin or "probe") for p in parts]
        except LobsError:  # a batch the model's shapes do not let be split after all
            return feeds
        self.feeds, self.dense = parts + self.feeds[1:], dense + self.dense[1:]
        self._measure()
        return 1

    def can_feed(self, names: set[str]) -> bool:
        """Whether error_with takes these values (every one an overridable weight)."""
        return self._open is not None and set(names) <= self._open[2]

    def error_with(self, model: onnx.ModelProto, tensors: dict, feeds: int | None = None) -> float | None:
        """error() of `model` with these initializers replaced, through the session of overridable
        (or the latest tail before the first node reading any of them); None when it cannot take
        them all (then write them and call error)."""
        if not self.can_feed(set(tensors)):
            return None
        origin = self.origin or "changed model"
        tail = self._tail_for(tensors, feeds)
        if tail is not None:
            def pairs(i):
                fed = {n: v for n, v in tensors.items() if n in tail.names}
                got = run(tail.session, tail.cut.outputs, {**tail.reads[i], **fed}, origin)
                return zip(tail.index, zip(got, tail.dense[i]))
            return self._compare(pairs, feeds)
        session, names, _ = self._open
        return self._compare(
            lambda i: enumerate(zip(run(session, names, {**self.feeds[i], **tensors}, origin), self.dense[i])), feeds)

    def _tail_for(self, tensors: dict, feeds: int | None):
        if not self._tails or feeds != self.single or not tensors:
            return None
        first = min(self._first.get(n, -1) for n in tensors)
        tail = next((t for t in reversed(self._tails) if t.cut.start <= first), None)
        return tail if tail is not None and set(tensors) <= tail.names else None

    def _make_tails(self, model: onnx.ModelProto, names: set[str], feeds: int) -> list:
        """Up to TAILS tails: one from the start, the others from the first readers of evenly
        spaced layers' weights; the latest first while the values they read fit TAIL_VALUE_BYTES
        (feeds alike in size: the first one's say)."""
        count = min(TAILS, TAIL_MODEL_BYTES // max(_weight_bytes(model), 1)) - 1
        starts = sorted(set(self._first.values()))
        picks = sorted({0} | {starts[len(starts) * (k + 1) // (count + 1)] for k in range(count)}) \
            if starts and count >= 0 else []
        cuts = [c for c in segments.tails(model, picks) if c.outputs]
        wanted = sorted({n for c in cuts for n in c.reads} - set(self.feeds[0]))
        if not cuts:
            return []
        try:
            exposed, where = activations.expose(model, [(n, (), np.float32) for n in wanted])
            session = make_session(exposed, self.origin)
            outs = [where[(n, ())].output for n in wanted]
            got = dict(zip(wanted, run(session, outs, self.feeds[0], "probe")))
            kept, held = [], set()
            for c in reversed(cuts):
                need = held | (set(c.reads) & set(wanted))
                if sum(got[n].nbytes for n in need) * feeds <= TAIL_VALUE_BYTES:
                    kept.insert(0, c)
                    held = need
            if not kept:
                return []
            values = []
            for i in range(feeds):  # only what the kept tails read is held
                got = got if i == 0 else dict(zip(wanted, run(session, outs, self.feeds[i], "probe")))
                values.append({**self.feeds[i], **{n: got[n] for n in held}})
            del session
            ends = [c.start for c in kept[1:]] + [None]
            return [self._tail(model, c, names, values, end) for c, end in zip(kept, ends)]
        except (LobsError, rewrite.RewriteError):  # a graph the cut or onnxruntime does not take: whole runs
            return []

    def _tail(self, model, cut, names, values, end: int | None):
        """The tail's session (the weights first read before `end` overridable), its reads and its
        own dense outputs per feed."""
        types = {n: (helper.np_dtype_to_tensor_dtype(v.dtype), v.ndim) for n, v in values[0].items()}
        sub = segments.tail_model(model, cut, types)
        fed = {n for n in names & {t.name for t in sub.graph.initializer}
               if end is None or self._first.get(n, -1) < end}
        sess = make_session(_opened(sub, fed, copy=False), self.origin)  # sub is ours
        reads = [{n: vals[n] for n in cut.reads} for vals in values]
        dense = [run(sess, cut.outputs, r, "probe") for r in reads]
        index = [output_names(model).index(n) for n in cut.outputs]
        return _Tail(cut, sess, fed, reads, dense, index)

    def _energies(self, feeds: int) -> list:
        """Per output, its energy per channel over the first `feeds` feeds (None if not float)."""
        totals = []
        for t, ref in enumerate(self.dense[0] if self.dense else []):
            if ref.dtype.kind != "f":
                totals.append(None)
                continue
            totals.append(sum(_channel_sums(np.square(outs[t], dtype=np.float64), self._axes[t])
                              for outs in self.dense[:feeds]))
        return totals

    def _weights_for(self, feeds: int) -> list:
        if feeds not in self._weights:
            energies = self._energies(feeds)
            alive = [e for e in energies if e is not None and np.sum(e) > 0]
            weights = []
            for e in energies:
                if e is None or np.sum(e) <= 0:
                    weights.append(None)
                    continue
                floor = CHANNEL_FLOOR * float(np.mean(e))
                weights.append(1.0 / (len(alive) * e.size * np.maximum(e, floor)))
            self._weights[feeds] = weights
        return self._weights[feeds]


def _feedable(model: onnx.ModelProto) -> set[str]:
    # onnxruntime's Python feeds take numpy's own float types, not bfloat16 or float8
    fed = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    return {t.name for t in model.graph.initializer if t.data_type in fed}


def _as_initializers(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """The model with the main graph's Constant nodes that make these names (by a tensor value)
    turned into initializers of those names: the same model, whose weights can then be fed."""
    if not any(n.op_type == "Constant" and n.output[0] in names for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for node in out.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and node.output[0] in names:
            init = out.graph.initializer.add()
            init.CopyFrom(value)
            init.name = node.output[0]
        else:
            keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def _opened(model: onnx.ModelProto, names: set[str], copy: bool = True) -> onnx.ModelProto:
    """The model (a copy, unless copy=False) in which these initializers are also inputs (their
    values the defaults)."""
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    listed = {i.name for i in out.graph.input}
    for t in out.graph.initializer:
        if t.name in names and t.name not in listed:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    out.ir_version = max(out.ir_version, 4)
    return out


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(np.prod(t.dims, dtype=np.int64) * 4 for t in model.graph.initializer)


def _channel_sums(a: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.array([float(np.sum(a, dtype=np.float64))])
    return np.sum(a, axis=tuple(i for i in range(a.ndim) if i != axis), dtype=np.float64)


def _samples(feed: dict) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and np.ndim(first) else 1


def _batch(model: onnx.ModelProto, feed: dict) -> int | None:
    """The feed's batch size if every input is batch-major on a dynamic first axis, else None."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    sizes = {int(np.shape(v)[0]) if np.ndim(v) else 0 for v in feed.values()}
    if len(sizes) != 1 or min(sizes) < 1:
        return None
    for name in feed:
        dim = dims.get(name)
        if not dim or (dim[0].HasField("dim_value") and dim[0].dim_value > 0):
            return None
    return sizes.pop()


def feeds_for(feeds: list[dict], samples: int, least: int = PROBE_FEEDS) -> int:
    """How many of the first feeds hold `samples` samples and `least` feeds (whole feeds; a
    feed's first axis counts as its batch)."""
    taken, n = 0, 0
    for feed in feeds:
        if n >= samples and (taken >= least or n >= 4 * samples):
            break
        n += _samples(feed)
        taken += 1
    return taken


def output_probe(feeds: list[dict], dense: list, origin: str | None = None,
                 samples: int = PROBE_SAMPLES) -> OutputProbe | None:
    """A probe on the first `samples` held-out samples (whole feeds), or None without any."""
    taken = feeds_for(feeds, samples)
    if not taken:
        return None
    probe = OutputProbe(feeds[:taken], dense[:taken], origin)
    return probe if probe.energy > 0 else None
