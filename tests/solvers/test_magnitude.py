"""Magnitude pruning against brute-force references on small random problems."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs.hessian import layer_error
from onnx_lobs.solvers import Target, magnitude


def hessian_of(x: np.ndarray) -> np.ndarray:
    return x.T @ x / x.shape[0]


def bias_protect(cols: int) -> np.ndarray:
    protect = np.zeros(cols, dtype=bool)
    protect[-1] = True
    return protect


def reference_smallest(w: np.ndarray, protect, k: int) -> np.ndarray:
    """Mask of the k smallest |w| among removable entries (ties: row-major order), by sorting a list."""
    rows, cols = w.shape
    entries = [(abs(w[r, c]), r * cols + c, r, c) for r in range(rows) for c in range(cols)
               if protect is None or not protect[c]]
    entries.sort()
    mask = np.zeros(w.shape, dtype=bool)
    for _, _, r, c in entries[:k]:
        mask[r, c] = True
    return mask


def reference_max_loss(w, h, protect, max_loss):
    """The largest k whose exact layer error (k smallest |w| zeroed) is within max_loss."""
    n_removable = w.shape[0] * int(w.shape[1] - (0 if protect is None else protect.sum()))
    best = 0
    for k in range(n_removable + 1):
        mask = reference_smallest(w, protect, k)
        if layer_error(w, np.where(mask, 0.0, w), h) <= max_loss:
            best = k
    return best


def prefix_losses(w, h, protect):
    n_removable = w.shape[0] * int(w.shape[1] - (0 if protect is None else protect.sum()))
    return [layer_error(w, np.where(reference_smallest(w, protect, k), 0.0, w), h)
            for k in range(n_removable + 1)]


def correlated_problem(seed, rows=None, cols=None, bias=None, zeros=None):
    rng = np.random.default_rng(seed)
    rows = rows or int(rng.integers(1, 6))
    cols = cols or int(rng.integers(1, 10))
    n = 60
    # Strongly correlated inputs: removing two weights can cost less than removing one of them.
    x = rng.standard_normal((n, 1)) + 0.3 * rng.standard_normal((n, cols))
    bias = (cols > 1 and rng.random() < 0.5) if bias is None else bias
    protect = None
    if bias:
        x[:, -1] = 1.0
        protect = bias_protect(cols)
    w = rng.standard_normal((rows, cols))
    if zeros if zeros is not None else rng.random() < 0.3:
        w[rng.random(w.shape) < 0.2] = 0.0
    return w, hessian_of(x), x, protect, rng


# --- exact count --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(30))
def test_removes_exactly_the_n_smallest(seed):
    w, h, x, protect, rng = correlated_problem(seed)
    n_removable = w.shape[0] * int(w.shape[1] - (0 if protect is None else protect.sum()))
    for n_prune in sorted({0, 1, int(rng.integers(0, n_removable + 1)), n_removable, n_removable + 5}):
        w0 = w.copy()
        sol = magnitude.solve(w, h, Target(n_prune=n_prune, protect=protect))
        expected = reference_smallest(w, protect, n_prune)
        np.testing.assert_array_equal(sol.pruned, expected)
        assert sol.pruned.sum() == min(n_prune, n_removable)
        if protect is not None:
            assert not sol.pruned[:, protect].any()
        # No compensation: removed entries are exactly 0, all others are untouched.
        assert np.all(sol.weights[sol.pruned] == 0.0)
        np.testing.assert_array_equal(sol.weights[~sol.pruned], w[~sol.pruned])
        # The reported loss is the exact output error of the samples.
        measured = 0.5 * float(np.sum((x @ (sol.weights - w).T) ** 2)) / x.shape[0]
        assert sol.predicted_loss == pytest.approx(layer_error(w, sol.weights, h), rel=1e-12, abs=1e-15)
        assert sol.predicted_loss == pytest.approx(measured, rel=1e-8, abs=1e-12)
        np.testing.assert_array_equal(w, w0)


def test_without_hessian_the_loss_is_unknown():
    w = np.array([[0.3, -2.0, 0.1], [1.5, -0.05, 0.7]])
    sol = magnitude.solve(w, None, Target(n_prune=3))
    np.testing.assert_array_equal(sol.pruned, [[True, False, True], [False, True, False]])
    assert np.isnan(sol.predicted_loss)


def test_protected_column_is_never_removed_even_if_smallest():
    w = np.array([[1.0, 2.0, 1e-9], [3.0, 4.0, 0.0]])
    h = np.eye(3)
    sol = magnitude.solve(w, h, Target(n_prune=100, protect=bias_protect(3)))
    np.testing.assert_array_equal(sol.pruned, [[True, True, False], [True, True, False]])
    np.testing.assert_array_equal(sol.weights, [[0.0, 0.0, 1e-9], [0.0, 0.0, 0.0]])


# --- max_loss -----------------------------------------------------------------------------------

def _budgets(losses, rng, count=4):
    """0, 'everything', and values strictly between distinct prefix losses (no boundary ties)."""
    levels = np.unique(np.round(losses, 12))
    mids = [0.5 * (a + b) for a, b in zip(levels[:-1], levels[1:]) if b - a > 1e-9]
    picks = list(rng.choice(mids, size=min(count, len(mids)), replace=False)) if mids else []
    return [0.0, *picks, 2.0 * max(losses) + 1.0]


@pytest.mark.parametrize("seed", range(40))
def test_max_loss_is_the_largest_k_within_budget(seed):
    w, h, _, protect, rng = correlated_problem(100 + seed)
    losses = prefix_losses(w, h, protect)
    for budget in _budgets(losses, rng):
        sol = magnitude.solve(w, h, Target(max_loss=float(budget), protect=protect))
        k = reference_max_loss(w, h, protect, budget)
        assert sol.pruned.sum() == k
        np.testing.assert_array_equal(sol.pruned, reference_smallest(w, protect, k))
        assert sol.predicted_loss <= budget
        assert np.all(sol.weights[sol.pruned] == 0.0)
        np.testing.assert_array_equal(sol.weights[~sol.pruned], w[~sol.pruned])


def test_max_loss_random_problems_include_non_monotone_losses():
    """The max_loss checks above are only meaningful if the loss sometimes drops as k grows."""
    dips = 0
    for seed in range(40):
        w, h, _, protect, _ = correlated_problem(100 + seed)
        losses = np.array(prefix_losses(w, h, protect))
        dips += bool(np.any(np.diff(losses) < -1e-9))
    assert dips >= 5


def test_max_loss_when_removing_more_costs_less():
    # Two identical inputs: w = [0.5, -0.6] outputs 0.5z - 0.6z = -0.1z. Zeroing the smaller
    # weight alone costs 0.5 * 0.25 E z^2, zeroing both only 0.5 * 0.01 E z^2.
    z = np.random.default_rng(0).standard_normal(50)
    x = np.stack([z, z], axis=1)
    h = hessian_of(x)
    w = np.array([[0.5, -0.6]])
    ez2 = float(np.mean(z * z))
    assert layer_error(w, np.array([[0.0, -0.6]]), h) == pytest.approx(0.125 * ez2)
    assert layer_error(w, np.zeros((1, 2)), h) == pytest.approx(0.005 * ez2)
    sol = magnitude.solve(w, h, Target(max_loss=0.05 * ez2))
    np.testing.assert_array_equal(sol.pruned, [[True, True]])
    assert sol.predicted_loss == pytest.approx(0.005 * ez2)
    sol = magnitude.solve(w, h, Target(max_loss=0.001 * ez2))
    assert not sol.pruned.any() and sol.predicted_loss == 0.0


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (3, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_max_loss_small_shapes(shape, bias):
    rows, cols = shape
    w, h, _, protect, rng = correlated_problem(sum(shape) + 10 * bias, rows=rows, cols=cols,
                                               bias=bias and cols > 1)
    if bias and cols == 1:
        protect = bias_protect(1)  # nothing removable
    losses = prefix_losses(w, h, protect)
    for budget in _budgets(losses, rng):
        sol = magnitude.solve(w, h, Target(max_loss=float(budget), protect=protect))
        assert sol.pruned.sum() == reference_max_loss(w, h, protect, budget)


def test_max_loss_with_already_zero_weights_and_dead_inputs():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6))
    x[:, 2] = 0.0
    h = hessian_of(x)
    w = rng.standard_normal((4, 6))
    w[0, 0] = w[3, 4] = 0.0
    # Budget 0: the zero weights cost nothing; the dead input's weights are not smallest in |w|.
    sol = magnitude.solve(w, h, Target(max_loss=0.0))
    assert sol.pruned.sum() == reference_max_loss(w, h, None, 0.0)
    assert sol.pruned[0, 0] and sol.pruned[3, 4]
    losses = prefix_losses(w, h, None)
    for budget in _budgets(losses, rng, count=8):
        sol = magnitude.solve(w, h, Target(max_loss=float(budget)))
        assert sol.pruned.sum() == reference_max_loss(w, h, None, budget)
