"""Structured OBS against a least-squares refit: removing a block of columns costs exactly what
the best refit of the remaining columns loses, and the update is that refit."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs.solvers.channels import (View, block_costs, kept_count, magnitude_scores, obs_channels,
                                        rank_without_compensation, remove_block, wanda_scores)


def _problem(rng, rows=5, channels=6, m=3, n=400, bias=True):
    cols = channels * m
    x = rng.standard_normal((n, cols)) @ rng.standard_normal((cols, cols)) * 0.3 + rng.standard_normal(cols)
    if bias:
        x = np.c_[x, np.ones(n)]
    w = rng.standard_normal((rows, x.shape[1]))
    h = x.T @ x / n
    columns = np.arange(cols).reshape(channels, m)
    return x, w, h, columns


def _view(w, h, columns):
    return View(w.copy(), np.linalg.inv(h), h, columns)


def _refit(x, w, removed_cols):
    """The best W' with W'[:, removed] = 0 for the outputs X W^T, by least squares, and its error."""
    keep = np.setdiff1d(np.arange(x.shape[1]), removed_cols)
    y = x @ w.T
    sol, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
    new = np.zeros_like(w)
    new[:, keep] = sol.T
    err = 0.5 * np.sum((x @ new.T - y) ** 2) / x.shape[0]
    return new, err


@pytest.mark.parametrize("bias", [True, False])
def test_block_cost_and_update_match_a_refit(bias):
    rng = np.random.default_rng(0)
    x, w, h, columns = _problem(rng, bias=bias)
    view = _view(w, h, columns)
    costs = block_costs(view, np.ones(len(columns), bool)) * view.energy
    for c in range(len(columns)):
        new, err = _refit(x, w, columns[c])
        assert costs[c] == pytest.approx(err, rel=1e-8)
        one = _view(w, h, columns)
        remove_block(one, columns[c])
        np.testing.assert_allclose(one.w, new, atol=1e-8)


def test_greedy_removals_add_up_to_the_refit_error_of_the_final_set():
    rng = np.random.default_rng(1)
    x, w, h, columns = _problem(rng, channels=7)
    view = _view(w, h, columns)
    chosen = obs_channels([view], 4)
    removed_cols = columns[chosen.removed].ravel()
    new, err = _refit(x, w, removed_cols)
    assert sum(chosen.costs) * view.energy == pytest.approx(err, rel=1e-7)
    np.testing.assert_allclose(chosen.weights[0], new, atol=1e-7)
    assert len(set(chosen.removed)) == 4


def test_the_first_greedy_pick_is_the_cheapest_over_all_consumers():
    rng = np.random.default_rng(2)
    problems = [_problem(rng, rows=r, channels=5, m=m) for r, m in ((4, 2), (3, 1))]
    views = [_view(w, h, c) for _, w, h, c in problems]
    # the exact joint cost of removing each channel: the refit errors, each over its energy
    exact = [sum(_refit(x, w, c[k])[1] / View(w, np.linalg.inv(h), h, c).energy for x, w, h, c in problems)
             for k in range(5)]
    chosen = obs_channels(views, 1)
    assert chosen.removed[0] == int(np.argmin(exact))
    assert chosen.costs[0] == pytest.approx(min(exact), rel=1e-8)


def test_without_compensation_only_the_removed_columns_change():
    rng = np.random.default_rng(3)
    _, w, h, columns = _problem(rng)
    view = _view(w, h, columns)
    scores = np.array([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])
    chosen = rank_without_compensation(scores, [view], 2)
    assert chosen.removed == [3, 1]
    expect = w.copy()
    expect[:, columns[[1, 3]].ravel()] = 0
    np.testing.assert_array_equal(chosen.weights[0], expect)


def test_scores():
    rng = np.random.default_rng(4)
    _, w, h, columns = _problem(rng, bias=False)
    view = _view(w, h, columns)
    slow = [sum(w[i, j] ** 2 * h[j, j] for i in range(w.shape[0]) for j in columns[c]) / view.energy
            for c in range(len(columns))]
    np.testing.assert_allclose(wanda_scores([view]), slow)
    rows = [rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 5))]
    np.testing.assert_allclose(magnitude_scores(rows), [np.sum(rows[0][c] ** 2) + np.sum(rows[1][c] ** 2)
                                                        for c in range(4)])


@pytest.mark.parametrize("channels,fraction,multiple,kept", [
    (64, 0.5, 1, 32), (10, 0.35, 1, 6), (64, 0.3, 8, 48), (20, 0.9, 8, 8), (3, 0.99, 1, 1), (7, 0.0, 1, 7)])
def test_kept_count(channels, fraction, multiple, kept):
    assert kept_count(channels, fraction, multiple) == kept
