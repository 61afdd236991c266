"""--global allocated by the model's outputs (unstructured and N:M): each layer is solved alone at a
few sparsities, its effect on the held-out outputs is measured, and the levels whose summed output
error is least for the overall target are proposed (a multiple-choice knapsack,
allocation.cheapest_choice).

Layer-wise errors do not say what reaches the output (sensitivity.py), so a layer's curve is its
layer-wise error at each level (exact, or on wide sparsegpt layers estimated from a sample of
rows until the level is chosen) times a gain, the measured output error over the layer-wise
one, interpolated between the levels measured. Each layer is first measured at the uniform level
(every layer at the overall target); the choice is then made again with each chosen level
measured too, until it settles. Single-layer errors add up to the whole model's only roughly, so
every choice made, and the uniform one, is then measured on the whole pruned model and the best
kept: the allocation never does worse on the probe than pruning every layer alike. In
independent mode the chosen levels' solves are kept and written as they are; in sequential mode
only the levels are, and the layers are solved on the pruned model's inputs as usual.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .allocation import cheapest_choice
from .graph import write_tensor
from .sensitivity import feeds_for
from .solve import Solved, prepare, removal_count, row_sample, solve_groups, stored_tensors, write_back
from .solvers import resolve
from .solvers.factors import FACTORISATIONS

MAX_ROUNDS = 4  # choices made again with each chosen level measured
# A layer alone is probed on this many samples (the gains it sets only propose choices); the
# choices are confirmed on all of the probe's
SINGLE_SAMPLES = 16
SINGLE_FEEDS = 2  # ... and at least this many feeds (sensitivity.PROBE_FEEDS)
# ... or fewer samples, where the feeds are batches and those hold this many float output values
# (sensitivity._lead: ResNet-50's single probes on 2 or 4 images, not 12, chose as well), but
# SINGLE_LEAST at least (on 2 of its 3 held-out images, ocr-v4-rec lost 4 more of 32 strings)
SINGLE_VALUES = 2000
SINGLE_LEAST = 3
SPREAD = (0.5, 0.75, 1.0)  # levels below the target, as fractions of it
ABOVE = (0.25, 0.5, 0.75)  # levels above it, as fractions of what is left above it
# A layer of over twice ESTIMATE_ROWS rows has its other levels estimated on that many, or on
# one in ESTIMATE_SHARE of its rows if more (ocr-v6-rec's 384 to 768-row layers: within 5-10% of
# the exact errors; its 18,710-row classifier was off by up to 2x on 96)
ESTIMATE_ROWS = 96
ESTIMATE_SHARE = 8
# Layers with estimated levels keep their problem and factorisation for solving a chosen one in
# full, while an eighth of the machine's memory lasts, 1 GB at least (ResNet-50's settles
# otherwise made 65 problems and their factorisations again: 57 s of allocation against 51; it
# keeps all 35 in 2.7 GB, and its peak RSS rose from 10.4 to 11.8 GB)
def _memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on this platform
        return 0


SETTLE_BYTES = max(1 << 30, _memory() // 8)


@dataclass
class Curve:
    """One layer's levels: its sparsities, the weights each removes, its exact layer-wise error
    (relative to its output energy) and, where measured, the output error it causes alone."""

    work: object  # pruning._Work
    collector: object  # the Collector whose dense-input Hessians the levels were solved with
    levels: list[float]
    removed: list[int]
    layer_errors: list[float]  # absolute, as the solver's objective measures it
    energy: float
    solved: list  # Solved per level (None at level 0, and at levels only estimated so far)
    measured: dict[int, float] = field(default_factory=dict)  # level index -> output error
    damps: list | None = None  # the dampening per group, chosen at the level solved first
    kept: tuple | None = None  # (problem, memos) for solving estimated levels in full, while SETTLE_BYTES lasts

    def estimated(self, j: int) -> bool:
        """Whether level j's layer-wise error is an estimate (from a sample of rows), not solved."""
        return j > 0 and self.solved[j] is None

    def predicted(self) -> list[float]:
        """Output error per level: the layer-wise one times the gain interpolated in level index
        (measured levels as measured)."""
        known = sorted(j for j in self.measured if self.layer_errors[j] > 0)
        if not known:  # nothing this layer removes changes its output: free at every level
            return [self.measured.get(j, 0.0) for j in range(len(self.levels))]
        gains = [self.measured[j] / self.layer_errors[j] for j in known]
        gain = np.interp(np.arange(len(self.levels)), known, gains)
        return [self.measured.get(j, float(g * e)) for j, (g, e) in enumerate(zip(gain, self.layer_errors))]

    def record(self, chosen: int) -> list[dict]:
        pred = self.predicted()
        return [{"sparsity": s, "layer_rel_error": (e / self.energy if self.energy > 0 else 0.0),
                 "estimated": self.estimated(j), "output_error": self.measured.get(j),
                 "predicted_output_error": pred[j], "chosen": j == chosen}
                for j, (s, e) in enumerate(zip(self.levels, self.layer_errors))]


