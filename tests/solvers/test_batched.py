"""The stacked solves of many small groups against the per-matrix solvers and slow references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnx_lobs.hessian import layer_error
from onnx_lobs.solvers import SOLVERS, Target, batched

from .common import correlated_samples, damped_matrix, hessian_of


def stack(rng, groups, rows, cols, n=200, dead=()):
    """Weights [g, rows, cols] and sample-built Hessians [g, cols, cols] of varied scales, with
    the listed (group, column) inputs dead."""
    xs = [correlated_samples(rng, n, cols) * rng.uniform(0.2, 3.0) for _ in range(groups)]
    for g, c in dead:
        xs[g][:, c] = 0.0
    w = rng.standard_normal((groups, rows, cols))
    return w, np.stack([hessian_of(x) for x in xs])


def refit(w_row, hd, removed):
    """The least-squares refit of one row with `removed` zeroed: argmin (w'-w) Hd (w'-w)^T."""
    keep = ~removed
    new = np.zeros_like(w_row)
    new[keep] = w_row[keep] + np.linalg.solve(hd[np.ix_(keep, keep)], hd[np.ix_(keep, removed)] @ w_row[removed])
    return new


@pytest.mark.parametrize("method", batched.METHODS)
@pytest.mark.parametrize("bias", [False, True])
def test_one_group_equals_the_per_matrix_solver(method, bias):
    rng = np.random.default_rng(1 + bias)
    w, h = stack(rng, 1, 5, 12, dead=[(0, 3)])
    removable = np.ones(12, bool)
    if bias:
        removable[-1] = False
    n = 27
    got = batched.SOLVE[method](w, h, [n], removable, 0.01)
    spec = SOLVERS[method]
    ref = spec.solve(w[0], h[0], Target(n_prune=n, protect=~removable, damp=0.01), **spec.options)
    np.testing.assert_array_equal(got.pruned[0], ref.pruned)
    np.testing.assert_allclose(got.weights[0], ref.weights, rtol=1e-9, atol=1e-12)
    assert got.predicted == pytest.approx(ref.predicted_loss, rel=1e-9)
    assert got.damp == ref.damp


@pytest.mark.parametrize("method", batched.METHODS)
def test_many_groups_meet_their_counts_and_protect_the_bias(method):
    rng = np.random.default_rng(3)
    w, h = stack(rng, 9, 2, 6, dead=[(4, 0), (4, 2)])
    removable = np.r_[np.ones(5, bool), [False]]
    counts = [5, 4, 4, 4, 4, 4, 4, 4, 4]
    sol = batched.SOLVE[method](w, h, counts, removable, 0.01)
    assert sol.pruned.sum(axis=(1, 2)).tolist() == counts
    assert not sol.pruned[:, :, -1].any()
    assert np.all(sol.weights[sol.pruned] == 0.0)
    assert sol.pruned[4, :, [0, 2]].all()  # dead inputs go first: they cost nothing


@pytest.mark.parametrize("method", batched.METHODS)
def test_each_group_is_solved_as_if_alone(method):
    rng = np.random.default_rng(6)
    w, h = stack(rng, 8, 2, 9)
    removable = np.ones(9, bool)
    counts = [0, 1, 3, 5, 9, 12, 17, 18]
    sol = batched.SOLVE[method](w, h, counts, removable, 0.01)
    for g in range(8):
        one = batched.SOLVE[method](w[g:g + 1], h[g:g + 1], [counts[g]], removable, 0.01)
        np.testing.assert_array_equal(sol.pruned[g], one.pruned[0])
        np.testing.assert_allclose(sol.weights[g], one.weights[0], rtol=1e-9, atol=1e-12)


def test_obc_rows_are_least_squares_refits_of_their_masks():
    """Every row of the stacked obc is the exact refit of what it removed, with its own group's
    damped Hessian, and its predicted loss is the damped error it reached."""
    rng = np.random.default_rng(4)
    w, h = stack(rng, 6, 3, 7)
    removable = np.ones(7, bool)
    sol = batched.obc(w, h, [8, 9, 8, 9, 8, 8], removable, 0.01)
    predicted = 0.0
    for g in range(6):
        hd, _, _ = damped_matrix(h[g], 0.01)
        for r in range(3):
            ref = refit(w[g, r], hd, sol.pruned[g, r])
            np.testing.assert_allclose(sol.weights[g, r], ref, rtol=1e-9, atol=1e-11)
            predicted += layer_error(w[g, r][None], ref[None], hd)
    assert sol.predicted == pytest.approx(predicted, rel=1e-8)


def test_obc_row_sequences_are_the_exact_greedy():
    """One row per group: each group's removals in order are the brute-force greedy's, which
    re-inverts the damped Hessian on what remains at every step."""
    rng = np.random.default_rng(5)
    w, h = stack(rng, 4, 1, 6)
    removable = np.ones(6, bool)
    for g in range(4):
        hd, _, _ = damped_matrix(h[g], 0.01)
        cur, remaining, costs = w[g, 0].copy(), list(range(6)), []
        for _ in range(6):
            inv = np.linalg.inv(hd[np.ix_(remaining, remaining)])
            i = int(np.argmin(cur[remaining] ** 2 / np.diagonal(inv)))
            costs.append(0.5 * cur[remaining[i]] ** 2 / inv[i, i])
            cur[remaining] -= cur[remaining[i]] / inv[i, i] * inv[i]
            remaining.pop(i)
        for k in range(1, 6):  # with k removals allowed, a lone row takes them in order
            one = batched.obc(w[g:g + 1], h[g:g + 1], [k], removable, 0.01)
            assert one.predicted == pytest.approx(sum(costs[:k]), rel=1e-8)


def test_sparsegpt_mask_is_each_groups_smallest_scores():
    """Each group's stacked mask is its smallest w^2 / U_jj^2, by brute force."""
    rng = np.random.default_rng(7)
    w, h = stack(rng, 5, 2, 4)
    counts = [3, 2, 3, 0, 8]
    sol = batched.sparsegpt(w, h, counts, np.ones(4, bool), 0.1)
    for g in range(5):
        hd, _, _ = damped_matrix(h[g], 0.1)
        scores = []
        for r, c in itertools.product(range(2), range(4)):
            # U_cc^2 = 1 / [(Hd restricted to columns c..)^-1]_00: the Schur form
            tail = np.linalg.inv(hd[c:, c:])
            scores.append((w[g, r, c] ** 2 / tail[0, 0], (r, c)))
        chosen = {k for _, k in sorted(scores)[:counts[g]]}
        assert chosen == {tuple(i) for i in np.argwhere(sol.pruned[g])}


def test_dampening_is_raised_for_the_whole_layer_when_a_group_will_not_factor():
    rng = np.random.default_rng(8)
    w, h = stack(rng, 3, 2, 5)
    x = rng.standard_normal((50, 2))
    h[1] = hessian_of(np.c_[x, x, x[:, :1]])  # rank 2 of 5: needs dampening to factor
    sol = batched.obc(w, h, [3, 4, 3], np.ones(5, bool), 0.0)
    assert sol.damp > 0 and sol.notes and int(sol.pruned.sum()) == 10


@pytest.mark.parametrize("method,groups,rows,cols,fits", [
    ("sparsegpt", 384, 1, 10, True), ("obc", 384, 1, 10, True), ("sparsegpt", 1, 64, 10, False),
    ("sparsegpt", 8, 4, 200, False), ("lobs", 384, 1, 10, False), ("obc", 64, 64, 100, False)])
def test_fits(method, groups, rows, cols, fits):
    assert batched.fits(method, groups, rows, cols) is fits
