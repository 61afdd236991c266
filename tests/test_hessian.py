"""HessianAccumulator, damped_inverse, layer_error and output_energy against direct float64 math."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import LinAlgError

from onnx_lobs.hessian import HessianAccumulator, damped_inverse, layer_error, output_energy


def rel_fro(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def augmented(x, bias):
    """[groups, n, cols] -> with a trailing column of ones when bias."""
    if not bias:
        return x
    return np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=2)


def direct_hessian(x, bias):
    xa = augmented(x, bias)
    return np.einsum("gni,gnj->gij", xa, xa) / x.shape[1]


def batches(rng, groups, cols, sizes, offset=0.0):
    return [rng.standard_normal((groups, n, cols)) * rng.uniform(0.5, 3.0, cols) + offset for n in sizes]


# ----------------------------------------------------------------------------------------------
# HessianAccumulator


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups,cols", [(1, 5), (3, 4), (4, 1)])
def test_accumulator_equals_xtx_over_n(groups, cols, bias):
    rng = np.random.default_rng(groups * 10 + cols + bias)
    parts = batches(rng, groups, cols, [7, 1, 12, 3], offset=0.7)
    acc = HessianAccumulator(groups, cols, bias)
    for p in parts:
        acc.add(p)
    x = np.concatenate(parts, axis=1)
    assert acc.n == x.shape[1] == 23
    h = acc.hessian()
    ref = direct_hessian(x, bias)
    assert h.shape == (groups, cols + bias, cols + bias)
    assert h.dtype == np.float64
    assert rel_fro(h, ref) <= 1e-13
    np.testing.assert_array_equal(h, h.transpose(0, 2, 1))  # exactly symmetric
    if bias:
        np.testing.assert_allclose(h[:, -1, -1], 1.0, rtol=0, atol=0)
        np.testing.assert_allclose(h[:, -1, :-1], x.mean(axis=1), rtol=1e-13)


def test_accumulator_groups_are_independent():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 9, 4))
    x[1] *= 100.0
    acc = HessianAccumulator(3, 4, True)
    acc.add(x)
    h = acc.hessian()
    for g in range(3):
        one = HessianAccumulator(1, 4, True)
        one.add(x[g:g + 1])
        assert rel_fro(h[g], one.hessian()[0]) <= 1e-15


@pytest.mark.parametrize("bias", [False, True])
def test_accumulator_accepts_non_contiguous_columns(bias):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 10, 2))
    view = x.transpose(2, 1, 0)  # [2, 10, 6], not C-contiguous
    acc = HessianAccumulator(2, 6, bias)
    acc.add(view)
    assert rel_fro(acc.hessian(), direct_hessian(view, bias)) <= 1e-13


@pytest.mark.parametrize("bias", [False, True])
def test_merge_equals_single_accumulator(bias):
    rng = np.random.default_rng(8 + bias)
    parts = batches(rng, 2, 3, [4, 6, 5, 2], offset=-0.3)
    a, b, both = (HessianAccumulator(2, 3, bias) for _ in range(3))
    for p in parts[:2]:
        a.add(p)
    for p in parts[2:]:
        b.add(p)
    for p in parts:
        both.add(p)
    a.merge(b)
    assert a.n == both.n == 17
    assert rel_fro(a.hessian(), both.hessian()) <= 1e-14
    assert rel_fro(a.hessian(), direct_hessian(np.concatenate(parts, axis=1), bias)) <= 1e-13
    # merging an empty accumulator changes nothing
    before = a.hessian()
    a.merge(HessianAccumulator(2, 3, bias))
    np.testing.assert_array_equal(a.hessian(), before)


def test_hessian_without_samples_raises():
    with pytest.raises(ValueError):
        HessianAccumulator(1, 3, False).hessian()


# ----------------------------------------------------------------------------------------------
# damped_inverse


def _samples_hessian(x, bias=False):
    return direct_hessian(x[None], bias)[0]


@pytest.mark.parametrize("damp", [0.0, 1e-3, 0.1])
def test_damped_inverse_well_conditioned(damp):
    rng = np.random.default_rng(20)
    x = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) + 0.2
    h = _samples_hessian(x)
    res = damped_inverse(h, damp)
    ref = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(6))
    assert res.damp == damp
    assert not res.dead.any()
    assert rel_fro(res.hinv, ref) <= 1e-10
    np.testing.assert_array_equal(res.hinv, res.hinv.T)
    # the input is not modified
    np.testing.assert_array_equal(h, _samples_hessian(x))


def _check_usable(res, h_size):
    assert res.hinv.shape == (h_size, h_size)
    assert np.all(np.isfinite(res.hinv))
    assert np.all(np.diag(res.hinv) > 0)
    np.testing.assert_array_equal(res.hinv, res.hinv.T)


def test_damped_inverse_rank_deficient():
    rng = np.random.default_rng(21)
    x = rng.standard_normal((3, 8))  # 3 samples, 8 columns: rank 3
    h = _samples_hessian(x)
    assert np.linalg.matrix_rank(h) == 3
    res = damped_inverse(h, 0.01)
    _check_usable(res, 8)
    assert not res.dead.any()
    assert res.damp == 0.01
    ref = np.linalg.inv(h + 0.01 * np.mean(np.diag(h)) * np.eye(8))
    assert rel_fro(res.hinv, ref) <= 1e-8
    # damp=0 cannot be inverted as is: the damping is raised
    res0 = damped_inverse(h, 0.0)
    _check_usable(res0, 8)
    assert res0.damp > 0
    ref0 = np.linalg.inv(h + res0.damp * np.mean(np.diag(h)) * np.eye(8))
    assert rel_fro(res0.hinv, ref0) <= 1e-4


def test_damped_inverse_constant_input_with_bias():
    """A constant input column duplicates the bias column (up to scale): H is singular."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((50, 4))
    x[:, 2] = 2.0
    h = _samples_hessian(x, bias=True)
    assert np.linalg.matrix_rank(h) == 4
    res = damped_inverse(h, 0.01)
    _check_usable(res, 5)
    assert not res.dead.any()
    res0 = damped_inverse(h, 0.0)
    _check_usable(res0, 5)
    assert res0.damp >= 0.0


