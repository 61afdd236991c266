"""prune(): model -> layers -> calibration -> Hessians -> solver -> weights written back -> report."""

from __future__ import annotations

import fnmatch
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from tqdm import tqdm

from . import __version__
from .calibration import make_session, open_source, run
from .errors import LobsError
from .evaluate import Fidelity
from .graph import (FLOAT_TYPES, Layer, LoadedModel, expose, find_layers, layer_chain, load_model,
                    matches, write_tensor)
from .hessian import HessianAccumulator, layer_error, output_energy
from .layers import unfold
from .report import LayerRecord, Report, chain_bound, overall_sparsity, versions
from .solvers import METHODS, Target, get_solver

METADATA_KEY = "onnx_lobs"
# With damp=None each layer takes the dampening, of these, whose result has the lowest layer-wise
# error on the calibration data: the very quantity L-OBS minimises. A fixed H^-1 is a poor guide
# for removing most of a layer, and stronger dampening tempers its compensations.
DAMP_GRID = (0.01, 0.1, 1.0, 10.0)
DAMP_ROWS = 96


@dataclass
class PruneConfig:
    method: str = "lobs"
    sparsity: float = 0.5  # fraction of each layer's weights removed
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # glob -> sparsity; later wins
    max_error: float | None = None  # stop each layer at this relative error instead
    exclude: list[str] = field(default_factory=list)  # globs of layers left dense
    samples: int | None = None  # calibration samples to read (default: all)
    batch_size: int = 64
    seed: int = 0
    damp: float | None = None  # fraction of mean diag(H) added before inverting; None: per layer
    progress: bool = False

    def check(self) -> None:
        if self.method not in METHODS:
            raise LobsError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        for where, s in [("--sparsity", self.sparsity)] + [(f"--layer-sparsity {k}", v)
                                                          for k, v in self.layer_sparsity.items()]:
            if not 0 <= s < 1:
                raise LobsError(f"{where}: sparsity must be in [0, 1), got {s}")
        if self.max_error is not None and not self.max_error > 0:
            raise LobsError(f"--max-error must be positive, got {self.max_error}")
        if self.batch_size < 1 or (self.samples is not None and self.samples < 1):
            raise LobsError("--batch-size and --samples must be positive")
        if self.damp is not None and not 0 <= self.damp < 1e3:
            raise LobsError(f"--damp must be 'auto' or a number in [0, 1000), got {self.damp}")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: Report
    masks: dict[str, np.ndarray]  # weight name -> True where a weight was removed
    external_data: bool = False  # the input kept weights in external data: save the same way


@dataclass(eq=False)
class _Work:
    layer: Layer
    target: float
    calib: HessianAccumulator
    hold: HessianAccumulator
    record: LayerRecord
    rows_per_sample: float | None = None  # unfolded rows per held-out sample (conv positions)


def prune(model, calibration=None, config: PruneConfig | None = None) -> PruneResult:
    """Prune a model (path, ModelProto or LoadedModel) with calibration data; the input is not modified."""
    config = config or PruneConfig()
    config.check()
    timings = {}
    t = time.perf_counter()
    loaded = _load(model)
    layers, skipped = find_layers(loaded)
    work, records = _plan(layers, skipped, config)
    source = open_source(calibration, loaded.model, seed=config.seed, samples=config.samples) \
        if work else None
    timings["load"] = time.perf_counter() - t

    samples = {"calibration": 0, "held_out": 0}
    held_feeds, held_dense = [], []
    if work:
        samples, held_feeds, held_dense = _calibrate(loaded, work, source, config, timings)

    t = time.perf_counter()
    masks = {}
    bar = tqdm(work, desc="solving", unit="layer", disable=not config.progress, file=sys.stderr, leave=False)
    for w in bar:
        bar.set_postfix_str(w.layer.name[-30:])
        masks[w.layer.weight_name] = _solve_layer(w, config, samples)
    timings["solve"] = time.perf_counter() - t

    zeros = {r.name: 0 for r in records}
    for layer in layers:
        zeros[layer.name] = int(np.sum(layer.read() == 0))
    for r in records:
        if r.skipped is None and r.sparsity is None and r.params:
            r.sparsity = zeros[r.name] / r.params
    _stamp(loaded.model, config, overall_sparsity([r for r in records if r.params], zeros))

    t = time.perf_counter()
    fidelity, bound = _verify(loaded.model, layers, work, held_feeds, held_dense, samples)
    timings["verify"] = time.perf_counter() - t
    timings["total"] = sum(timings.values())
    report = Report(records, overall_sparsity([r for r in records if r.params], zeros),
                    _config_dict(config), timings, fidelity, bound, samples, versions())
    return PruneResult(loaded.model, report, masks, bool(loaded.external))


