"""HessianAccumulator, damped_inverse, layer_error and output_energy against direct float64 math."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from scipy.linalg import LinAlgError

from onnx_lobs import hessian
from onnx_lobs.hessian import (FAST_ROWS, HessianAccumulator, damped_inverse, damped_solve, layer_error,
                               output_energy)
from onnx_lobs.layers import ADAPTERS, unfold


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
@pytest.mark.parametrize("groups,cols", [(1, 5), (3, 4), (4, 1), (2, 70)])  # 70: per group, past BATCHED_COLS
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


def test_raise_damp_until_tries_tenfold_then_gives_up():
    """The one loop behind damped_inverse, damped_solve and the solvers' factorisations."""
    seen = []
    got = hessian.raise_damp_until(lambda d: seen.append(d) or ("ok" if d > 5e-4 else None), 0.0)
    assert got == "ok"
    np.testing.assert_allclose(seen, [0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3], rtol=1e-12)
    for tries in (8, 3):
        seen.clear()
        with pytest.raises(LinAlgError, match="^Hessian could not be regularised$"):
            hessian.raise_damp_until(lambda d: seen.append(d), 0.5, max_tries=tries)
        assert len(seen) == tries and seen[:3] == [0.5, 5.0, 50.0]


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


# ----------------------------------------------------------------------------------------------
# precision: the default (float32 products, float64 totals) against exact float64 accumulation


def _post_relu_activations(rng, n, channels, size, mean=4.0):
    """Activations like a ReLU network's: channel-correlated, spatially smooth, a large positive
    mean with channel-dependent scales, and zeros where the ReLU cut."""
    mix = rng.standard_normal((channels, channels)) / np.sqrt(channels)
    z = np.einsum("dc,nchw->ndhw", mix, rng.standard_normal((n, channels, size, size)))
    z = (z + np.roll(z, 1, axis=2) + np.roll(z, 1, axis=3)) / np.sqrt(3)  # neighbours correlate
    scale = rng.uniform(0.5, 2.0, (1, channels, 1, 1))
    offset = rng.uniform(0.5, 2.0, (1, channels, 1, 1)) * mean
    return np.maximum(z * scale + offset - 1.5, 0.0).astype(np.float32)


def _fast_and_exact(node, x_batches, weight_shape, bias=True):
    adapter = ADAPTERS[node.op_type]
    g = adapter.geometry(node, weight_shape)
    fast = HessianAccumulator(g.groups, g.cols, bias)
    exact = HessianAccumulator(g.groups, g.cols, bias, exact=True)
    for x in x_batches:
        for cols in unfold(adapter, node, x, weight_shape):
            assert cols.dtype == np.float32
            fast.add(cols)
            exact.add(cols)
    assert fast.n == exact.n
    return fast.hessian(), exact.hessian()