def test_damped_inverse_raises_damp_when_cholesky_fails():
    # every column is the same constant 2: H = 4 * ones, Cholesky hits an exact zero pivot
    x = np.full((10, 3), 2.0)
    h = _samples_hessian(x)
    np.testing.assert_array_equal(h, np.full((3, 3), 4.0))
    res = damped_inverse(h, 0.0)
    assert res.damp == 1e-8
    _check_usable(res, 3)
    ref = np.linalg.inv(h + 1e-8 * 4.0 * np.eye(3))
    assert rel_fro(res.hinv, ref) <= 1e-6
    # a positive damp that is too small is raised tenfold at a time
    res = damped_inverse(np.array([[1.0, 2.0], [2.0, 1.0]]), 0.5)  # eigenvalues 3, -1
    assert res.damp == pytest.approx(5.0)
    _check_usable(res, 2)


def test_damped_inverse_gives_up_on_an_indefinite_matrix():
    h = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalue -1 needs damp > 1; 1e-8 .. 1e-1 is not enough
    with pytest.raises(LinAlgError):
        damped_inverse(h, 0.0)


def test_damped_inverse_dead_inputs():
    rng = np.random.default_rng(23)
    x = rng.standard_normal((40, 6))
    x[:, 1] = 0.0
    x[:, 4] = 0.0
    for bias in (False, True):
        h = _samples_hessian(x, bias)
        size = h.shape[0]
        dead_ref = np.zeros(size, bool)
        dead_ref[[1, 4]] = True
        for damp in (0.0, 0.01):
            res = damped_inverse(h, damp)
            _check_usable(res, size)
            np.testing.assert_array_equal(res.dead, dead_ref)
            live = ~dead_ref
            # dead inputs are decoupled from everything else
            assert np.all(res.hinv[dead_ref][:, live] == 0)
            # live block: the damped inverse of H restricted to the live inputs, damped by
            # damp * mean(diag H) (the dead inputs' zeros included, as the docstring says)
            lam = res.damp * np.mean(np.diag(h))
            ref = np.linalg.inv(h[np.ix_(live, live)] + lam * np.eye(live.sum()))
            assert rel_fro(res.hinv[np.ix_(live, live)], ref) <= 1e-10
            np.testing.assert_allclose(np.diag(res.hinv)[dead_ref], 1.0 / (1.0 + lam), rtol=1e-12)


