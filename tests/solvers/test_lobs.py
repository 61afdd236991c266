"""The L-OBS solver against slow, obviously-correct references on small random problems.

H is always built as X^T X / n from random samples X, so every claim about "the layer's output
error" can be checked directly on X.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs.hessian import damped_inverse, layer_error
from onnx_lobs.solvers import Target, get_solver, lobs, magnitude


def hessian_of(x: np.ndarray) -> np.ndarray:
    return x.T @ x / x.shape[0]


def correlated_samples(rng, n: int, cols: int) -> np.ndarray:
    """Samples whose columns are mixed (correlated), with varied scales."""
    return rng.standard_normal((n, cols)) @ rng.standard_normal((cols, cols))


def output_error(x: np.ndarray, w_old: np.ndarray, w_new: np.ndarray) -> float:
    """(1/2n) sum over samples of ||(W' - W) x||^2, measured on the samples themselves."""
    return 0.5 * float(np.sum((x @ (w_new - w_old).T) ** 2)) / x.shape[0]


def reference_greedy(w, h, n_prune=None, max_loss=None, protect=None, damp=0.01):
    """The layer-wide L-OBS greedy, one removal at a time, in plain loops.

    At every step: the cost of every remaining removable weight in every row, from the current
    weights and the fixed damped H^-1; take the cheapest (first in row-major order on a tie);
    compensate its row; zero every removed entry of that row. Inputs that were zero on every
    sample (dead) carry no signal, so removing their weights costs nothing.
    """
    inv = damped_inverse(h, damp)
    hinv = inv.hinv
    rows, cols = w.shape
    removable = [protect is None or not protect[q] for q in range(cols)]
    cur = np.array(w, dtype=np.float64)
    removed = np.zeros(w.shape, dtype=bool)
    total = 0.0
    n_removable = rows * sum(removable)
    costs = []  # the L of each removal, in order
    steps = n_removable if n_prune is None else min(n_prune, n_removable)
    for _ in range(steps):
        best = None
        for r in range(rows):
            for q in range(cols):
                if removed[r, q] or not removable[q]:
                    continue
                cost = 0.0 if inv.dead[q] else cur[r, q] ** 2 / (2.0 * hinv[q, q])
                if best is None or cost < best[0]:
                    best = (cost, r, q)
        cost, r, q = best
        if n_prune is None and total + cost > max_loss:
            break
        total += cost
        costs.append(cost)
        c = cur[r, q] / hinv[q, q]
        cur[r] = cur[r] - c * hinv[q]
        removed[r, q] = True
        for j in range(cols):
            if removed[r, j]:
                cur[r, j] = 0.0
    return cur, removed, total, costs


def bias_protect(cols: int) -> np.ndarray:
    protect = np.zeros(cols, dtype=bool)
    protect[-1] = True
    return protect


def check_invariants(sol, w, protect, expected_count=None):
    assert sol.weights.shape == w.shape and sol.weights.dtype == np.float64
    assert sol.pruned.shape == w.shape and sol.pruned.dtype == bool
    assert np.all(np.isfinite(sol.weights))
    assert np.all(sol.weights[sol.pruned] == 0.0)
    if protect is not None:
        assert not sol.pruned[:, protect].any()
    if expected_count is not None:
        assert int(sol.pruned.sum()) == expected_count
    assert np.isfinite(sol.predicted_loss) and sol.predicted_loss >= 0.0


# --- one removal is the exact least-squares optimum --------------------------------------------

@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_single_removal_is_least_squares_optimum(seed, with_bias):
    rng = np.random.default_rng(seed)
    n, cols, rows = 200, 7, 5
    x = correlated_samples(rng, n, cols)
    protect = None
    if with_bias:
        x[:, -1] = 1.0
        protect = bias_protect(cols)
    h = hessian_of(x)
    w = rng.standard_normal((rows, cols))

    sol = lobs.solve(w, h, Target(n_prune=1, damp=0.0, protect=protect))
    assert sol.damp == 0.0 and sol.notes == []
    check_invariants(sol, w, protect, expected_count=1)
    (r,), (q,) = np.nonzero(sol.pruned)

    # The removed weight has the smallest w_q^2 / (2 [H^-1]_qq) over the whole matrix.
    hinv = np.linalg.inv(h)
    cost = w ** 2 / (2.0 * np.diagonal(hinv))[None, :]
    if protect is not None:
        cost[:, protect] = np.inf
    assert np.unravel_index(np.argmin(cost), cost.shape) == (r, q)

    # Its row is the least-squares refit of the other weights to the original outputs.
    keep = np.arange(cols) != q
    refit, *_ = np.linalg.lstsq(x[:, keep], x @ w[r], rcond=None)
    assert sol.weights[r, q] == 0.0
    np.testing.assert_allclose(sol.weights[r, keep], refit, rtol=1e-8, atol=1e-10)
    # The other rows are untouched.
    others = np.arange(rows) != r
    np.testing.assert_array_equal(sol.weights[others], w[others])

    # The predicted loss is the measured output error, and the layer_error through H.
    measured = output_error(x, w, sol.weights)
    assert sol.predicted_loss == pytest.approx(measured, rel=1e-8)
    assert layer_error(w, sol.weights, h) == pytest.approx(measured, rel=1e-8)
    assert sol.predicted_loss == pytest.approx(cost[r, q], rel=1e-10)


# --- the vectorised greedy is the brute-force greedy -------------------------------------------

def _random_case(seed):
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 7))
    cols = int(rng.integers(1, 16))
    n = int(rng.integers(cols, 4 * cols + 2))  # usually full rank
    x = correlated_samples(rng, n, cols)
    w = rng.standard_normal((rows, cols)) * np.exp(rng.normal(0.0, 1.5, size=(rows, 1)))
    protect = None
    if cols > 1 and rng.random() < 0.5:
        x[:, -1] = 1.0
        protect = bias_protect(cols)
    if cols > 2 and rng.random() < 0.3:
        x[:, int(rng.integers(0, cols - 1))] = 0.0  # a dead input
    if rng.random() < 0.3:
        w[rng.random(w.shape) < 0.25] = 0.0  # some weights already zero
    damp = float(rng.choice([0.0, 1e-3, 0.01, 0.1]))
    return w, hessian_of(x), protect, damp, rng