@pytest.mark.parametrize("kernel,stride,group", [(3, 1, 1), (1, 1, 1), (3, 2, 1), (3, 1, 16), (3, 1, 32)])
def test_fast_accumulation_matches_float64_on_post_relu_conv_columns(kernel, stride, group):
    """Several batches of im2col columns (more rows than FAST_ROWS per batch): the float32
    products stay within 1e-6 of float64, relative to H and also to its centered part."""
    rng = np.random.default_rng(40 + kernel + stride + group)
    channels = 32
    n = 12 * stride ** 2
    batches = [_post_relu_activations(rng, n, channels, 28) for _ in range(3)]
    assert n * 28 * 28 // stride ** 2 > FAST_ROWS  # products really are split
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[kernel, kernel],
                            strides=[stride, stride], pads=[kernel // 2] * 4, group=group)
    h, ref = _fast_and_exact(node, batches, (channels, channels // group, kernel, kernel))
    assert h.dtype == np.float64
    assert rel_fro(h, ref) <= 1e-6
    # relative to the covariance (H less its mean's outer product), which the large mean dwarfs
    mean = ref[:, :-1, -1]
    centered = ref[:, :-1, :-1] - np.einsum("gi,gj->gij", mean, mean)
    assert np.linalg.norm(ref[:, :-1, :-1]) > 5 * np.linalg.norm(centered)
    assert np.linalg.norm(h[:, :-1, :-1] - ref[:, :-1, :-1]) / np.linalg.norm(centered) <= 1e-5
    # the bias column and corner are float64 sums: as exact as the float64 path
    np.testing.assert_allclose(h[:, :-1, -1], ref[:, :-1, -1], rtol=1e-12, atol=0)
    np.testing.assert_array_equal(h[:, -1, -1], 1.0)


def test_fast_accumulation_matches_float64_on_gemm_and_matmul_inputs():
    rng = np.random.default_rng(41)
    feats = [_post_relu_activations(rng, 4000, 256, 1).reshape(4000, 256) for _ in range(3)]
    gemm = helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1)
    h, ref = _fast_and_exact(gemm, feats, (10, 256))
    assert rel_fro(h, ref) <= 1e-6
    matmul = helper.make_node("MatMul", ["x", "W"], ["y"])
    h, ref = _fast_and_exact(matmul, [f.reshape(2, 2000, 256) for f in feats], (256, 10), bias=False)
    assert rel_fro(h, ref) <= 1e-6


def test_bias_sums_are_float64_sums():
    """sum x over millions of rows: float32 accumulation would be off by far more than 1e-12."""
    rng = np.random.default_rng(42)
    x = (1.0 + rng.random((1, 1 << 21, 3))).astype(np.float32)  # 2M rows
    acc = HessianAccumulator(1, 3, True)
    for i in range(0, x.shape[1], 1 << 19):
        acc.add(x[:, i:i + (1 << 19)])
    ref = x[0].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(acc.hessian()[0, -1, :-1], ref, rtol=1e-13, atol=0)
    assert acc.n == 1 << 21


@pytest.mark.parametrize("bias", [False, True])
def test_fast_accumulator_layouts_dtypes_and_merge(bias, monkeypatch):
    """float32 columns in any layout, float16 columns, products split into tiny row blocks,
    and merging: all agree with the float64 reference within the fast tolerance."""
    monkeypatch.setattr(hessian, "FAST_ROWS", 5)
    rng = np.random.default_rng(43 + bias)
    parts = [p.astype(np.float32) for p in batches(rng, 3, 6, [7, 1, 12, 13], offset=2.0)]
    ref = direct_hessian(np.concatenate(parts, axis=1).astype(np.float64), bias)
    layouts = [
        parts[0],  # C-ordered
        np.asfortranarray(parts[1].transpose(0, 2, 1)).transpose(0, 2, 1),  # Fortran-ordered groups
        np.asfortranarray(parts[2].transpose(0, 2, 1)).transpose(0, 2, 1)[:, ::1],  # F, sliced by rows
        np.ascontiguousarray(np.repeat(parts[3], 2, axis=2))[:, :, ::2],  # neither
    ]
    a, b = HessianAccumulator(3, 6, bias), HessianAccumulator(3, 6, bias)
    for p in layouts[:2]:
        a.add(p)
    for p in layouts[2:]:
        b.add(p)
    a.merge(b)
    assert a.n == 33
    h = a.hessian()
    assert rel_fro(h, ref) <= 1e-6
    np.testing.assert_array_equal(h, h.transpose(0, 2, 1))
    # float16 columns go through float32 exactly
    half = [p.astype(np.float16) for p in parts]
    acc = HessianAccumulator(3, 6, bias)
    for p in half:
        acc.add(p)
    ref16 = direct_hessian(np.concatenate(half, axis=1).astype(np.float64), bias)
    assert rel_fro(acc.hessian(), ref16) <= 1e-6


def test_exact_accumulator_on_float32_columns():
    """exact=True: float32 columns are upcast before multiplying, so the float64 references hold
    to rounding level -- the path the adapter tests use to check columns to 1e-10."""
    rng = np.random.default_rng(44)
    parts = [p.astype(np.float32) for p in batches(rng, 2, 5, [9, 30, 4], offset=3.0)]
    for bias in (False, True):
        acc = HessianAccumulator(2, 5, bias, exact=True)
        for p in parts:
            acc.add(p)
        ref = direct_hessian(np.concatenate(parts, axis=1).astype(np.float64), bias)
        assert rel_fro(acc.hessian(), ref) <= 1e-14


def test_float64_columns_always_take_the_exact_path():
    rng = np.random.default_rng(45)
    x = rng.standard_normal((1, 50, 4)) * 1e-3 + 1.0  # needs more than float32's 7 digits
    acc = HessianAccumulator(1, 4, True)  # default (fast) mode
    acc.add(x)
    assert rel_fro(acc.hessian(), direct_hessian(x, True)) <= 1e-14


def test_add_rejects_mismatched_columns():
    acc = HessianAccumulator(2, 3, False)
    with pytest.raises(ValueError):
        acc.add(np.zeros((1, 4, 3), np.float32))
    with pytest.raises(ValueError):
        acc.add(np.zeros((2, 4, 5), np.float32))
    acc.add(np.zeros((2, 0, 3), np.float32))  # no rows: nothing changes
    assert acc.n == 0


def test_damped_solve_is_the_damped_inverse_applied():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((50, 20))
    x[:, 3] = 0  # a dead input
    x[:, 5] = x[:, 6]  # rank deficient
    h = x.T @ x / 50
    rhs = rng.standard_normal((20, 7))
    for damp in (0.0, 0.01, 1.0):
        inv = damped_inverse(h, damp)
        np.testing.assert_allclose(damped_solve(h, damp, rhs), inv.hinv @ rhs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups,cols", [(1, 5), (3, 4), (2, 1)])
def test_joint_blocks_equal_the_direct_means(groups, cols, bias):
    """blocks() reads H_p, C and H_d of [x_d, x_p] straight from the totals: the same as the means
    of the augmented products, and as slicing the whole joint Hessian."""
    rng = np.random.default_rng(groups * 7 + cols + bias)
    xd = batches(rng, groups, cols, [9, 4, 11], offset=0.3)
    xp = [x + 0.2 * rng.standard_normal(x.shape) for x in xd]
    acc = HessianAccumulator(groups, 2 * cols, bias)
    for d, p in zip(xd, xp):
        acc.add(np.concatenate([d, p], axis=2).astype(np.float32))
    ad, ap = (augmented(np.concatenate(v, axis=1), bias) for v in (xd, xp))
    n = ad.shape[1]
    hp, c, hd = acc.blocks(cols)
    refs = [np.einsum("gni,gnj->gij", a, b) / n for a, b in ((ap, ap), (ad, ap), (ad, ad))]
    for got, ref in zip((hp, c, hd), refs):
        assert got.shape == ref.shape
        assert rel_fro(got, ref) <= 1e-6
    whole = acc.hessian()
    d = list(range(cols)) + ([2 * cols] if bias else [])
    p = list(range(cols, 2 * cols)) + ([2 * cols] if bias else [])
    np.testing.assert_allclose(hp, whole[:, p][:, :, p], rtol=1e-14, atol=0)
    np.testing.assert_allclose(c, whole[:, d][:, :, p], rtol=1e-14, atol=0)
    np.testing.assert_allclose(hd, whole[:, d][:, :, d], rtol=1e-14, atol=0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cols", [7, 300])
def test_quadratic_form_from_the_totals_is_the_one_through_the_assembled_hessian(monkeypatch, bias, cols):
    """HessianAccumulator.quadratic_form reads the totals' upper triangle; the reference assembles
    H and multiplies through it (float64, and float32 past SINGLE_FORM)."""
    from onnx_lobs.hessian import quadratic_form

    rng = np.random.default_rng(1)
    acc = HessianAccumulator(2, cols, bias)
    for _ in range(3):
        acc.add(rng.standard_normal((2, 50, cols)).astype(np.float32) + 0.5)
    w = rng.standard_normal((64, cols + bias))
    h = acc.hessian()
    for k in range(2):
        want = quadratic_form(w, h[k])
        assert acc.quadratic_form(k, w) == pytest.approx(want, rel=1e-10)
        monkeypatch.setattr(hessian, "SINGLE_FORM", 1)  # the float32 product
        assert acc.quadratic_form(k, w) == pytest.approx(want, rel=1e-5)
        monkeypatch.setattr(hessian, "SINGLE_FORM", 1 << 28)


def test_the_reversed_damped_hessian_is_the_damped_one_with_its_order_reversed():
    from onnx_lobs.hessian import damped_hessian

    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 6))
    x[:, [1, 4]] = 0.0  # dead inputs
    h = x.T @ x / 40
    hd, dead = damped_hessian(h, 0.1)
    rev, dead_r = damped_hessian(h, 0.1, np.float32, reverse=True)
    assert rev.dtype == np.float32 and rev.flags.c_contiguous
    np.testing.assert_array_equal(dead_r, dead)
    np.testing.assert_allclose(rev, hd[::-1, ::-1], rtol=1e-6)
    assert hd[1, 1] == pytest.approx(1.0 + 0.1 * np.mean(np.diagonal(h))) and not hd[1, [0, 2, 3, 5]].any()


# ----------------------------------------------------------------------------------------------
# held-out columns: kept as they are while smaller than their sums


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n, folded", [(6, False), (40, True)])
def test_held_out_columns_give_the_errors_and_hessians_of_their_sums(bias, n, folded):
    rng = np.random.default_rng(40 + bias)
    groups, cols, rows = 2, 7, 3
    x = rng.standard_normal((groups, n, cols)) + 0.3
    held = hessian.HeldOut(groups, cols, bias)
    ref = HessianAccumulator(groups, cols, bias, exact=True)
    for part in (x[:, :n // 2], x[:, n // 2:], x[:, :0]):
        held.add(part)
        ref.add(part)
    assert held.n == ref.n == n
    # columns while they take less than the sums would, sums beyond (40 x 7 floats > 7 x 8 doubles)
    assert (held.sums is not None) == folded and held.nbytes <= held.limit
    assert held.limit == ref._xx.nbytes + ref._x.nbytes
    xa = augmented(x, bias)
    for g in range(groups):
        w = rng.standard_normal((rows, cols + bias))
        direct = _direct_energy(w, xa[g])
        assert held.quadratic_form(g, w) == pytest.approx(direct, rel=1e-6 if folded else 1e-12)
    np.testing.assert_allclose(held.hessian(), ref.hessian(), rtol=1e-6, atol=1e-6)
    for got, want in zip(held.blocks(3), ref.blocks(3)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_held_out_columns_are_checked_like_sums():
    held = hessian.HeldOut(2, 4, False)
    with pytest.raises(ValueError, match="2 group"):
        held.add(np.zeros((1, 3, 4), np.float32))
    with pytest.raises(ValueError, match="no calibration samples"):
        held.quadratic_form(0, np.zeros((1, 4)))