def _load(model) -> LoadedModel:
    if isinstance(model, LoadedModel):
        copy = onnx.ModelProto()
        copy.CopyFrom(model.model)
        return LoadedModel(copy, model.path, set(model.external))
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return LoadedModel(copy, "<model>")
    return load_model(str(model))


def _target(layer: Layer, config: PruneConfig) -> float:
    s = config.sparsity
    for pattern, value in config.layer_sparsity.items():
        if matches(layer, pattern):
            s = value
    return s


def _plan(layers, skipped, config):
    records, work = [], []
    for layer in layers:
        g = layer.geometry
        rec = LayerRecord(layer.name, layer.op, layer.weight_name, g.rows * g.groups, g.cols, g.groups,
                          int(np.prod(layer.shape)), layer.storage, layer.dtype)
        records.append(rec)
        pattern = next((p for p in config.exclude if matches(layer, p)), None)
        if pattern is not None:
            rec.skipped = f"excluded by '{pattern}'"
            continue
        target = _target(layer, config)
        rec.target_sparsity = None if config.max_error is not None else target
        if target == 0 and config.max_error is None:
            rec.notes.append("target sparsity 0: left as it is")
            continue
        bias = layer.bias is not None
        work.append(_Work(layer, target, HessianAccumulator(g.groups, g.cols, bias),
                          HessianAccumulator(g.groups, g.cols, bias), rec))
    for s in skipped:
        records.append(LayerRecord(s.name, s.op, s.weight or "", 0, 0, skipped=s.reason))
    return work, records


def _calibrate(loaded, work, source, config, timings):
    """One pass over the data: every layer's input exposed, Hessians updated, activations dropped."""
    t = time.perf_counter()
    requests, keys = [], {}
    for w in work:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(w.layer.weight.compute_dtype)
        for u in w.layer.uses:
            requests.append((u.x, u.x_scope, np_dtype))
    aug, exposed = expose(loaded.model, requests)
    for w in work:
        keys[id(w)] = [exposed[(u.x, tuple((id(n), a) for n, a in u.x_scope))] for u in w.layer.uses]
    n_out = len(loaded.model.graph.output)
    names = [o.name for o in loaded.model.graph.output]
    names += sorted({e.output for ex in keys.values() for e in ex} - set(names)
                    - {i.name for i in aug.graph.input})
    sess = make_session(aug)
    timings["prepare"] = time.perf_counter() - t
    forward = hess = 0.0
    samples = {"calibration": 0, "held_out": 0}
    held_feeds, held_dense = [], []
    bar = tqdm(desc="calibrating", unit="sample", disable=not config.progress, file=sys.stderr, leave=False)
    origin = getattr(source, "origin", "calibration data")
    for feed, held in source.batches(config.batch_size, config.samples):
        t = time.perf_counter()
        outs = run(sess, names, feed, origin)
        forward += time.perf_counter() - t
        t = time.perf_counter()
        values = dict(feed)
        values.update(zip(names, outs))
        for w in work:
            acc = w.hold if held else w.calib
            for u, e in zip(w.layer.uses, keys[id(w)]):
                for cols in unfold(w.layer.adapter, u.node, values[e.output], w.layer.shape):
                    acc.add(cols)
        hess += time.perf_counter() - t
        n = next(iter(feed.values())).shape[0] if next(iter(feed.values())).ndim else 1
        samples["held_out" if held else "calibration"] += n
        if held:
            held_feeds.append(feed)
            held_dense.append(outs[:n_out])
        bar.update(n)
    bar.close()
    if samples["calibration"] == 0:
        raise LobsError(f"{origin}: no calibration samples")
    timings["forward"], timings["hessian"] = forward, hess
    return samples, held_feeds, held_dense


