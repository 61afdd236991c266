"""OBC (exact greedy OBS per row) against slow, obviously-correct references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnx_lobs.hessian import layer_error
from onnx_lobs.solvers import Target, lobs, obc

from .common import (bias_protect, check_invariants, contiguous_groups, conv_groups,
                     correlated_samples, damped_matrix, hessian_of, n_removable, output_error)


# --- the reference: re-invert H restricted to what remains, at every step ---------------------

def reference_row_sequence(w_row, hd, dead, removable, steps, groups=None, keep=0):
    """One row's greedy: at each step invert Hd on the remaining weights from scratch, take the
    eligible weight with the smallest w_q^2 / (2 G_qq) (dead inputs cost 0; ties: lowest
    column), refit. Returns the removed columns, their losses, and the state after each step."""
    cols = len(w_row)
    cur = np.array(w_row, dtype=np.float64)
    remaining = list(range(cols))
    removed = []
    losses, states = [], [cur.copy()]
    for _ in range(steps):
        g = np.linalg.inv(hd[np.ix_(remaining, remaining)])
        best = None
        for i, q in enumerate(remaining):
            if not removable[q]:
                continue
            if groups is not None:
                grp = [gr for gr in groups if q in gr]
                if not grp or sum(c not in removed for c in grp[0]) <= keep:
                    continue
            cost = 0.0 if dead[q] else cur[q] ** 2 / (2.0 * g[i, i])
            if best is None or cost < best[0]:
                best = (cost, i, q)
        cost, i, q = best
        cur[remaining] -= cur[q] / g[i, i] * g[:, i]
        cur[q] = 0.0
        remaining.remove(q)
        removed.append(q)
        cur[removed] = 0.0
        losses.append(cost)
        states.append(cur.copy())
    return removed, losses, states


def reference_obc(w, h, damp=0.01, protect=None, n_prune=None, max_loss=None, nm=None, nm_keep=0):
    """Every row's full sequence, then the layer-wide greedy: repeatedly take the row whose next
    removal is cheapest (ties: lowest row) until n_prune, or until the next would pass max_loss."""
    hd, dead, used = damped_matrix(h, damp)
    rows, cols = w.shape
    removable = np.ones(cols, bool) if protect is None else ~np.asarray(protect)
    if nm is not None:
        groups = [list(g) for g in np.asarray(nm)]
        steps = len(groups) * max(len(groups[0]) - nm_keep, 0)
        seqs = [reference_row_sequence(w[r], hd, dead, removable, steps, groups, nm_keep)
                for r in range(rows)]
        counts = [steps] * rows
    else:
        steps = int(removable.sum())
        seqs = [reference_row_sequence(w[r], hd, dead, removable, steps) for r in range(rows)]
        counts = [0] * rows
        total = 0.0
        while True:
            heads = [(seqs[r][1][counts[r]], r) for r in range(rows) if counts[r] < steps]
            if not heads or (n_prune is not None and sum(counts) >= n_prune):
                break
            cost, r = min(heads)
            if n_prune is None and total + cost > max_loss * (1 + 1e-12):
                break
            total += cost
            counts[r] += 1
    new = np.array([seqs[r][2][counts[r]] for r in range(rows)])
    pruned = np.zeros(w.shape, bool)
    for r in range(rows):
        pruned[r, seqs[r][0][:counts[r]]] = True
    predicted = sum(sum(seqs[r][1][:counts[r]]) for r in range(rows))
    return new, pruned, predicted, used


def _random_case(seed, max_rows=5, max_cols=12):
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, max_rows + 1))
    cols = int(rng.integers(2, max_cols + 1))
    x = correlated_samples(rng, int(rng.integers(2 * cols, 5 * cols)), cols)
    w = rng.standard_normal((rows, cols)) * np.exp(rng.normal(0.0, 1.0, size=(rows, 1)))
    protect = None
    if rng.random() < 0.5:
        x[:, -1] = 1.0
        protect = bias_protect(cols)
    if cols > 3 and rng.random() < 0.3:
        x[:, int(rng.integers(0, cols - 1))] = 0.0  # a dead input
    damp = float(rng.choice([0.0, 1e-3, 0.01, 0.1]))
    return w, hessian_of(x), protect, damp, rng


def _assert_matches(sol, ref):
    new, pruned, predicted, used = ref
    np.testing.assert_array_equal(sol.pruned, pruned)
    scale = max(1.0, float(np.abs(new).max()))
    np.testing.assert_allclose(sol.weights, new, rtol=0, atol=1e-9 * scale)
    assert sol.predicted_loss == pytest.approx(predicted, rel=1e-8, abs=1e-12)
    assert sol.damp == used


@pytest.mark.parametrize("seed", range(40))
def test_n_prune_matches_reference(seed):
    w, h, protect, damp, rng = _random_case(seed)
    n_prune = int(rng.integers(0, n_removable(w, protect) + 1))
    sol = obc.solve(w, h, Target(n_prune=n_prune, protect=protect, damp=damp))
    check_invariants(sol, w, protect, expected_count=n_prune)
    _assert_matches(sol, reference_obc(w, h, damp, protect, n_prune=n_prune))


@pytest.mark.parametrize("seed", range(15))
def test_max_loss_matches_reference(seed):
    w, h, protect, damp, rng = _random_case(200 + seed)
    full = reference_obc(w, h, damp, protect, max_loss=np.inf)[2]
    for budget in (0.0, float(rng.uniform(0, 0.3)) * full, float(rng.uniform(0.3, 1.0)) * full, 2 * full + 1):
        sol = obc.solve(w, h, Target(max_loss=budget, protect=protect, damp=damp))
        check_invariants(sol, w, protect)
        _assert_matches(sol, reference_obc(w, h, damp, protect, max_loss=budget))
        # The summed losses are exact on the damped H, which bounds the error on H itself.
        assert layer_error(w, sol.weights, h) <= budget * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "2:4conv", "1:3"])
def test_nm_matches_reference(seed, pattern):
    rng = np.random.default_rng(seed)
    keep, m = int(pattern[0]), int(pattern[2])
    if pattern.endswith("conv"):
        channels, kernel = 8, 2
        groups = conv_groups(channels, kernel, m)
        cols = channels * kernel + 1  # + bias
    else:
        cols = 3 * m + 2  # two columns in no group, the last one the bias
        groups = contiguous_groups(cols - 2, m)
    x = correlated_samples(rng, 5 * cols, cols)
    x[:, -1] = 1.0
    protect = bias_protect(cols)
    w = rng.standard_normal((3, cols))
    damp = float(rng.choice([0.0, 0.01]))
    target = Target(n_prune=1, max_loss=0.0, protect=protect, damp=damp, nm=groups, nm_keep=keep)
    sol = obc.solve(w, hessian_of(x), target)
    check_invariants(sol, w, protect, nm=groups, nm_keep=keep)
    _assert_matches(sol, reference_obc(w, hessian_of(x), damp, protect, nm=groups, nm_keep=keep))


# --- (a) each step is the least-squares optimum given what was removed -------------------------

@pytest.mark.parametrize("seed", range(6))
def test_each_step_is_the_least_squares_optimum(seed):
    rng = np.random.default_rng(seed)
    n, cols = 120, 8
    x = correlated_samples(rng, n, cols)
    x[:, -1] = 1.0
    protect = bias_protect(cols)
    w = rng.standard_normal((1, cols))
    h = hessian_of(x)
    y = x @ w[0]

    def refit(removed):
        keep = [j for j in range(cols) if j not in removed]
        coef = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        out = np.zeros(cols)
        out[keep] = coef
        return out

    previous = set()
    for c in range(1, cols):
        sol = obc.solve(w, h, Target(n_prune=c, protect=protect, damp=0.0))
        removed = set(np.flatnonzero(sol.pruned[0]))
        assert previous < removed and len(removed) == c  # one more, the earlier ones kept
        (q,) = removed - previous
        # The weight chosen is the one whose removal (with the best refit) costs least ...
        errs = {j: output_error(x, w, refit(previous | {j})[None, :])
                for j in range(cols - 1) if j not in previous}
        assert errs[q] == pytest.approx(min(errs.values()), rel=1e-9, abs=1e-12)
        # ... the weights are that refit, and the summed losses are the measured error.
        np.testing.assert_allclose(sol.weights[0], refit(removed), rtol=1e-8, atol=1e-9)
        assert sol.predicted_loss == pytest.approx(output_error(x, w, sol.weights), rel=1e-8)
        previous = removed


# --- (c) against the exhaustive optimum and against L-OBS ----------------------------------------

def exhaustive_optimum(w, h, k, removable):
    """Smallest layer error with exactly k removals among removable weights, each row refit
    optimally (least squares on H), by trying every mask of every row and combining rows."""
    rows, cols = w.shape
    cand = np.flatnonzero(removable)
    best_per_row = []  # best_per_row[r][c]: smallest error of row r with c removals
    for r in range(rows):
        best = [np.inf] * (len(cand) + 1)
        for c in range(len(cand) + 1):
            for q in itertools.combinations(cand, c):
                s = [j for j in range(cols) if j not in q]
                q = list(q)
                if q:
                    dq = -w[r, q]
                    # optimal dS: minimise d^T H d with d_Q = -w_Q
                    ds = -np.linalg.solve(h[np.ix_(s, s)], h[np.ix_(s, q)] @ dq) if s else np.zeros(0)
                    d = np.zeros(cols)
                    d[q], d[s] = dq, ds
                    err = 0.5 * d @ h @ d
                else:
                    err = 0.0
                best[c] = min(best[c], err)
        best_per_row.append(best)
    # combine rows: DP over the number removed so far
    table = {0: 0.0}
    for best in best_per_row:
        nxt = {}
        for done, err in table.items():
            for c, e in enumerate(best):
                if done + c <= k:
                    nxt[done + c] = min(nxt.get(done + c, np.inf), err + e)
        table = nxt
    return table[k]


def test_against_exhaustive_optimum_and_lobs():
    rng = np.random.default_rng(2024)
    cases = equal = obc_le_lobs = 0
    worst_gap = 0.0
    for _ in range(60):
        rows, cols = int(rng.integers(1, 4)), int(rng.integers(3, 7))
        x = rng.standard_normal((60, 1)) + 0.5 * rng.standard_normal((60, cols))  # correlated
        h = hessian_of(x)
        w = rng.standard_normal((rows, cols))
        k = int(rng.integers(1, rows * cols))
        opt = exhaustive_optimum(w, h, k, np.ones(cols, bool))
        by_obc = obc.solve(w, h, Target(n_prune=k, damp=0.0))
        by_lobs = lobs.solve(w, h, Target(n_prune=k, damp=0.0))
        e_obc = layer_error(w, by_obc.weights, h)
        e_lobs = layer_error(w, by_lobs.weights, h)
        assert by_obc.pruned.sum() == k
        assert e_obc >= opt * (1 - 1e-9) - 1e-12  # nothing beats the exhaustive optimum
        assert by_obc.predicted_loss == pytest.approx(e_obc, rel=1e-8, abs=1e-12)
        cases += 1
        equal += e_obc <= opt * (1 + 1e-9) + 1e-12
        obc_le_lobs += e_obc <= e_lobs * (1 + 1e-9) + 1e-12
        worst_gap = max(worst_gap, e_obc / opt if opt > 0 else 1.0)
    print(f"OBC optimal in {equal}/{cases}, OBC <= L-OBS in {obc_le_lobs}/{cases}, "
          f"worst OBC/opt {worst_gap:.3f}")
    # Greedy is not always optimal, but on such small problems it nearly always is. Neither is
    # it a theorem that it beats L-OBS (stale H^-1, no refit): a different greedy path can land
    # on a better set (1 in 150 on harder random problems), but it nearly always does.
    assert equal >= 0.8 * cases
    assert obc_le_lobs >= 0.9 * cases


# --- odds and ends -------------------------------------------------------------------------------

def test_rows_in_blocks_and_lazy_panels_do_not_change_the_result():
    rng = np.random.default_rng(9)
    cols = 40
    x = correlated_samples(rng, 200, cols)
    h = hessian_of(x)
    w = rng.standard_normal((7, cols))
    base = obc.solve(w, h, Target(n_prune=150))
    from onnx_lobs.hessian import damped_inverse
    from onnx_lobs.hessian import damped_hessian
    inv = damped_inverse(h, 0.01)
    hd, _ = damped_hessian(h, inv.damp)
    rules = obc._Rules(cols, np.ones(cols, bool))
    free, floor = inv.dead, 1 / np.diagonal(hd)
    q0, l0 = obc.removal_sequences(w, inv.hinv, free, floor, rules, cols)
    for stack, lazy in [(8 * cols * cols, 1), (8 * cols * cols * 3, 5), (10 ** 9, 7), (10 ** 9, 64)]:
        q, l = obc.removal_sequences(w, inv.hinv, free, floor, rules, cols, stack_bytes=stack, lazy=lazy)
        np.testing.assert_array_equal(q, q0)
        np.testing.assert_allclose(l, l0, rtol=1e-9, atol=1e-14)
    assert base.pruned.sum() == 150


def test_single_precision_stack_for_wide_layers_matches_double(monkeypatch):
    # Wide layers keep the G stack in float32 (half the memory traffic of the downdates); the
    # final weights are refitted in float64 from the removed set, so only the order can move.
    rng = np.random.default_rng(21)
    cols, rows = 160, 12
    x = correlated_samples(rng, 600, cols)
    h = hessian_of(x)
    w = rng.standard_normal((rows, cols))
    from onnx_lobs.hessian import damped_inverse
    from onnx_lobs.hessian import damped_hessian
    inv = damped_inverse(h, 0.01)
    hd, _ = damped_hessian(h, inv.damp)
    rules = obc._Rules(cols, np.ones(cols, bool))
    args = (w, inv.hinv, inv.dead, 1 / np.diagonal(hd), rules, cols // 2)
    q64, l64 = obc.removal_sequences(*args, dtype=np.float64)
    q32, l32 = obc.removal_sequences(*args, dtype=np.float32)
    same = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(q64, q32)])
    assert same > 0.97
    np.testing.assert_allclose(l32.sum(axis=1), l64.sum(axis=1), rtol=1e-3)
    double = obc.solve(w, h, Target(n_prune=rows * cols // 2))
    monkeypatch.setattr(obc, "SINGLE_COLS", 16)
    single = obc.solve(w, h, Target(n_prune=rows * cols // 2))
    assert single.pruned.sum() == double.pruned.sum()
    e32, e64 = layer_error(w, single.weights, h), layer_error(w, double.weights, h)
    assert e32 == pytest.approx(e64, rel=1e-3)
    assert single.predicted_loss == pytest.approx(double.predicted_loss, rel=1e-3)


def test_rows_end_with_different_counts():
    rng = np.random.default_rng(4)
    x = correlated_samples(rng, 100, 10)
    w = rng.standard_normal((4, 10)) * np.array([[0.01], [1.0], [10.0], [0.1]])
    sol = obc.solve(w, hessian_of(x), Target(n_prune=20))
    counts = sol.pruned.sum(axis=1)
    assert counts.sum() == 20 and len(set(counts)) > 1
    assert counts[0] > counts[2]


def test_rows_needing_more_than_the_first_pass_are_redone():
    rng = np.random.default_rng(12)
    cols = 40
    x = correlated_samples(rng, 200, cols)
    w = rng.standard_normal((6, cols))
    w[3] *= 1e-3  # this row should take far more than its share (the first pass computes 2*5+8)
    h = hessian_of(x)
    sol = obc.solve(w, h, Target(n_prune=30))
    assert sol.pruned[3].sum() > 18
    _assert_matches(sol, reference_obc(w, h, 0.01, None, n_prune=30))


def test_ties_go_to_the_lowest_column():
    # Uncorrelated inputs of equal power and equal |w|: every removal costs the same and
    # compensates nothing, so the order is the tie rule: lowest column first.
    h = np.eye(5)
    w = np.array([[1.0, -1.0, 1.0, -1.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    for k in range(1, 6):
        sol = obc.solve(w, h, Target(n_prune=k, damp=0.0))
        np.testing.assert_array_equal(np.flatnonzero(sol.pruned[0]), np.arange(k))
    # Dead inputs all cost 0: the lowest goes first.
    x = correlated_samples(np.random.default_rng(0), 50, 6)
    x[:, [1, 4]] = 0.0
    sol = obc.solve(np.ones((1, 6)), hessian_of(x), Target(n_prune=1))
    np.testing.assert_array_equal(np.flatnonzero(sol.pruned[0]), [1])


def test_solves_at_several_counts_sharing_a_memo_equal_fresh_ones():
    """The memo keeps the removal sequences (extended when a later count needs more of them)."""
    rng = np.random.default_rng(13)
    x = correlated_samples(rng, 200, 30)
    w = rng.standard_normal((5, 30))
    w[2] *= 1e-3
    h = hessian_of(x)
    memo = {}
    for n in (10, 120, 40, 140):  # a light count first: the later ones need longer sequences
        shared = obc.solve(w, h, Target(n_prune=n, memo=memo))
        fresh = obc.solve(w, h, Target(n_prune=n))
        np.testing.assert_array_equal(shared.pruned, fresh.pruned)
        np.testing.assert_allclose(shared.weights, fresh.weights, rtol=1e-12, atol=1e-14)
        assert shared.predicted_loss == pytest.approx(fresh.predicted_loss, rel=1e-12)
