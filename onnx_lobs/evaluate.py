"""How close a model is to another on the same inputs, and how accurate it is with labels."""

from __future__ import annotations

import numpy as np

from .calibration import open_source
from .errors import LobsError
from .modelio import as_loaded
from .runtime import make_session, run


class Fidelity:
    """Running comparison of a model's outputs with reference outputs, batch by batch."""

    def __init__(self):
        self.diff = self.ref = self.out = self.dot = 0.0
        self.agree = self.samples = 0
        self.classes = True

    def add(self, ref: list[np.ndarray], out: list[np.ndarray]) -> None:
        for r, o in zip(ref, out):
            r64, o64 = r.astype(np.float64), o.astype(np.float64)
            with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs: a null in the report
                self.diff += float(np.sum((r64 - o64) ** 2))
                self.ref += float(np.sum(r64 ** 2))
                self.out += float(np.sum(o64 ** 2))
                self.dot += float(np.sum(r64 * o64))
        r, o = ref[0], out[0]
        self.samples += r.shape[0] if r.ndim else 1
        if r.ndim == 2 and r.shape[1] > 1:
            self.agree += int(np.sum(r.argmax(1) == o.argmax(1)))
        else:
            self.classes = False

    def result(self) -> dict:
        denom = np.sqrt(self.ref * self.out)
        return {
            "samples": self.samples,
            "rel_l2": float(np.sqrt(self.diff / self.ref)) if self.ref > 0 else None,
            "cosine": float(self.dot / denom) if denom > 0 else None,
            "top1_agreement": self.agree / self.samples if self.classes and self.samples else None,
            "rms": float(np.sqrt(self.diff / self.samples)) if self.samples else None,
        }


def evaluate(model, data, reference=None, labels: str | None = None, batch_size: int = 256) -> dict:
    """Accuracy (when the data has labels) and fidelity against a reference model (when given)."""
    loaded = as_loaded(model)
    ref_loaded = None if reference is None else as_loaded(reference)
    label_key = labels or "labels"
    source = open_source(data, loaded.model, extra_ok=(label_key, "labels"))
    arrays_labels = source.extra.get(label_key)
    if labels and arrays_labels is None:
        raise LobsError(f"{source.origin}: has no labels under key '{labels}'")
    sess = make_session(loaded.model, loaded.path)
    names = [o.name for o in sess.get_outputs()]
    ref_sess = make_session(ref_loaded.model, ref_loaded.path) if ref_loaded else None
    fid = Fidelity()
    correct = seen = 0
    for feed in source.feeds(batch_size):
        outs = run(sess, names, feed, loaded.path)
        if ref_sess is not None:
            fid.add(run(ref_sess, [o.name for o in ref_sess.get_outputs()], feed, ref_loaded.path), outs)
        n = source.count(feed)
        if arrays_labels is not None:
            y = arrays_labels[seen:seen + n]
            correct += int(np.sum(outs[0].reshape(n, -1).argmax(1) == y))
        seen += n
    result = {"samples": seen, "accuracy": correct / seen if arrays_labels is not None and seen else None,
              "top1_agreement": None, "rel_l2": None, "cosine": None}
    if ref_sess is not None:
        f = fid.result()
        result.update(top1_agreement=f["top1_agreement"], rel_l2=f["rel_l2"], cosine=f["cosine"])
    return result