def _edge_cases():
    rng = np.random.default_rng(1234)

    def problem(rows, cols, n=None, bias=False):
        x = correlated_samples(rng, n or 3 * cols + 5, cols)
        if bias:
            x[:, -1] = 1.0
        return rng.standard_normal((rows, cols)), x

    cases = {}
    w, x = problem(4, 6)
    cases["n_prune=0"] = (w, hessian_of(x), None, 0.01, 0)
    cases["all_removable"] = (w, hessian_of(x), None, 0.01, w.size)
    cases["more_than_all"] = (w, hessian_of(x), None, 0.01, w.size + 7)
    w, x = problem(1, 9)
    cases["one_row"] = (w, hessian_of(x), None, 0.01, 5)
    w, x = problem(5, 1)
    cases["one_column"] = (w, hessian_of(x), None, 0.01, 3)
    cases["one_column_protected"] = (w, hessian_of(x), bias_protect(1), 0.01, 3)
    w, x = problem(5, 8, bias=True)
    cases["bias_all_removable"] = (w, hessian_of(x), bias_protect(8), 0.01, 5 * 7)
    cases["bias_half"] = (w, hessian_of(x), bias_protect(8), 0.01, 17)
    w, x = problem(4, 8)
    w[0, 1] = w[2, 5] = w[3, 0] = w[3, 7] = 0.0
    cases["zero_weights"] = (w, hessian_of(x), None, 0.01, 9)
    cases["zero_weights_cut_ties"] = (w, hessian_of(x), None, 0.01, 2)
    w, x = problem(4, 8, bias=True)
    x[:, 2] = 0.0
    x[:, 5] = 0.0
    cases["dead_columns"] = (w, hessian_of(x), bias_protect(8), 0.01, 11)
    cases["dead_columns_cut_ties"] = (w, hessian_of(x), bias_protect(8), 0.01, 3)
    # One row far smaller than the rest: the merge must extend that row's sequence repeatedly.
    w, x = problem(8, 30)
    w[3] *= 1e-3
    cases["one_tiny_row"] = (w, hessian_of(x), None, 0.01, 45)
    w, x = problem(6, 20, bias=True)
    w *= np.array([1e-2, 1.0, 1e2, 1e-1, 10.0, 1.0])[:, None]
    cases["row_scales"] = (w, hessian_of(x), bias_protect(20), 0.01, 60)
    return cases


