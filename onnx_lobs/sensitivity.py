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

from .runtime import make_session, output_names, run

PROBE_SAMPLES = 32  # held-out samples a probe runs on: the ranking needs ratios, not decimals
# ... and at least this many feeds, up to 4 x PROBE_SAMPLES: a feed's first axis is not always a
# batch of independent samples (silero VAD's is 32 rows of one second of audio, and one second
# ranked choices by that second alone)
PROBE_FEEDS = 3


@dataclass
class OutputProbe:
    """The dense model's outputs on some held-out feeds, to compare changed models against."""

    feeds: list[dict]
    dense: list[list[np.ndarray]]
    origin: str | None = None
    runs: int = field(default=0, init=False)
    energy: float = field(default=0.0, init=False)
    _energies: dict = field(default_factory=dict, init=False, repr=False)  # feeds -> their energy

    def __post_init__(self):
        self.energy = self._energy(len(self.dense))

    def error(self, model: onnx.ModelProto, feeds: int | None = None) -> float:
        """The changed model's squared output change over the dense outputs' energy (float outputs,
        summed over every output): the square of the held-out relative L2. feeds: on the first
        that many feeds only (a cheaper, rougher probe)."""
        session, names = make_session(model, self.origin), output_names(model)
        diff, energy = 0.0, self.energy if feeds is None else self._energy(feeds)
        for feed, dense in zip(self.feeds[:feeds], self.dense[:feeds]):
            for got, ref in zip(run(session, names, feed, self.origin or "changed model"), dense):
                if ref.dtype.kind == "f":
                    diff += float(np.sum(np.square(got.astype(np.float64) - ref)))
        self.runs += 1
        return diff / energy if energy > 0 else 0.0

    def _energy(self, feeds: int) -> float:
        if feeds not in self._energies:
            self._energies[feeds] = sum(float(np.sum(np.square(o, dtype=np.float64))) for outs in self.dense[:feeds]
                                        for o in outs if o.dtype.kind == "f")
        return self._energies[feeds]


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
