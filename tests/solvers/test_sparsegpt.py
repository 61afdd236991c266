"""SparseGPT against a plain reference that re-inverts H on the unprocessed columns."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs.hessian import damped_hessian, damped_inverse, layer_error
from onnx_lobs.solvers import Target, sparsegpt
from onnx_lobs.solvers.factors import inverse_upper_factor

from .common import (bias_protect, check_invariants, contiguous_groups, conv_groups,
                     correlated_samples, damped_matrix, hessian_of, n_removable, output_error)


def reference_sparsegpt(w, h, damp=0.01, protect=None, n_prune=None, block=128, nm=None,
                        nm_keep=0, mask=None):
    """Column by column, no lazy updates, no triangular factor: at column j, G = inverse of Hd
    on the columns j.. ; a removed weight is compensated on those columns by the OBS update
    -(w_j / G_00) G[0, :]. The mask is given, or chosen by the documented rules with the
    score w_c^2 / [inverse of Hd on c..]_00 on the current weights (dead inputs score 0)."""
    hd, dead, used = damped_matrix(h, damp)
    rows, cols = w.shape
    removable = np.ones(cols, bool) if protect is None else ~np.asarray(protect)
    cur = np.array(w, dtype=np.float64)
    given = mask is not None
    mask = np.zeros(w.shape, bool) if mask is None else mask.copy()
    own = np.array([np.linalg.inv(hd[c:, c:])[0, 0] for c in range(cols)])  # U_cc^2
    score_scale = np.where(dead, 0.0, 1.0 / own)
    total = rows * int(removable.sum())
    before = np.concatenate([[0], np.cumsum(removable)])

    def share(c):
        return (2 * n_prune * c + total) // (2 * total) if total else 0

    predicted = 0.0
    for j in range(cols):
        if not given and nm is None and j % block == 0:
            i2 = min(j + block, cols)
            k = share(rows * int(before[i2])) - share(rows * int(before[j]))
            entries = sorted((cur[r, c] ** 2 * score_scale[c], r, c)
                             for r in range(rows) for c in range(j, i2) if removable[c])
            for _, r, c in entries[:k]:
                mask[r, c] = True
        if not given and nm is not None:
            for grp in np.asarray(nm):
                if min(grp) == j:
                    for r in range(rows):
                        order = sorted(grp, key=lambda c: (cur[r, c] ** 2 * score_scale[c],
                                                           list(grp).index(c)))
                        mask[r, order[:len(grp) - nm_keep]] = True
        g = np.linalg.inv(hd[j:, j:])
        for r in range(rows):
            if mask[r, j]:
                if not dead[j]:
                    predicted += cur[r, j] ** 2 / (2 * g[0, 0])
                cur[r, j:] -= cur[r, j] / g[0, 0] * g[0, :]
                cur[r, j] = 0.0
    return cur, mask, predicted, used


def _random_case(seed, max_rows=6, max_cols=14):
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, max_rows + 1))
    cols = int(rng.integers(2, max_cols + 1))
    x = correlated_samples(rng, int(rng.integers(2 * cols, 5 * cols)), cols)
    w = rng.standard_normal((rows, cols))
    protect = None
    if rng.random() < 0.5:
        x[:, -1] = 1.0
        protect = bias_protect(cols)
    if cols > 3 and rng.random() < 0.3:
        x[:, int(rng.integers(0, cols - 1))] = 0.0
    damp = float(rng.choice([0.0, 1e-3, 0.01, 0.1]))
    block = int(rng.choice([1, 2, 3, 5, 128]))
    return w, hessian_of(x), protect, damp, block, rng


def _assert_matches(sol, ref):
    new, mask, predicted, used = ref
    np.testing.assert_array_equal(sol.pruned, mask)
    np.testing.assert_allclose(sol.weights, new, rtol=0, atol=1e-9 * max(1.0, np.abs(new).max()))
    assert sol.predicted_loss == pytest.approx(predicted, rel=1e-8, abs=1e-12)
    assert sol.damp == used


@pytest.mark.parametrize("seed", range(40))
def test_n_prune_matches_reference(seed):
    w, h, protect, damp, block, rng = _random_case(seed)
    n_prune = int(rng.integers(0, n_removable(w, protect) + 1))
    sol = sparsegpt.solve(w, h, Target(n_prune=n_prune, protect=protect, damp=damp), block=block)
    check_invariants(sol, w, protect, expected_count=n_prune)
    _assert_matches(sol, reference_sparsegpt(w, h, damp, protect, n_prune, block))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:4conv", "1:3conv"])
def test_nm_matches_reference(seed, pattern, monkeypatch):
    rng = np.random.default_rng(seed)
    keep, m = int(pattern[0]), int(pattern[2])
    if pattern.endswith("conv"):
        channels, kernel = 2 * m, 3
        groups = conv_groups(channels, kernel, m)  # stride 3 in the column index
        cols = channels * kernel + 1
    else:
        cols = 4 * m + 2
        groups = contiguous_groups(cols - 2, m)
    x = correlated_samples(rng, 5 * cols, cols)
    x[:, -1] = 1.0
    if rng.random() < 0.5:
        x[:, int(groups[0, 1])] = 0.0  # a dead input inside a group
    h = hessian_of(x)
    protect = bias_protect(cols)
    w = rng.standard_normal((4, cols))
    block = int(rng.choice([1, 2, 4, 5, 128]))  # groups straddle blocks for most of these
    monkeypatch.setattr(sparsegpt, "INNER", int(rng.choice([1, 2, 3, 16])))  # and sub-blocks
    target = Target(n_prune=3, protect=protect, damp=0.01, nm=groups, nm_keep=keep)
    sol = sparsegpt.solve(w, h, target, block=block)
    check_invariants(sol, w, protect, nm=groups, nm_keep=keep)
    _assert_matches(sol, reference_sparsegpt(w, h, 0.01, protect, block=block, nm=groups, nm_keep=keep))


@pytest.mark.parametrize("seed", range(10))
def test_fixed_mask_same_weights_for_every_block_size(seed):
    w, h, protect, damp, _, rng = _random_case(100 + seed, max_rows=5, max_cols=20)
    mask = rng.random(w.shape) < 0.5
    if protect is not None:
        mask[:, protect] = False
    ref_w, _, ref_pred, used = reference_sparsegpt(w, h, damp, protect, mask=mask)
    fac = inverse_upper_factor(h, damp)
    assert fac.damp == used
    for block, inner in [(1, 1), (2, 1), (3, 2), (7, 3), (7, 16), (w.shape[1], 4), (1000, 1000)]:
        new, errors = sparsegpt.sweep(w, fac.u, mask, block, inner=inner)
        np.testing.assert_allclose(new, ref_w, rtol=0, atol=1e-9 * max(1.0, np.abs(ref_w).max()))
        assert np.all(new[mask] == 0.0)
        assert 0.5 * np.sum(errors[:, ~fac.dead] ** 2) == pytest.approx(ref_pred, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_predicted_loss_is_the_exact_error(seed):
    """Without damping and dead inputs, sum err^2 / 2 is the output error on the samples;
    with damping it bounds it from above."""
    rng = np.random.default_rng(seed)
    x = correlated_samples(rng, 80, 12)
    h = hessian_of(x)
    w = rng.standard_normal((5, 12))
    sol = sparsegpt.solve(w, h, Target(n_prune=30, damp=0.0), block=5)
    assert sol.predicted_loss == pytest.approx(output_error(x, w, sol.weights), rel=1e-8)
    assert sol.predicted_loss == pytest.approx(layer_error(w, sol.weights, h), rel=1e-8)
    sol = sparsegpt.solve(w, h, Target(n_prune=30, damp=0.1), block=5)
    assert layer_error(w, sol.weights, h) <= sol.predicted_loss


def test_each_block_removes_its_share():
    rng = np.random.default_rng(3)
    rows, cols, block = 7, 53, 8
    x = correlated_samples(rng, 200, cols)
    x[:, -1] = 1.0
    w = rng.standard_normal((rows, cols))
    protect = bias_protect(cols)
    for n_prune in (0, 1, 100, 181, 363, rows * (cols - 1)):
        sol = sparsegpt.solve(w, hessian_of(x), Target(n_prune=n_prune, protect=protect), block=block)
        assert sol.pruned.sum() == n_prune
        ratio = n_prune / (rows * (cols - 1))
        for i1 in range(0, cols, block):
            eff = rows * int((~protect[i1:i1 + block]).sum())
            assert abs(sol.pruned[:, i1:i1 + block].sum() - ratio * eff) <= 1.0


def test_max_loss_bisects_on_the_count():
    rng = np.random.default_rng(5)
    x = correlated_samples(rng, 100, 10)
    h = hessian_of(x)
    w = rng.standard_normal((4, 10))
    everything = layer_error(w, 0 * w, h)
    for frac in (0.0, 1e-3, 0.05, 0.3, 10.0):
        budget = frac * everything
        sol = sparsegpt.solve(w, h, Target(max_loss=budget), block=4)
        check_invariants(sol, w, None)
        assert layer_error(w, sol.weights, h) <= budget
        k = int(sol.pruned.sum())
        again = sparsegpt.solve(w, h, Target(n_prune=k), block=4)
        np.testing.assert_array_equal(again.pruned, sol.pruned)
        if k < w.size:  # the bisection stopped because one more was over the budget
            over = sparsegpt.solve(w, h, Target(n_prune=k + 1), block=4)
            assert layer_error(w, over.weights, h) > budget
    assert sparsegpt.solve(w, h, Target(max_loss=10 * everything)).pruned.all()


def test_factor_is_of_the_same_damped_matrix():
    rng = np.random.default_rng(8)
    x = correlated_samples(rng, 9, 12)  # rank deficient
    x[:, 3] = 0.0
    h = hessian_of(x)
    for damp in (0.0, 1e-6, 0.01):
        fac = inverse_upper_factor(h, damp)
        hd, dead = damped_hessian(h, fac.damp)
        assert np.all(np.tril(fac.u, -1) == 0.0)
        np.testing.assert_allclose(fac.u.T @ fac.u @ hd, np.eye(12), atol=1e-6)
        inv = damped_inverse(h, fac.damp)
        np.testing.assert_array_equal(dead, inv.dead)
        np.testing.assert_allclose(hd @ inv.hinv, np.eye(12), atol=1e-6)


def test_smallest_is_a_stable_argsort_prefix():
    rng = np.random.default_rng(0)
    for _ in range(50):
        score = rng.integers(0, 4, size=(int(rng.integers(1, 6)), int(rng.integers(1, 9)))).astype(float)
        if rng.random() < 0.3:
            score[:, 0] = np.inf
        for k in range(score.size + 1):
            expected = np.zeros(score.size, bool)
            expected[np.argsort(score, axis=None, kind="stable")[:k]] = True
            np.testing.assert_array_equal(sparsegpt.smallest(score, k), expected.reshape(score.shape))


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_single_precision_sweep_of_large_layers_matches_double(monkeypatch, pattern):
    """From SINGLE_WEIGHTS on the sweep runs in float32: same mask up to near-ties, and the same
    layer error to float32's precision (the threshold is lowered so that a small case takes it)."""
    rng = np.random.default_rng(21)
    w = rng.standard_normal((64, 48))
    h = hessian_of(correlated_samples(rng, 400, 48))
    groups = None if pattern is None else contiguous_groups(48, pattern[1])
    target = Target(n_prune=w.size // 2, damp=0.01) if pattern is None else \
        Target(nm=groups, nm_keep=pattern[0], damp=0.01)
    double = sparsegpt.solve(w, h, target)
    monkeypatch.setattr(sparsegpt, "SINGLE_WEIGHTS", 1)
    single = sparsegpt.solve(w, h, target)
    assert single.weights.dtype == np.float64 and int(single.pruned.sum()) == int(double.pruned.sum())
    assert np.mean(single.pruned != double.pruned) < 0.01
    assert layer_error(w, single.weights, h) == pytest.approx(layer_error(w, double.weights, h), rel=1e-3)
    assert single.predicted_loss == pytest.approx(double.predicted_loss, rel=1e-3)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_single_precision_factor_of_wide_hessians_matches_double(monkeypatch, pattern):
    """From SINGLE_COLS columns U is factored in float32: U^T U still inverts the damped Hessian to
    float32's precision, and the solve keeps the double factor's mask up to near-ties and its
    layer error (the threshold is lowered so that a small case takes it)."""
    from onnx_lobs.hessian import damped_hessian
    from onnx_lobs.solvers import factors
    rng = np.random.default_rng(22)
    w = rng.standard_normal((40, 96))
    h = hessian_of(correlated_samples(rng, 600, 96))
    h[5, :] = h[:, 5] = 0.0  # a dead input, decoupled as in double
    groups = None if pattern is None else contiguous_groups(96, pattern[1])
    target = Target(n_prune=w.size // 2, damp=0.01) if pattern is None else \
        Target(nm=groups, nm_keep=pattern[0], damp=0.01)
    double = sparsegpt.solve(w, h, target)
    monkeypatch.setattr(factors, "SINGLE_COLS", 1)
    fac = inverse_upper_factor(h, 0.01)
    assert fac.u.dtype == np.float32 and np.array_equal(np.triu(fac.u), fac.u)
    hd, _ = damped_hessian(h, fac.damp)
    np.testing.assert_allclose(fac.u.astype(np.float64).T @ fac.u @ hd, np.eye(96), atol=2e-3)
    single = sparsegpt.solve(w, h, target)
    assert int(single.pruned.sum()) == int(double.pruned.sum())
    assert np.mean(single.pruned != double.pruned) < 0.02
    assert layer_error(w, single.weights, h) == pytest.approx(layer_error(w, double.weights, h), rel=1e-2)


def test_a_single_precision_factor_that_fails_falls_back_to_double(monkeypatch):
    from onnx_lobs.solvers import factors
    rng = np.random.default_rng(23)
    h = hessian_of(correlated_samples(rng, 300, 32))
    monkeypatch.setattr(factors, "SINGLE_COLS", 1)
    real = factors._upper
    monkeypatch.setattr(factors, "_upper", lambda h, d, dtype: None if dtype == np.float32 else real(h, d, dtype))
    fac = inverse_upper_factor(h, 0.01)
    assert fac.u.dtype == np.float64 and fac.damp == 0.01