@pytest.mark.parametrize("c", [1e-6, 1e4])
def test_damped_inverse_is_relative_to_the_scale_of_h(c):
    """Scaling the inputs by sqrt(c) scales H by c: the damping is relative, so the live block of
    the inverse scales by 1/c, with or without dead inputs."""
    rng = np.random.default_rng(24)
    x = rng.standard_normal((5, 8))  # rank-deficient, so the damping matters
    x[:, [0, 3, 6]] = 0.0
    h = _samples_hessian(x)
    live = np.diag(h) > 0
    for damp in (0.01, 0.1):
        a, b = damped_inverse(h, damp), damped_inverse(c * h, damp)
        assert a.damp == b.damp == damp
        np.testing.assert_array_equal(a.dead, ~live)
        np.testing.assert_array_equal(b.dead, ~live)
        assert rel_fro(c * b.hinv[np.ix_(live, live)], a.hinv[np.ix_(live, live)]) <= 1e-9


def test_damped_inverse_decouples_dead_inputs_even_with_noise():
    """A zero diagonal entry with (invalid, e.g. rounding) off-diagonal noise is still dead."""
    rng = np.random.default_rng(25)
    x = rng.standard_normal((30, 4))
    h = _samples_hessian(x)
    h = np.insert(np.insert(h, 2, 0.0, axis=0), 2, 0.0, axis=1)
    h[2, [0, 1, 3, 4]] = h[[0, 1, 3, 4], 2] = 1e-3
    res = damped_inverse(h, 0.01)
    np.testing.assert_array_equal(res.dead, [False, False, True, False, False])
    _check_usable(res, 5)
    assert np.all(res.hinv[2, [0, 1, 3, 4]] == 0)
    live = [0, 1, 3, 4]
    lam = 0.01 * np.mean(np.diag(h))
    assert rel_fro(res.hinv[np.ix_(live, live)], np.linalg.inv(h[np.ix_(live, live)] + lam * np.eye(4))) <= 1e-10


def test_damped_inverse_all_dead():
    res = damped_inverse(np.zeros((3, 3)), 0.01)
    assert res.dead.all()
    _check_usable(res, 3)


# ----------------------------------------------------------------------------------------------
# layer_error / output_energy


def _direct_error(w_old, w_new, x):
    total = 0.0
    for s in range(x.shape[0]):
        d = (w_new - w_old) @ x[s]
        total += float(d @ d)
    return total / (2 * x.shape[0])


def _direct_energy(w, x):
    total = 0.0
    for s in range(x.shape[0]):
        y = w @ x[s]
        total += float(y @ y)
    return total / (2 * x.shape[0])


@pytest.mark.parametrize("bias", [False, True])
def test_layer_error_and_output_energy_from_samples(bias):
    rng = np.random.default_rng(30 + bias)
    groups, cols, rows, n = 3, 5, 4, 37
    x = rng.standard_normal((groups, n, cols)) + 0.5
    acc = HessianAccumulator(groups, cols, bias)
    acc.add(x[:, :20])
    acc.add(x[:, 20:])
    h = acc.hessian()
    xa = augmented(x, bias)
    for g in range(groups):
        w_old = rng.standard_normal((rows, cols + bias))
        w_new = w_old.copy()
        w_new[rng.random(w_new.shape) < 0.4] = 0.0
        w_new[0, 0] += 0.25
        err = layer_error(w_old, w_new, h[g])
        ref = _direct_error(w_old, w_new, xa[g])
        assert ref > 0
        assert err == pytest.approx(ref, rel=1e-12)
        assert layer_error(w_new, w_old, h[g]) == pytest.approx(ref, rel=1e-12)
        assert layer_error(w_old, w_old, h[g]) == 0.0
        assert output_energy(w_old, h[g]) == pytest.approx(_direct_energy(w_old, xa[g]), rel=1e-12)
        assert layer_error(np.zeros_like(w_old), w_old, h[g]) == pytest.approx(output_energy(w_old, h[g]),
                                                                                rel=1e-12)