@dataclass
class OutputAllocation:
    chosen: list[int]  # level index per curve
    rounds: int
    probes: int
    tried: list[float]  # the summed single-layer output rel L2 of each choice, in order
    confirmed: dict[str, float]  # the whole pruned model's rel L2 per candidate (before the trim)
    picked: str  # the candidate kept

    def summary(self, curves: list[Curve]) -> dict:
        total = sum(c.predicted()[j] for c, j in zip(curves, self.chosen))
        return {"by": "output", "rounds": self.rounds, "probes": self.probes, "tried": self.tried,
                "confirmed": self.confirmed, "picked": self.picked, "predicted_rel_l2": math.sqrt(total)}


def levels_for(target: float, nm: bool) -> list[float]:
    """Level 0, then sparsities around the target (the uniform level, when layers left dense make
    it differ from the overall one), the pattern's alone under N:M."""
    if nm:
        return [0.0, target]
    below = [target * f for f in SPREAD]
    above = [target + (1 - target) * f for f in ABOVE]
    return [0.0] + sorted({round(s, 6) for s in below + above if 0 < s < 1})


def uniform_level(target: float, wanted: int, free_params: int) -> float | None:
    """The sparsity that, in every free layer, removes `wanted`: the target unless layers left
    dense or set explicitly hold weights the target counts."""
    return round(min(wanted / free_params, 0.999), 6) if free_params and wanted > 0 else None


def build_curves(free, collectors, config, probe, model, uniform: float | None = None) -> list[Curve]:
    """Each free layer solved and measured at the uniform level (every layer alike removing the
    overall target: one of the candidates), its error at the other levels solved too, or, on
    layers of many rows, estimated from a sample of them (solved in full once chosen)."""
    probe.overridable(model, {name for w in free for name in _value_names(w.layer)},
                      feeds_for(probe.feeds, SINGLE_SAMPLES, SINGLE_FEEDS), SINGLE_VALUES, SINGLE_LEAST)
    curves = []
    bar = tqdm(total=len(free), desc="solving levels", unit="layer", disable=None if config.progress else True,
               file=sys.stderr, leave=False)
    for w, c in zip(free, collectors):
        if c.calib.n == 0:
            continue
        problem = prepare(c)
        nm = w.nm is not None
        target = (1 - config.pattern[0] / config.pattern[1]) if nm else (uniform or config.global_sparsity)
        levels = levels_for(target, nm)
        curve = Curve(w, c, levels, [0] * len(levels), [0.0] * len(levels), sum(o.energy for o in problem.objectives),
                      [None] * len(levels))
        nearest = min(range(1, len(levels)), key=lambda j: abs(levels[j] - target))
        shared = _levels(curve, problem, nearest, config)
        if shared is not None:
            _keep_within(curves, curve, (problem, shared))
        del problem, shared
        curve.measured[nearest] = _probe(probe, model, w.layer, curve.solved[nearest])
        curves.append(curve)
        bar.update(1)
    bar.close()
    return curves


