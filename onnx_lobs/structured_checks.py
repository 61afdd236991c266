"""What is checked and measured on a structurally pruned model before it is returned: valid ONNX
that computes what its dense-shaped equivalent computes (onnxruntime, held-out samples), its
output fidelity, parameters, FLOPs, file size and latency against the dense model."""

from __future__ import annotations

import os
import time

import numpy as np
import onnx

from .errors import LobsError, one_line
from .evaluate import Fidelity
from .flops import Flops, count
from .modelio import iter_graphs, over_limit
from .runtime import make_session, output_names, run

CHECK_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9, np.dtype(np.float16): 2e-2}


def check_shrunk(shrunk, reference, feeds, candidates, path) -> list | None:
    """The shrunk model is valid ONNX and computes what the dense-shaped equivalent computes;
    its outputs on the feeds (each model is run once: over 2 GB a session costs a disk copy)."""
    where = path or "model"
    try:
        if not over_limit(shrunk):
            onnx.checker.check_model(shrunk, full_check=True)
            onnx.shape_inference.infer_shapes(shrunk, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise LobsError(f"{where}: the structurally pruned model fails the ONNX checks "
                        f"({one_line(e, 200)}); nothing was written") from None
    if not feeds:
        return None
    bad, outs = _disagreement(shrunk, reference, feeds)
    if bad is None:
        return outs
    culprit = next((label for label, cut_alone in candidates if _disagreement(cut_alone(), reference, feeds)[0]),
                   "several groups together")
    raise LobsError(f"{where}: removing the channels of group '{culprit}' changes the outputs ({bad}); "
                    "this is a bug in onnx-lobs, nothing was written")


def _disagreement(model, reference, feeds) -> tuple[str | None, list]:
    """(how the model's outputs differ from the reference's, or None; the model's outputs)."""
    s, r = make_session(model), make_session(reference)
    names = output_names(reference)
    outs = [run(s, names, feed, "shrunk model") for feed in feeds]
    for feed, got in zip(feeds, outs):
        for name, x, y in zip(names, got, run(r, names, feed, "reference")):
            if x.shape != y.shape:
                return f"output '{name}' has shape {list(x.shape)}, expected {list(y.shape)}", outs
            if x.dtype.kind != "f":
                if not np.array_equal(x, y):
                    return f"output '{name}' differs", outs
                continue
            scale = float(np.max(np.abs(y.astype(np.float64)))) if y.size else 0.0
            err = float(np.max(np.abs(x.astype(np.float64) - y))) if y.size else 0.0
            if err > CHECK_RTOL.get(y.dtype, 1e-4) * max(scale, 1e-6) or not np.isfinite(err) and np.isfinite(scale):
                return f"output '{name}' differs by {err:.3g} at scale {scale:.3g}", outs
    return None, outs


def fidelity(outs: list, dense_outs: list) -> dict:
    """The shrunk model's held-out outputs against the dense model's."""
    fid = Fidelity()
    for got, dense in zip(outs, dense_outs):
        fid.add(dense, got)
    return fid.result()


def parameters(model: onnx.ModelProto) -> int:
    """Elements of every float constant: initializers and Constant nodes, bodies included."""
    total = 0
    for g in iter_graphs(model.graph):
        tensors = list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute
                                         if a.name == "value"]
        total += sum(int(np.prod(t.dims)) for t in tensors if t.data_type in (1, 10, 11, 16))
    return total


def latency_feed(feeds: list[dict], n: int, model: onnx.ModelProto) -> list[dict]:
    """One feed of n samples (the calibration batch) from the held-out ones, repeated as needed."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    if not feeds or any(np.ndim(v) == 0 or k not in dims or not dims[k] or dims[k][0].HasField("dim_value")
                        for k, v in feeds[0].items()):
        return feeds[:1]  # no dynamic batch axis: the held-out feed as it is
    joined = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    reps = -(-n // len(next(iter(joined.values()))))
    return [{k: np.concatenate([v] * reps)[:n] for k, v in joined.items()}]


def summary(before, after, dense: Flops, feeds, config) -> dict:
    out = {"params_before": parameters(before), "params_after": parameters(after),
           "flops_before": dense.total, "flops_after": count(after).total, "flops_unknown": dense.unknown,
           "bytes_before": before.ByteSize(), "bytes_after": after.ByteSize()}
    if feeds and config.latency:
        out["latency"] = latency(before, after, feeds[0])
    return out


# onnxruntime's idle workers spin (2^20 pause instructions, tens of ms) before they sleep. Run
# one session straight after the other and the first one's spinning workers take the cores from
# the second: on 2 threads and 2 cores a dense ResNet-50 then timed 60 ms instead of 30 alone.
# So the models take turns in blocks, each after a pause that lets the other's workers sleep.
PAUSE = 0.06  # s; 0.01 was not enough there, 0.05 was
BLOCK = 0.1  # s of runs per turn, so that the pauses cost at most about as much again


def latency(before, after, feed: dict, threads: int | None = None, budget: float = 1.0) -> dict:
    """Warm onnxruntime latency of both models, taking turns, median ms, at batch 1 and at the
    feed's batch, with the thread count used. budget counts the timed runs of each model."""
    threads = threads or min(4, os.cpu_count() or 1)
    out = {"threads": threads}
    batch = next(iter(feed.values())).shape[0]
    for label, f in (("batch_1", {k: v[:1] for k, v in feed.items()}), (f"batch_{batch}", feed)):
        sessions = [make_session(m, threads=threads) for m in (before, after)]
        names = [output_names(m) for m in (before, after)]
        warm = max(_timed(s, n, f, 1)[0] for s, n in zip(sessions, names))
        turn = max(1, min(200, int(BLOCK / max(warm, 1e-6))))
        times: list[list[float]] = [[], []]
        while (sum(times[0]) < budget or len(times[0]) < 5) and len(times[0]) < 200:
            for k in (0, 1):
                time.sleep(PAUSE)
                times[k] += _timed(sessions[k], names[k], f, turn)
        before_ms, after_ms = (1e3 * float(np.median(t)) for t in times)
        out[label] = {"before_ms": before_ms, "after_ms": after_ms, "speedup": before_ms / after_ms,
                      "runs": len(times[0])}
    return out


def _timed(session, names, feed, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(names, feed)
        out.append(time.perf_counter() - t)
    return out