def _solve_layer(w: _Work, config: PruneConfig, samples: dict) -> np.ndarray | None:
    """Solve one layer group by group, write the result back, fill its record; returns the mask."""
    t = time.perf_counter()
    layer, rec = w.layer, w.record
    if w.calib.n == 0:
        rec.skipped = "no calibration sample reached this layer (a branch never taken?)"
        return None
    node = layer.uses[0].node
    adapter = layer.adapter
    weight = layer.read()
    bias = layer.read_bias()
    old = adapter.to_matrices(node, weight.astype(np.float64))
    g, rows, cols = old.shape
    old_b = None if bias is None else adapter.bias_vector(node, bias, rows * g)
    h = w.calib.hessian()
    solver = get_solver(config.method)
    protect = np.r_[np.zeros(cols, bool), [True]] if old_b is not None else None
    new = np.empty_like(old)
    new_b = None if old_b is None else np.empty_like(old_b)
    pruned = np.zeros(old.shape, bool)
    predicted = 0.0
    damps = []
    for k in range(g):
        wk = old[k] if old_b is None else np.c_[old[k], old_b[k]]
        sol = _best_damped(solver, wk, h[k], config, w.target, protect)
        if not np.all(np.isfinite(sol.weights)):
            raise AssertionError(f"{layer.name}: solver produced non-finite weights")
        new[k] = sol.weights[:, :cols]
        pruned[k] = sol.pruned[:, :cols]
        if new_b is not None:
            new_b[k] = sol.weights[:, cols]
        predicted += sol.predicted_loss
        damps.append(sol.damp)
        rec.notes += [n for n in sol.notes if n not in rec.notes]
    np_dtype = weight.dtype
    stored = adapter.from_matrices(node, new, weight).astype(np_dtype)
    stored[adapter.from_matrices(node, pruned, weight)] = 0
    write_tensor(layer.weight, stored)
    if new_b is not None:
        stored_b = adapter.bias_from_vector(node, new_b, bias).astype(bias.dtype)
        write_tensor(layer.bias, stored_b)
        new_b = adapter.bias_vector(node, stored_b, rows * g)
    # Measure with what was actually stored (fp16/bf16 rounding included).
    new = adapter.to_matrices(node, stored.astype(np.float64))
    h_hold = w.hold.hessian() if w.hold.n else None
    err = energy = hold_err = 0.0
    for k in range(g):
        a = old[k] if old_b is None else np.c_[old[k], old_b[k]]
        b = new[k] if new_b is None else np.c_[new[k], new_b[k]]
        err += layer_error(a, b, h[k])
        energy += output_energy(a, h[k])
        if h_hold is not None:
            hold_err += layer_error(a, b, h_hold[k])
    rec.sparsity = float(np.mean(stored == 0))
    rec.error, rec.predicted_error = err, predicted
    rec.rel_error = err / energy if energy > 0 else 0.0
    rec.holdout_error = hold_err if h_hold is not None else None
    rec.damp = max((d for d in damps if d is not None), default=None)
    rec.seconds = time.perf_counter() - t
    w.rows_per_sample = (w.hold.n / samples["held_out"]) if samples["held_out"] else None
    return adapter.from_matrices(node, pruned, weight)


