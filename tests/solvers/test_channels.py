"""Structured OBS against a least-squares refit: removing a block of columns costs exactly what
the best refit of the remaining columns loses, and the update is that refit."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs.solvers.channels import (Reader, View, block_costs, kept_count, magnitude_scores, obs_channels,
                                        rank_without_compensation, remove_block, replay, wanda_scores)


def _problem(rng, rows=5, channels=6, m=3, n=400, bias=True):
    cols = channels * m
    x = rng.standard_normal((n, cols)) @ rng.standard_normal((cols, cols)) * 0.3 + rng.standard_normal(cols)
    if bias:
        x = np.c_[x, np.ones(n)]
    w = rng.standard_normal((rows, x.shape[1]))
    h = x.T @ x / n
    columns = np.arange(cols).reshape(channels, m)
    return x, w, h, columns


def _reader(w, h, columns, present=None):
    present = np.ones(len(columns), bool) if present is None else present
    return Reader(View(w.copy(), np.linalg.inv(h), h), columns, present)


def _refit(x, w, removed_cols):
    """The best W' with W'[:, removed] = 0 for the outputs X W^T, by least squares, and its error."""
    keep = np.setdiff1d(np.arange(x.shape[1]), removed_cols)
    y = x @ w.T
    sol, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
    new = np.zeros_like(w)
    new[:, keep] = sol.T
    err = 0.5 * np.sum((x @ new.T - y) ** 2) / x.shape[0]
    return new, err


@pytest.mark.parametrize("bias,m", [(True, 3), (False, 3), (True, 1)])  # m = 1: a 1x1 conv's or a Gemm's
def test_block_cost_and_update_match_a_refit(bias, m):
    rng = np.random.default_rng(0)
    x, w, h, columns = _problem(rng, bias=bias, m=m)
    r = _reader(w, h, columns)
    costs = block_costs(r, np.ones(len(columns), bool)) * r.view.energy
    for c in range(len(columns)):
        new, err = _refit(x, w, columns[c])
        assert costs[c] == pytest.approx(err, rel=1e-8)
        one = _reader(w, h, columns).view
        remove_block(one, columns[c])
        np.testing.assert_allclose(one.w, new, atol=1e-8)


def test_greedy_removals_add_up_to_the_refit_error_of_the_final_set():
    rng = np.random.default_rng(1)
    x, w, h, columns = _problem(rng, channels=7)
    r = _reader(w, h, columns)
    chosen = obs_channels([r], 7, 4)
    removed_cols = columns[chosen.removed].ravel()
    new, err = _refit(x, w, removed_cols)
    assert sum(chosen.costs) * r.view.energy == pytest.approx(err, rel=1e-7)
    np.testing.assert_allclose(r.view.w, new, atol=1e-7)
    assert len(set(chosen.removed)) == 4


def test_the_first_greedy_pick_is_the_cheapest_over_all_consumers():
    rng = np.random.default_rng(2)
    problems = [_problem(rng, rows=r, channels=5, m=m) for r, m in ((4, 2), (3, 1))]
    readers = [_reader(w, h, c) for _, w, h, c in problems]
    # the exact joint cost of removing each channel: the refit errors, each over its energy
    exact = [sum(_refit(x, w, c[k])[1] / View(w, np.linalg.inv(h), h).energy for x, w, h, c in problems)
             for k in range(5)]
    chosen = obs_channels(readers, 5, 1)
    assert chosen.removed[0] == int(np.argmin(exact))
    assert chosen.costs[0] == pytest.approx(min(exact), rel=1e-8)


def test_without_compensation_only_the_removed_columns_change():
    rng = np.random.default_rng(3)
    _, w, h, columns = _problem(rng)
    r = _reader(w, h, columns)
    scores = np.array([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])
    chosen = rank_without_compensation(scores, [r], 2)
    assert chosen.removed == [3, 1]
    expect = w.copy()
    expect[:, columns[[1, 3]].ravel()] = 0
    np.testing.assert_array_equal(r.view.w, expect)


def test_a_consumer_that_reads_part_of_the_channels():
    """Two consumers, one reading only channels 0-2 (after a Split): its absent channels cost it
    nothing, and removing them leaves it alone; the joint greedy run equals a refit of both."""
    rng = np.random.default_rng(5)
    x1, w1, h1, c1 = _problem(rng, channels=6, m=2)
    x2, w2, h2, c2 = _problem(rng, channels=3, m=1)
    present = np.array([True, True, True, False, False, False])
    cols2 = np.r_[c2, np.zeros((3, 1), int)]
    a, b = _reader(w1, h1, c1), _reader(w2, h2, cols2, present)
    chosen = obs_channels([a, b], 6, 3)
    gone = chosen.removed
    new1, e1 = _refit(x1, w1, c1[gone].ravel())
    new2, e2 = _refit(x2, w2, cols2[[g for g in gone if g < 3]].ravel()) if any(g < 3 for g in gone) else (w2, 0.0)
    np.testing.assert_allclose(a.view.w, new1, atol=1e-7)
    np.testing.assert_allclose(b.view.w, new2, atol=1e-7)
    assert sum(chosen.costs) == pytest.approx(e1 / a.view.energy + e2 / b.view.energy, rel=1e-7)


def test_scores():
    rng = np.random.default_rng(4)
    _, w, h, columns = _problem(rng, bias=False)
    r = _reader(w, h, columns)
    slow = [sum(w[i, j] ** 2 * h[j, j] for i in range(w.shape[0]) for j in columns[c]) / r.view.energy
            for c in range(len(columns))]
    np.testing.assert_allclose(wanda_scores([r], len(columns)), slow)
    rows = [rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 5))]
    np.testing.assert_allclose(magnitude_scores(rows), [np.sum(rows[0][c] ** 2) + np.sum(rows[1][c] ** 2)
                                                        for c in range(4)])


@pytest.mark.parametrize("channels,fraction,multiple,kept", [
    (64, 0.5, 1, 32), (10, 0.35, 1, 6), (64, 0.3, 8, 48), (20, 0.9, 8, 8), (3, 0.99, 1, 1), (7, 0.0, 1, 7)])
def test_kept_count(channels, fraction, multiple, kept):
    assert kept_count(channels, fraction, multiple) == kept


def test_a_replayed_greedy_run_is_the_run_itself():
    rng = np.random.default_rng(4)
    x, w, h, columns = _problem(rng, channels=8)
    trial = obs_channels([_reader(w, h, columns)], 8, 7)  # the allocation's trial, to the limit
    again, fresh = _reader(w, h, columns), _reader(w, h, columns)
    replayed = replay([again], trial, 3)
    direct = obs_channels([fresh], 8, 3)
    assert replayed.removed == direct.removed and replayed.costs == pytest.approx(direct.costs)
    np.testing.assert_allclose(again.view.w, fresh.view.w, atol=1e-12)
    np.testing.assert_allclose(again.view.hinv, fresh.view.hinv, atol=1e-12)


def test_views_of_any_memory_order_are_updated_in_place():
    rng = np.random.default_rng(5)
    x, w, h, columns = _problem(rng)
    c_order, f_order = _reader(w, h, columns), Reader(View(np.asfortranarray(w), np.linalg.inv(h), h), columns,
                                                      np.ones(len(columns), bool))
    for r in (c_order, f_order):
        remove_block(r.view, columns[2])
    np.testing.assert_allclose(f_order.view.w, c_order.view.w, atol=1e-12)
    assert np.all(f_order.view.w[:, columns[2]] == 0)
