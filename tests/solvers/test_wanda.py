"""Wanda against brute-force references on small random problems."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs.hessian import layer_error
from onnx_lobs.solvers import Target, wanda

from .common import bias_protect, check_invariants, correlated_samples, hessian_of, n_removable


def reference_order(w, h, protect):
    """The documented order, by explicit rounds: in round t every row offers its t-th smallest
    |w| * sqrt(H_jj) (ties: lower column); a round's offers go by score, ties by row."""
    rows, cols = w.shape
    norms = np.sqrt(np.diagonal(h))
    per_row = []
    for r in range(rows):
        entries = [(abs(w[r, c]) * norms[c], c) for c in range(cols) if protect is None or not protect[c]]
        per_row.append(sorted(entries))
    order = []
    for t in range(len(per_row[0]) if rows else 0):
        offers = sorted((per_row[r][t][0], r, per_row[r][t][1]) for r in range(rows))
        order += [(r, c) for _, r, c in offers]
    return order


def reference_mask(w, h, protect, k, order=None):
    mask = np.zeros(w.shape, bool)
    for r, c in (order or reference_order(w, h, protect))[:k]:
        mask[r, c] = True
    return mask


def _case(seed):
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 6)), int(rng.integers(1, 10))
    x = correlated_samples(rng, 50, cols) * np.exp(rng.normal(0, 1.5, cols))  # varied scales
    protect = None
    if cols > 1 and rng.random() < 0.5:
        x[:, -1] = 1.0
        protect = bias_protect(cols)
    if cols > 2 and rng.random() < 0.3:
        x[:, 0] = 0.0
    return rng.standard_normal((rows, cols)), hessian_of(x), protect, rng


@pytest.mark.parametrize("seed", range(30))
def test_n_prune_is_the_balanced_order(seed):
    w, h, protect, rng = _case(seed)
    total = n_removable(w, protect)
    for k in sorted({0, 1, int(rng.integers(0, total + 1)), total, total + 3}):
        sol = wanda.solve(w, h, Target(n_prune=k, protect=protect))
        check_invariants(sol, w, protect, expected_count=min(k, total))
        assert sol.damp is None
        np.testing.assert_array_equal(sol.pruned, reference_mask(w, h, protect, k))
        np.testing.assert_array_equal(sol.weights[~sol.pruned], w[~sol.pruned])  # no compensation
        assert sol.predicted_loss == pytest.approx(layer_error(w, sol.weights, h), rel=1e-12, abs=1e-15)
        # Balanced: each row removes floor(k / rows) or one more.
        counts = sol.pruned.sum(axis=1)
        if k <= total:
            assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("seed", range(30))
def test_max_loss_is_the_largest_prefix_within_budget(seed):
    w, h, protect, rng = _case(100 + seed)
    total = n_removable(w, protect)
    order = reference_order(w, h, protect)
    losses = [layer_error(w, np.where(reference_mask(w, h, protect, k, order), 0.0, w), h)
              for k in range(total + 1)]
    levels = np.unique(losses)
    budgets = [0.0, 2 * max(losses) + 1] + [0.5 * (a + b) for a, b in zip(levels[:-1], levels[1:])][:4]
    for budget in budgets:
        sol = wanda.solve(w, h, Target(max_loss=float(budget), protect=protect))
        best = max(k for k in range(total + 1) if losses[k] <= budget)
        assert sol.pruned.sum() == best
        np.testing.assert_array_equal(sol.pruned, reference_mask(w, h, protect, best, order))
        assert sol.predicted_loss <= budget


def test_input_norm_matters():
    # Same |w| everywhere: the input with the smaller norm goes first.
    w = np.ones((2, 3))
    h = np.diag([4.0, 0.25, 1.0])
    sol = wanda.solve(w, h, Target(n_prune=2))
    np.testing.assert_array_equal(sol.pruned, [[False, True, False], [False, True, False]])