def _levels(curve: Curve, problem, nearest: int, config) -> list | None:
    """The curve's layer-wise errors: solved at `nearest` (the dampening chosen there and kept at
    the others, whose grids would cost each level its own factorisations), then at the others in
    full or, on many rows, on a sample of them, scaled by the ratio of the whole layer's
    error to the sample's at `nearest` (a fifth of the work on ResNet-50's 512-row layers). obc's
    other levels reuse the removal orders found at the first, so only sweeps are sampled. Returns
    the factorisations (per group) that solving an estimated level in full would use, if any is."""
    w, levels = curve.work, curve.levels
    memos = [{} for _ in range(problem.old.shape[0])]
    solved = solve_groups(problem, levels[nearest], config, w.nm, w.layer.name, memos)
    curve.damps = solved.damps
    _keep(curve, nearest, problem, solved)
    others = [j for j in range(1, len(levels)) if j != nearest]
    g, rows, cols = problem.old.shape
    reuses = resolve(config.method, g, rows, cols + (problem.old_b is not None)).name == "obc"
    sample = (None if w.nm is not None or reuses or not others
              else row_sample(problem, max(ESTIMATE_ROWS, rows // ESTIMATE_SHARE)))
    if sample is None:
        for j in others:
            _keep(curve, j, problem, solve_groups(problem, levels[j], config, w.nm, w.layer.name, memos, curve.damps))
        return None
    # the factorisations of H at the damps kept carry over to the sample; other rows' removal orders do not
    shared = [{k: v for k, v in m.items() if k[0] in FACTORISATIONS and k[1] == d} for m, d in zip(memos, curve.damps)]
    del memos
    errors = {j: _error(sample, solve_groups(sample, levels[j], config, None, w.layer.name, shared, curve.damps))
              for j in [nearest] + others}
    scale = curve.layer_errors[nearest] / errors[nearest] if errors[nearest] > 0 else rows / sample.old.shape[1]
    for j in others:
        curve.layer_errors[j] = errors[j] * scale
        curve.removed[j] = removal_count(problem, levels[j])
    return shared


def _keep(curve: Curve, j: int, problem, solved: Solved) -> None:
    curve.removed[j] = int(solved.pruned.sum())
    curve.layer_errors[j] = _error(problem, solved)
    curve.solved[j] = solved


def _settle(curve: Curve, j: int, config) -> None:
    """Level j solved in full if it was only estimated (its exact error replacing the estimate)."""
    if not curve.estimated(j):
        return
    problem, memos = _problem(curve)
    _keep(curve, j, problem, solve_groups(problem, curve.levels[j], config, None, curve.work.layer.name, memos,
                                          curve.damps))


def _problem(curve: Curve) -> tuple:
    """(problem, memos): those kept for the curve, or the layer prepared again (no memos)."""
    return curve.kept or (prepare(curve.collector), None)


def _keep_within(curves: list[Curve], curve: Curve, kept: tuple) -> None:
    """Keep this curve's problem if SETTLE_BYTES allows, giving up those of narrower layers kept
    before if need be: a factorisation costs cols^3 to make again and holds cols^2 bytes, so the
    widest layers are the ones worth keeping."""
    need, cols = _bytes(*kept), kept[0].old.shape[2]
    held = sorted((c for c in curves if c.kept is not None), key=lambda c: c.kept[0].old.shape[2])
    size = {id(c): _bytes(*c.kept) for c in held}
    used = sum(size.values())
    narrower = [c for c in held if c.kept[0].old.shape[2] < cols]
    if used + need - sum(size[id(c)] for c in narrower) > SETTLE_BYTES:
        return
    for c in narrower:
        if used + need <= SETTLE_BYTES:
            break
        used -= size[id(c)]
        c.kept = None
    curve.kept = kept


def _bytes(problem, memos: list) -> int:
    """About what keeping a problem and its factorisations holds: the weights and the objectives'
    copies of them, H (and the objectives' float32 casts of it), and each factorisation."""
    arrays = [problem.old, problem.hessians[0]] + [a for o in problem.objectives for a in (o.w_old, o.hp)]
    return sum({id(a): a.nbytes for a in arrays + _arrays(memos)}.values())


def _arrays(obj) -> list:
    """The numpy arrays an object holds (in containers and dataclass fields)."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif hasattr(obj, "__dict__"):
        obj = list(vars(obj).values())
    return [a for v in obj for a in _arrays(v)] if isinstance(obj, (list, tuple)) else []


def choose(curves: list[Curve], wanted: int, probe, model, config, uniform: float | None = None) -> OutputAllocation:
    """Levels of least predicted output error that remove at least `wanted` weights, made again
    with the chosen levels measured; then every choice made, and the uniform one, measured on the
    whole pruned model, the best kept. Single-layer errors add up only roughly (ResNet's
    streams and a recogniser's recurrent tail do not), so the sum only proposes."""
    bar = tqdm(desc="allocating by output", unit="probe", disable=None if config.progress else True,
               file=sys.stderr, leave=False)
    tried, chosen, rounds = [], None, 0
    for rounds in range(1, MAX_ROUNDS + 1):
        options = [list(zip(c.removed, c.predicted())) for c in curves]
        chosen = cheapest_choice(options, float(wanted))
        for c, j in zip(curves, chosen):
            if j and j not in c.measured:
                _settle(c, j, config)
                c.measured[j] = _probe(probe, model, c.work.layer, c.solved[j])
                bar.update(1)
        if chosen in tried:
            break
        tried.append(chosen)
    uniform = None if uniform is None else _uniform(curves, wanted, uniform)
    candidates = tried + ([uniform] if uniform is not None and uniform not in tried else [])
    confirmed = []
    for ch in candidates:
        for c, j in zip(curves, ch):  # (chosen levels are solved by now; the uniform one was first)
            _settle(c, j, config)
        confirmed.append(math.sqrt(max(_probe_all(probe, model, curves, ch), 0.0)))
        bar.update(1)
    bar.close()

    def total(ch):
        return sum(c.measured.get(j, 0.0) for c, j in zip(curves, ch))
    pick = min(range(len(candidates)), key=lambda i: confirmed[i])
    best = list(candidates[pick])
    _trim(curves, best, wanted, probe, model, config)
    probes = sum(len(c.measured) for c in curves) + len(candidates)
    labels = [f"round {r}" for r in range(1, len(tried) + 1)] + (["uniform"] if len(candidates) > len(tried) else [])
    return OutputAllocation(best, rounds, probes, [math.sqrt(total(ch)) for ch in tried],
                            dict(zip(labels, confirmed)), labels[pick])


def _uniform(curves: list[Curve], wanted: int, target: float) -> list[int] | None:
    """Every layer at the uniform level, if each has it and together they remove about `wanted`
    (not under N:M, where all layers taking the pattern removes more than asked)."""
    chosen = [next((j for j, s in enumerate(c.levels) if j and abs(s - target) < 1e-6), None) for c in curves]
    if None in chosen:
        return None
    removed = sum(c.removed[j] for c, j in zip(curves, chosen))
    return chosen if abs(removed - wanted) <= len(curves) else None


def _trim(curves: list[Curve], chosen: list[int], wanted: int, probe, model, config) -> None:
    """The levels are discrete, so the choice may remove more than asked: the layer whose last step
    costs the most output error per weight gives the excess back, solved again at its exact count
    (added to its curve as a level of its own, and chosen)."""
    excess = sum(c.removed[j] for c, j in zip(curves, chosen)) - wanted
    if excess <= 0:
        return
    cands = [(i, c, j) for i, (c, j) in enumerate(zip(curves, chosen))
             if j and c.removed[j] - excess > c.removed[j - 1]]
    if not cands:
        return

    def slope(item):
        _, c, j = item
        pred = c.predicted()
        return (pred[j] - pred[j - 1]) / max(c.removed[j] - c.removed[j - 1], 1)
    i, c, j = max(cands, key=slope)
    level = (c.removed[j] - excess) / (c.solved[j].pruned.size)
    problem, memos = _problem(c)
    solved = solve_groups(problem, level, config, c.work.nm, c.work.layer.name, memos, c.solved[j].damps)
    c.levels.insert(j, level)
    c.removed.insert(j, int(solved.pruned.sum()))
    c.layer_errors.insert(j, _error(problem, solved))
    c.solved.insert(j, solved)
    c.measured = {(k + 1 if k >= j else k): e for k, e in c.measured.items()}
    c.measured[j] = _probe(probe, model, c.work.layer, solved)
    chosen[i] = j


def _probe_all(probe, model, curves: list[Curve], chosen: list[int]) -> float:
    """The output error of the model with every layer at its chosen level at once."""
    return _probe_with(probe, model, [(c.work.layer, c.solved[j]) for c, j in zip(curves, chosen) if j])


def _error(problem, solved: Solved) -> float:
    return sum(problem.objectives[k].error(problem.augmented(solved.new, solved.new_b, k))
               for k in range(problem.old.shape[0]))


def _probe(probe, model, layer, solved: Solved) -> float:
    """The output error of the model with this layer alone as solved, on the cheaper sample."""
    return _probe_with(probe, model, [(layer, solved)], probe.single)


def _value_names(layer) -> list[str]:
    """The names of the values that hold the layer's weight and bias (initializers, or Constant
    nodes' outputs): what the probe may feed it in place of writing them."""
    return [t.value.name for t in (layer.weight, layer.bias) if t is not None]


def _probe_with(probe, model, written: list, feeds: int | None = None) -> float:
    """probe.error with each (layer, solved) written, their dense tensors restored after (fed to
    the probe's overridable session instead where it can take them)."""
    if probe.can_feed({n for layer, _ in written for n in _value_names(layer)}):
        tensors = {}
        for layer, solved in written:
            weight, bias, _ = stored_tensors(layer, solved)
            tensors[layer.weight.value.name] = weight
            if bias is not None:
                tensors[layer.bias.value.name] = bias
        measured = probe.error_with(model, tensors, feeds)
        if measured is not None:
            return measured
    saved = [(layer, layer.read(), layer.read_bias()) for layer, _ in written]
    try:
        for layer, solved in written:
            write_back(layer, solved)
        return probe.error(model, feeds)
    finally:
        for layer, weight, bias in saved:
            write_tensor(layer.weight, weight)
            if bias is not None:
                write_tensor(layer.bias, bias)
