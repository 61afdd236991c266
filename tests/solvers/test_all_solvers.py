"""What every solver must do: invariants, N:M patterns, degenerate Hessians, and quality."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs.hessian import layer_error
from onnx_lobs.solvers import (METHODS, SOLVERS, Target, get_solver, lobs, magnitude, nm_groups,
                               obc, sparsegpt, wanda)

from .common import (bias_protect, check_invariants, contiguous_groups, conv_groups,
                     correlated_samples, hessian_of, n_removable, solve_with)

USES_HINV = {m for m, spec in SOLVERS.items() if spec.factor is not None}


def test_registry():
    assert METHODS == ("auto", "lobs", "obc", "sparsegpt", "wanda", "magnitude")
    for name, module in zip(METHODS[1:], (lobs, obc, sparsegpt, wanda, magnitude)):
        assert get_solver(name) is module.solve
    with pytest.raises(KeyError):
        get_solver("nope")
    assert USES_HINV == {"lobs", "obc", "sparsegpt"}
    for name, spec in SOLVERS.items():
        assert spec.name == name and spec.summary
    assert SOLVERS["obc"].fixed_damp == 0.01 and dict(SOLVERS["sparsegpt"].options) == {"block": 128}


@pytest.mark.parametrize("shape,method", [
    ((1, 16, 27), "obc"), ((1, 128, 128), "obc"), ((384, 1, 10), "obc"),  # cheap, or stacked groups
    ((1, 160, 961), "sparsegpt"), ((1, 1000, 100), "sparsegpt"), ((1, 4, 1281), "sparsegpt")])
def test_auto_takes_obc_where_it_is_cheap(shape, method):
    from onnx_lobs.solvers import resolve

    assert resolve("auto", *shape).name == method
    assert resolve("lobs", *shape).name == "lobs"


# --- invariants ----------------------------------------------------------------------------------

def _problem(seed, rows=5, cols=13, bias=True):
    rng = np.random.default_rng(seed)
    x = correlated_samples(rng, 4 * cols, cols)
    protect = None
    if bias:
        x[:, -1] = 1.0
        protect = bias_protect(cols)
    w = rng.standard_normal((rows, cols))
    w[rng.random(w.shape) < 0.1] = 0.0
    return w, hessian_of(x), protect


@pytest.mark.parametrize("method", tuple(SOLVERS))
@pytest.mark.parametrize("seed", range(4))
def test_exact_counts_and_invariants(method, seed):
    w, h, protect = _problem(seed, bias=seed % 2 == 0)
    w0, h0 = w.copy(), h.copy()
    total = n_removable(w, protect)
    for k in (0, 1, 7, total // 2, total - 1, total, total + 5):
        sol = get_solver(method)(w, h, Target(n_prune=k, protect=protect))
        check_invariants(sol, w, protect, expected_count=min(k, total))
        assert (sol.damp is not None) == (method in USES_HINV)
    np.testing.assert_array_equal(w, w0)  # inputs untouched
    np.testing.assert_array_equal(h, h0)


@pytest.mark.parametrize("method", tuple(SOLVERS))
def test_max_loss_respected(method):
    w, h, protect = _problem(11)
    everything = layer_error(w, np.where(protect[None, :], w, 0.0), h)
    for frac in (0.0, 0.01, 0.1, 0.5, 2.0):
        sol = get_solver(method)(w, h, Target(max_loss=frac * everything, protect=protect))
        check_invariants(sol, w, protect)
        assert layer_error(w, sol.weights, h) <= frac * everything * (1 + 1e-9) + 1e-12
    # A generous budget removes everything removable.
    assert sol.pruned.sum() == n_removable(w, protect)


# --- N:M -----------------------------------------------------------------------------------------

NM_PATTERNS = {
    "2:4 linear": lambda: (contiguous_groups(16, 4), 2, 17),
    "1:4 linear": lambda: (contiguous_groups(16, 4), 1, 17),
    "4:8 linear": lambda: (contiguous_groups(16, 8), 4, 17),
    "2:4 conv": lambda: (conv_groups(8, 3, 4), 2, 25),  # columns c * 3 + k: stride 3
    "1:2 conv": lambda: (conv_groups(6, 4, 2), 1, 25),
    "0:4 all": lambda: (contiguous_groups(16, 4), 0, 17),
    "4:4 none": lambda: (contiguous_groups(16, 4), 4, 17),
    "shuffled": lambda: (np.random.default_rng(0).permutation(16).reshape(4, 4), 2, 17),
}


@pytest.mark.parametrize("method", tuple(SOLVERS))
@pytest.mark.parametrize("pattern", list(NM_PATTERNS))
def test_nm_validity(method, pattern):
    groups, keep, cols = NM_PATTERNS[pattern]()
    rng = np.random.default_rng(len(pattern))
    x = correlated_samples(rng, 80, cols)
    x[:, -1] = 1.0
    x[:, int(groups[0, 0])] = 0.0  # a dead input in a group
    h = hessian_of(x)
    w = rng.standard_normal((6, cols))
    w[0, groups[1]] = 0.0  # a whole group already zero in one row
    protect = bias_protect(cols)
    sol = solve_with(method, w, h, Target(n_prune=3, max_loss=None, protect=protect, nm=groups, nm_keep=keep),
                     block=5)
    check_invariants(sol, w, protect, nm=groups, nm_keep=keep)
    per_row = groups.shape[0] * (groups.shape[1] - keep)
    assert sol.pruned.sum() == w.shape[0] * per_row
    # max_loss is ignored too
    again = solve_with(method, w, h, Target(max_loss=0.0, protect=protect, nm=groups, nm_keep=keep), block=5)
    np.testing.assert_array_equal(again.pruned, sol.pruned)


def test_nm_magnitude_and_wanda_pick_the_smallest_per_group():
    groups = conv_groups(4, 2, 2)  # [[0, 2], [4, 6], [1, 3], [5, 7]]
    w = np.array([[1.0, -2.0, 3.0, 0.5, -0.1, 7.0, 0.2, 1.0]])
    h = np.diag([1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 1.0, 1.0])
    mag = magnitude.solve(w, h, Target(nm=groups, nm_keep=1))
    np.testing.assert_array_equal(np.flatnonzero(mag.pruned[0]), [0, 3, 4, 7])
    wan = wanda.solve(w, h, Target(nm=groups, nm_keep=1))  # 0.5 * 10 > 2 * 1: column 1 goes
    np.testing.assert_array_equal(np.flatnonzero(wan.pruned[0]), [0, 1, 4, 7])


@pytest.mark.parametrize("method", ["lobs", "obc", "sparsegpt"])
def test_nm_with_compensation_beats_magnitude(method):
    rng = np.random.default_rng(1)
    cols = 32
    latent = rng.standard_normal((300, 6))
    x = latent @ rng.standard_normal((6, cols)) + 0.2 * rng.standard_normal((300, cols))
    h = hessian_of(x)
    w = rng.standard_normal((8, cols))
    groups = contiguous_groups(cols, 4)
    target = Target(nm=groups, nm_keep=2)
    err = layer_error(w, get_solver(method)(w, h, target).weights, h)
    assert err < 0.5 * layer_error(w, magnitude.solve(w, h, target).weights, h)


def test_nm_groups_validation():
    def target(**kw):
        return Target(nm=np.array(kw.pop("nm")), nm_keep=kw.pop("keep", 2), **kw)
    assert nm_groups(8, Target()) is None
    np.testing.assert_array_equal(nm_groups(8, target(nm=[[0, 1, 2, 3]])), [[0, 1, 2, 3]])
    with pytest.raises(ValueError):
        nm_groups(8, target(nm=[[0, 1, 2, 8]]))  # out of range
    with pytest.raises(ValueError):
        nm_groups(8, target(nm=[[0, 1], [1, 2]]))  # overlap
    with pytest.raises(ValueError):
        nm_groups(8, target(nm=[[4, 5, 6, 7]], protect=bias_protect(8)))  # protected column
    with pytest.raises(ValueError):
        nm_groups(8, target(nm=[0, 1, 2, 3]))  # not 2-D
    with pytest.raises(ValueError):
        nm_groups(8, target(nm=[[0, 1]], keep=-1))


# --- degenerate Hessians -------------------------------------------------------------------------

def _degenerate(kind, rng):
    rows, cols = 4, 10
    n = {"rank_deficient": 4, "single_sample": 1}.get(kind, 50)
    x = correlated_samples(rng, n, cols)
    x[:, -1] = 1.0
    if kind == "constant_column":
        x[:, 3] = 2.5  # collinear with the bias input
    if kind == "duplicate_columns":
        x[:, 5] = x[:, 4]
    if kind == "dead_columns":
        x[:, 0] = 0.0
        x[:, 6] = 0.0
    if kind == "all_dead":
        x[:] = 0.0
    if kind == "huge_scales":
        x *= np.logspace(-6, 6, cols)
    if kind == "everything":
        x[:, 0] = 0.0
        x[:, 3] = -1.5
        x[:, 5] = x[:, 4]
    return rng.standard_normal((rows, cols)) * 10.0, hessian_of(x)


DEGENERATE = ["rank_deficient", "single_sample", "constant_column", "duplicate_columns",
              "dead_columns", "all_dead", "huge_scales", "everything"]


@pytest.mark.parametrize("method", tuple(SOLVERS))
@pytest.mark.parametrize("damp", [0.0, 1e-12, 0.01])
@pytest.mark.parametrize("kind", DEGENERATE)
def test_degenerate_hessian_stays_finite(method, kind, damp):
    rng = np.random.default_rng(DEGENERATE.index(kind))
    w, h = _degenerate(kind, rng)
    protect = bias_protect(w.shape[1])
    total = n_removable(w, protect)
    solver = get_solver(method)
    for k in (0, 1, 7, total // 2, total - 1, total):
        sol = solve_with(method, w, h, Target(n_prune=k, protect=protect, damp=damp), block=3)
        check_invariants(sol, w, protect, expected_count=k)
        if method in USES_HINV:
            assert sol.damp >= damp
            assert bool(sol.notes) == (sol.damp != damp)
    sol = solver(w, h, Target(max_loss=1e-3 * layer_error(w, 0 * w, h) + 1e-9, protect=protect, damp=damp))
    check_invariants(sol, w, protect)
    groups = contiguous_groups(8, 4)
    sol = solve_with(method, w, h, Target(protect=protect, damp=damp, nm=groups, nm_keep=2), block=3)
    check_invariants(sol, w, protect, nm=groups, nm_keep=2)


@pytest.mark.parametrize("method", ["lobs", "obc", "sparsegpt", "wanda"])
def test_dead_inputs_are_free(method):
    """Weights on inputs that never fire cost nothing: they go first, and the error is as if
    those inputs' weights were simply zeroed."""
    rng = np.random.default_rng(3)
    x = correlated_samples(rng, 60, 8)
    x[:, [2, 5]] = 0.0
    w = rng.standard_normal((3, 8)) * 5.0
    h = hessian_of(x)
    sol = solve_with(method, w, h, Target(n_prune=6), block=4)
    assert sol.pruned[:, [2, 5]].all()
    assert layer_error(w, sol.weights, h) == pytest.approx(0.0, abs=1e-12)
    if method != "wanda":
        assert sol.predicted_loss == pytest.approx(0.0, abs=1e-12)