def _best_damped(solver, wk, hk, config, sparsity, protect):
    """Solve one matrix with the given dampening, or with the best of DAMP_GRID.

    L-OBS rows share H^-1 but are otherwise independent, so the grid is compared on a subset of
    DAMP_ROWS evenly spaced rows, and only the winner is solved on the whole matrix.
    """
    def target(w, damp):
        if config.max_error is not None:
            return Target(max_loss=config.max_error * output_energy(w, hk), protect=protect, damp=damp)
        cols = w.shape[1] - (protect is not None)
        return Target(n_prune=int(round(sparsity * w.shape[0] * cols)), protect=protect, damp=damp)

    if config.damp is not None:
        return solver(wk, hk, target(wk, config.damp))
    sub = wk if wk.shape[0] <= 2 * DAMP_ROWS else wk[np.linspace(0, wk.shape[0] - 1, DAMP_ROWS).astype(int)]
    best = best_score = None
    for damp in DAMP_GRID:
        sol = solver(sub, hk, target(sub, damp))
        if sol.damp is None:  # the method does not use H^-1: nothing to choose
            return sol if sub is wk else solver(wk, hk, target(wk, damp))
        # Under --max-error more removals at the same error are better; else lower error.
        err = layer_error(sub, sol.weights, hk)
        score = (-int(sol.pruned.sum()), err) if config.max_error is not None else (0, err)
        if best is None or score < best_score:
            best, best_score = (damp, sol), score
    damp, sol = best
    return sol if sub is wk else solver(wk, hk, target(wk, damp))


def _stamp(model: onnx.ModelProto, config: PruneConfig, sparsity: float) -> None:
    """One metadata entry records what was done."""
    value = json.dumps({"version": __version__, "method": config.method,
                        "sparsity": round(sparsity, 6), "config": _config_dict(config)}, sort_keys=True)
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            p.value = value
            return
    model.metadata_props.add(key=METADATA_KEY, value=value)


def _config_dict(config: PruneConfig) -> dict:
    d = asdict(config)
    d.pop("progress")
    return d


def _verify(model, layers, work, held_feeds, held_dense, samples):
    """Check the written model, run it on held-out samples, and set the bound beside the result."""
    try:
        if model.ByteSize() < 2_000_000_000:
            onnx.checker.check_model(model)
    except Exception as e:
        raise AssertionError(f"pruned model fails the ONNX checker: {e}") from None
    sess = make_session(model)
    if not held_feeds:
        return None, {"reason": "no held-out samples"}
    names = [o.name for o in model.graph.output]
    fid = Fidelity()
    for feed, dense in zip(held_feeds, held_dense):
        fid.add(dense, run(sess, names, feed, "pruned model"))
    fidelity = fid.result()
    return fidelity, _bound(model, layers, work, fidelity, samples)


def _bound(model, layers, work, fidelity, samples):
    chain = layer_chain(model, layers)
    if isinstance(chain, str):
        return {"reason": chain, "measured_rms": None}
    steps_spec, steps_frob = [], []
    by_layer = {id(w.layer): w for w in work}
    for layer, gain in chain[0]:
        node = layer.uses[0].node
        m = layer.adapter.to_matrices(node, layer.read().astype(np.float64))
        factor = layer.adapter.lipschitz_factor(node, layer.shape)
        spec = max(np.linalg.norm(mk, 2) for mk in m) * factor
        frob = math.sqrt(float(np.sum(m ** 2))) * factor
        w = by_layer.get(id(layer))
        if w is not None and w.record.holdout_error is not None and w.record.skipped is None:
            rms = math.sqrt(2 * w.record.holdout_error * w.rows_per_sample)
        else:
            rms = 0.0
        steps_spec.append((gain, spec, rms))
        steps_frob.append((gain, frob, rms))
    return {"measured_rms": fidelity["rms"],
            "bound_spectral": chain_bound(steps_spec, chain[1]),
            "bound_frobenius": chain_bound(steps_frob, chain[1]),
            "layers": [layer.name for layer, _ in chain[0]]}