EDGE_CASES = _edge_cases()


def _assert_same_as_reference(sol, ref_w, ref_mask, ref_total, _costs=None):
    np.testing.assert_array_equal(sol.pruned, ref_mask)
    scale = max(1.0, float(np.abs(ref_w).max()))
    np.testing.assert_allclose(sol.weights, ref_w, rtol=0, atol=1e-10 * scale)
    assert sol.predicted_loss == pytest.approx(ref_total, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_reference(name):
    w, h, protect, damp, n_prune = EDGE_CASES[name]
    w0, h0 = w.copy(), h.copy()
    sol = lobs.solve(w, h, Target(n_prune=n_prune, protect=protect, damp=damp))
    ref_w, ref_mask, ref_total, _ = reference_greedy(w, h, n_prune=n_prune, protect=protect, damp=damp)
    n_removable = w.shape[0] * int(w.shape[1] - (0 if protect is None else protect.sum()))
    check_invariants(sol, w, protect, expected_count=min(n_prune, n_removable))
    _assert_same_as_reference(sol, ref_w, ref_mask, ref_total)
    # The inputs are not modified.
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(h, h0)


@pytest.mark.parametrize("seed", range(80))
def test_random_n_prune_matches_reference(seed):
    w, h, protect, damp, rng = _random_case(seed)
    n_removable = w.shape[0] * int(w.shape[1] - (0 if protect is None else protect.sum()))
    n_prune = int(rng.integers(0, n_removable + 1))
    sol = lobs.solve(w, h, Target(n_prune=n_prune, protect=protect, damp=damp))
    check_invariants(sol, w, protect, expected_count=n_prune)
    _assert_same_as_reference(sol, *reference_greedy(w, h, n_prune=n_prune, protect=protect, damp=damp))


def _budgets(w, h, protect, damp, rng):
    """max_loss values safely between the reference's cumulative sums, plus 0 and 'everything'."""
    costs = reference_greedy(w, h, protect=protect, damp=damp, max_loss=np.inf)[3]
    cums = np.concatenate([[0.0], np.cumsum(costs)])
    steps = []
    for a, b in zip(cums[:-1], cums[1:]):
        if b - a > 1e-9 * max(1.0, abs(b)):
            steps.append(0.5 * (a + b))
    picks = list(rng.choice(steps, size=min(3, len(steps)), replace=False)) if steps else []
    return [0.0, *picks, 2.0 * cums[-1] + 1.0]


def _check_max_loss(sol, w, h, budget, ref, protect, damp):
    """The paper's stopping rule (sum of single-removal losses within budget), except that the
    solver backs off along the same greedy order when the real error of that set passes it."""
    ref_w, ref_mask = ref[0], ref[1]
    if layer_error(w, ref_w, h) <= budget:
        check_invariants(sol, w, protect, expected_count=int(ref_mask.sum()))
        _assert_same_as_reference(sol, *ref)
    else:
        check_invariants(sol, w, protect)
        assert sol.pruned.sum() < ref_mask.sum()
        assert layer_error(w, sol.weights, h) <= budget
    assert sol.predicted_loss <= budget * (1 + 1e-12)
    # Stopping by budget after k removals is the same as asking for k removals.
    by_count = lobs.solve(w, h, Target(n_prune=int(sol.pruned.sum()), protect=protect, damp=damp))
    np.testing.assert_array_equal(by_count.pruned, sol.pruned)
    np.testing.assert_array_equal(by_count.weights, sol.weights)


@pytest.mark.parametrize("seed", range(30))
def test_random_max_loss_matches_reference(seed):
    w, h, protect, damp, rng = _random_case(100 + seed)
    for budget in _budgets(w, h, protect, damp, rng):
        sol = lobs.solve(w, h, Target(max_loss=float(budget), protect=protect, damp=damp))
        ref = reference_greedy(w, h, max_loss=float(budget), protect=protect, damp=damp)
        _check_max_loss(sol, w, h, budget, ref, protect, damp)


def test_max_loss_backs_off_when_the_real_error_passes_the_budget():
    backed_off = 0
    for seed in range(30):
        w, h, protect, damp, rng = _random_case(100 + seed)
        for budget in _budgets(w, h, protect, damp, rng):
            ref = reference_greedy(w, h, max_loss=float(budget), protect=protect, damp=damp)
            backed_off += layer_error(w, ref[0], h) > budget
    assert backed_off > 0  # the random cases do exercise the back-off


@pytest.mark.parametrize("name", ["one_tiny_row", "row_scales", "bias_half", "dead_columns"])
def test_edge_cases_max_loss_match_reference(name):
    w, h, protect, damp, _ = EDGE_CASES[name]
    rng = np.random.default_rng(7)
    for budget in _budgets(w, h, protect, damp, rng):
        sol = lobs.solve(w, h, Target(max_loss=float(budget), protect=protect, damp=damp))
        ref = reference_greedy(w, h, max_loss=float(budget), protect=protect, damp=damp)
        _check_max_loss(sol, w, h, budget, ref, protect, damp)


def test_max_loss_zero_removes_only_free_weights():
    rng = np.random.default_rng(11)
    x = correlated_samples(rng, 40, 6)
    x[:, 2] = 0.0
    w = rng.standard_normal((3, 6))
    w[1, 4] = 0.0
    sol = lobs.solve(w, hessian_of(x), Target(max_loss=0.0))
    expected = np.zeros(w.shape, dtype=bool)
    expected[:, 2] = True
    expected[1, 4] = True
    np.testing.assert_array_equal(sol.pruned, expected)
    assert sol.predicted_loss == 0.0


# --- degenerate Hessians ------------------------------------------------------------------------

def _degenerate(kind, rng):
    rows, cols = 4, 10
    n = {"rank_deficient": 4, "single_sample": 1}.get(kind, 50)
    x = correlated_samples(rng, n, cols)
    x[:, -1] = 1.0  # the bias input
    if kind == "constant_column":
        x[:, 3] = 2.5  # collinear with the bias input
    if kind == "duplicate_columns":
        x[:, 5] = x[:, 4]
    if kind == "dead_columns":
        x[:, 0] = 0.0
        x[:, 6] = 0.0
    if kind == "all_dead":
        x[:] = 0.0
    if kind == "everything":
        x[:, 0] = 0.0
        x[:, 3] = -1.5
        x[:, 5] = x[:, 4]
    return rng.standard_normal((rows, cols)) * 10.0, hessian_of(x)


DEGENERATE = ["rank_deficient", "single_sample", "constant_column", "duplicate_columns",
              "dead_columns", "all_dead", "everything"]


@pytest.mark.parametrize("damp", [0.0, 1e-12, 0.01])
@pytest.mark.parametrize("kind", DEGENERATE)
def test_degenerate_hessian_stays_finite(kind, damp):
    rng = np.random.default_rng(DEGENERATE.index(kind))
    w, h = _degenerate(kind, rng)
    protect = bias_protect(w.shape[1])
    n_removable = w.shape[0] * (w.shape[1] - 1)
    for n_prune in (0, 1, 7, n_removable // 2, n_removable - 1, n_removable, n_removable + 3):
        sol = lobs.solve(w, h, Target(n_prune=n_prune, protect=protect, damp=damp))
        check_invariants(sol, w, protect, expected_count=min(n_prune, n_removable))
        assert sol.damp is not None and sol.damp >= damp
        if sol.damp != damp:
            assert sol.notes
        ref_w, ref_mask, _, _ = reference_greedy(w, h, n_prune=n_prune, protect=protect, damp=damp)
        np.testing.assert_array_equal(sol.pruned, ref_mask)
        np.testing.assert_allclose(sol.weights, ref_w, rtol=1e-7, atol=1e-7 * np.abs(ref_w).max())
    sol = lobs.solve(w, h, Target(max_loss=1e-3 * layer_error(w, 0 * w, h) + 1e-9, protect=protect, damp=damp))
    check_invariants(sol, w, protect)


def test_protected_column_receives_compensation():
    rng = np.random.default_rng(5)
    x = correlated_samples(rng, 100, 6)
    x[:, -1] = 1.0
    x[:, :-1] += 3.0  # inputs with a mean: removing weights shifts the output, the bias absorbs it
    w = rng.standard_normal((3, 6))
    sol = lobs.solve(w, hessian_of(x), Target(n_prune=6, protect=bias_protect(6), damp=0.0))
    assert not sol.pruned[:, -1].any()
    changed_rows = sol.pruned.any(axis=1)
    assert np.all(sol.weights[changed_rows, -1] != w[changed_rows, -1])


# --- quality: compensation beats magnitude pruning ----------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_lobs_beats_magnitude_on_correlated_inputs(seed, fraction):
    rng = np.random.default_rng(seed)
    n, cols, rows = 400, 24, 12
    latent = rng.standard_normal((n, 6))
    x = latent @ rng.standard_normal((6, cols)) + 0.2 * rng.standard_normal((n, cols))
    h = hessian_of(x)
    w = rng.standard_normal((rows, cols))
    n_prune = int(fraction * w.size)
    by_lobs = get_solver("lobs")(w, h, Target(n_prune=n_prune))
    by_magnitude = get_solver("magnitude")(w, h, Target(n_prune=n_prune))
    assert by_lobs.pruned.sum() == by_magnitude.pruned.sum() == n_prune
    err_lobs = layer_error(w, by_lobs.weights, h)
    err_magnitude = layer_error(w, by_magnitude.weights, h)
    assert err_lobs == pytest.approx(output_error(x, w, by_lobs.weights), rel=1e-8)
    assert err_lobs < 0.5 * err_magnitude


def test_solver_registry():
    assert get_solver("lobs") is lobs.solve
    assert get_solver("magnitude") is magnitude.solve
    with pytest.raises(KeyError):
        get_solver("nope")


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_row_chunks_give_the_same_result_as_one_block(monkeypatch, pattern):
    """advance() takes rows in cache-sized chunks; down to one row per chunk, nothing changes."""
    rng = np.random.default_rng(41)
    x = correlated_samples(rng, 60, 12)
    w = rng.standard_normal((9, 12))
    h = hessian_of(x)
    if pattern is None:
        target = Target(n_prune=50, damp=0.01)
    else:
        target = Target(nm=np.arange(12).reshape(3, 4), nm_keep=2, damp=0.01)
    whole = lobs.solve(w, h, target)
    monkeypatch.setattr(lobs, "CHUNK_BYTES", 1)
    chunked = lobs.solve(w, h, target)
    np.testing.assert_array_equal(chunked.pruned, whole.pruned)
    np.testing.assert_allclose(chunked.weights, whole.weights, rtol=0, atol=1e-12)
    assert chunked.predicted_loss == pytest.approx(whole.predicted_loss, rel=1e-12)
