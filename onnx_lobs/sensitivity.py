"""How much a change to the weights moves the model's final outputs, measured on held-out samples.

Layer-wise errors do not say what reaches the output: an error in a residual branch is damped by
the stream it joins, one just before the logits is not (ResNet-50 at 70% of its FLOPs: the same
layer-wise error costs 40 times more output error in the last stage's stream than in a block's
inner channels). Allocations that want the output's error measure it here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

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

    def __post_init__(self):
        # axis 1 is a channel axis only if its size never varies (a recogniser's is its time steps)
        first = self.dense[0] if self.dense else []
        self._axes = [1 if ref.ndim >= 3 and len({outs[t].shape[1] for outs in self.dense}) == 1 else None
                      for t, ref in enumerate(first)]
        self.energy = sum(float(np.sum(e)) for e in self._energies(len(self.dense)) if e is not None)

    def error(self, model: onnx.ModelProto, feeds: int | None = None) -> float:
        """The changed model's mean squared relative change over the float outputs' channels (for
        one output with one channel, the square of the held-out relative L2). feeds: on the first
        that many feeds only (a cheaper, rougher probe)."""
        session, names = make_session(model, self.origin), output_names(model)
        return self._compare(lambda feed: run(session, names, feed, self.origin or "changed model"), feeds)

    def _compare(self, outputs, feeds: int | None) -> float:
        weights = self._weights_for(len(self.dense) if feeds is None else feeds)
        diff = 0.0
        for feed, dense in zip(self.feeds[:feeds], self.dense[:feeds]):
            got = outputs(feed)
            for a, ref, wt, axis in zip(got, dense, weights, self._axes):
                if wt is not None:
                    diff += float(np.sum(_channel_sums(np.square(a.astype(np.float64) - ref), axis) * wt))
        self.runs += 1
        return diff

    def overridable(self, model: onnx.ModelProto, names: set[str]) -> None:
        """Let error_with replace these main-graph initializers of `model` (as it is now, dense) by
        feeding them: one session in which they are inputs with their values as defaults, instead
        of a session per changed model (ddddocr: 0.39 s a probe against 0.65)."""
        # onnxruntime's Python feeds take numpy's own float types, not bfloat16 or float8
        fed = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
        main = {t.name for t in model.graph.initializer if t.data_type in fed}
        names = set(names) & main
        if not names:
            return
        open_model = onnx.ModelProto()
        open_model.CopyFrom(model)
        listed = {i.name for i in open_model.graph.input}
        for t in open_model.graph.initializer:
            if t.name in names and t.name not in listed:
                open_model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        open_model.ir_version = max(open_model.ir_version, 4)
        try:
            self._open = (make_session(open_model, self.origin), output_names(model), names)
        except LobsError:  # onnxruntime wants some of them constant: a session per probe, as before
            self._open = None

    def error_with(self, model: onnx.ModelProto, tensors: dict, feeds: int | None = None) -> float | None:
        """error() of `model` with these initializers replaced, through the session of overridable;
        None when it cannot take them all (then write them and call error)."""
        if self._open is None or not set(tensors) <= self._open[2]:
            return None
        session, names, _ = self._open
        return self._compare(lambda feed: run(session, names, {**feed, **tensors}, self.origin or "changed model"),
                             feeds)

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


def _channel_sums(a: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.array([float(np.sum(a))])
    return np.sum(a, axis=tuple(i for i in range(a.ndim) if i != axis))


def feeds_for(feeds: list[dict], samples: int) -> int:
    """How many of the first feeds hold `samples` samples and PROBE_FEEDS feeds (whole feeds; a
    feed's first axis counts as its batch)."""
    taken, n = 0, 0
    for feed in feeds:
        if n >= samples and (taken >= PROBE_FEEDS or n >= 4 * samples):
            break
        first = next(iter(feed.values()), None)
        n += int(first.shape[0]) if first is not None and np.ndim(first) else 1
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