# --- quality -------------------------------------------------------------------------------------

def _correlated_layer(seed, rows=16, cols=48, scales=False):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((500, 8))
    x = latent @ rng.standard_normal((8, cols)) + 0.3 * rng.standard_normal((500, cols))
    if scales:
        x *= np.exp(rng.normal(0.0, 1.5, cols))  # very different column scales
    return rng.standard_normal((rows, cols)), hessian_of(x)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_quality_ordering(seed, fraction):
    w, h = _correlated_layer(seed)
    k = int(fraction * w.size)
    err = {m: layer_error(w, get_solver(m)(w, h, Target(n_prune=k)).weights, h) for m in SOLVERS}
    assert err["obc"] <= err["lobs"] * (1 + 1e-9)
    assert err["obc"] < err["magnitude"]
    assert err["sparsegpt"] < err["magnitude"]
    assert err["obc"] <= err["sparsegpt"] * 1.05  # greedy per row vs a fixed column order


@pytest.mark.parametrize("seed", range(3))
def test_wanda_beats_magnitude_on_uneven_input_scales(seed):
    w, h = _correlated_layer(seed, scales=True)
    for fraction in (0.3, 0.6):
        k = int(fraction * w.size)
        by_wanda = layer_error(w, wanda.solve(w, h, Target(n_prune=k)).weights, h)
        by_magnitude = layer_error(w, magnitude.solve(w, h, Target(n_prune=k)).weights, h)
        assert by_wanda <= by_magnitude
