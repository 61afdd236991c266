"""solve.py's layer-wise objective against the direct mean over samples."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from onnx_lobs.solve import Objective


@pytest.mark.parametrize("joint", [False, True])
def test_objective_equals_the_mean_squared_output_change(joint):
    rng = np.random.default_rng(3 + joint)
    n, rows, cols = 300, 6, 9
    xd = rng.standard_normal((n, cols)) * rng.uniform(0.5, 2.0, cols)
    xp = xd + 0.3 * rng.standard_normal((n, cols)) if joint else xd
    w = rng.standard_normal((rows, cols))
    hp, c, hd = (a.T @ b / n for a, b in ((xp, xp), (xd, xp), (xd, xd)))
    obj = Objective(w, hp, c, hd, joint)
    assert obj.energy == pytest.approx(0.5 * np.mean(np.sum((xd @ w.T) ** 2, axis=1)), rel=1e-12)
    for w_new in (w, w * (rng.random(w.shape) > 0.5), rng.standard_normal((rows, cols))):
        direct = 0.5 * np.mean(np.sum((xp @ w_new.T - xd @ w.T) ** 2, axis=1))
        assert obj.error(w_new) == pytest.approx(direct, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", ["upper", "inverse"])
def test_times_inverse_equals_a_cholesky_solve_and_fills_the_solvers_memo(kind):
    """Sequential mode's W0 = W C Hd^-1 through the factorisation the solver memoises, dead inputs
    and a tiny dampening included, equals the direct damped solve."""
    from onnx_lobs.hessian import damped_solve
    from onnx_lobs.solvers.factors import times_inverse

    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 8)) @ rng.standard_normal((8, 8))
    x[:, 3] = 0.0  # a dead input
    h = x.T @ x / 40
    a = rng.standard_normal((5, 8))
    memo = {}
    got = times_inverse(a, h, 0.01, kind, memo)
    ref = damped_solve(h, 0.01, a.T).T
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert list(memo) == [(kind, 0.01)]


# ----------------------------------------------------------------------------------------------
# the four steps of solve_layer, each against a direct computation on explicit activations

def _collected(dtype=np.float32, groups=1, joint=False, seed=7):
    """A one-layer model (grouped 1x1 Conv, or Gemm with a bias) and a collector fed explicit inputs."""
    from onnx_lobs.activations import Collector
    from onnx_lobs.graph import find_layers
    from onnx_lobs.modelio import LoadedModel
    from tests.builders import single_layer

    rng = np.random.default_rng(seed)
    if groups == 1:
        model = single_layer("Gemm", rng.standard_normal((6, 5)), (None, 6), bias=rng.standard_normal(5),
                             dtype=dtype)
        x = rng.standard_normal((200, 6)).astype(dtype)
    else:
        model = single_layer("Conv", rng.standard_normal((6, 6 // groups, 1, 1)), (None, 6, 3, 3),
                             bias=rng.standard_normal(6), attrs={"group": groups}, dtype=dtype)
        x = rng.standard_normal((40, 6, 3, 3)).astype(dtype)
    (layer,), _ = find_layers(LoadedModel(model, "m.onnx"))
    c = Collector(layer, joint)
    node = layer.uses[0].node
    xp = (x + 0.1 * rng.standard_normal(x.shape)).astype(dtype) if joint else None
    c.fold(False, node, x, xp)
    c.fold(True, node, x[:20], None if xp is None else xp[:20])
    return model, layer, c, x, xp


def _rows(x, layer):
    """The unfolded inputs with the bias column, float64: the rows H is the mean over."""
    if x.ndim == 4:  # a 1x1 conv: one row per sample and position, its channels split by group
        cols = np.moveaxis(x, 1, -1).reshape(-1, layer.geometry.groups, x.shape[1] // layer.geometry.groups)
    else:
        cols = x[:, None, :]
    return np.concatenate([cols, np.ones(cols.shape[:2] + (1,))], axis=2).astype(np.float64)


def test_prepare_gives_the_dense_matrices_and_the_mean_hessian():
    from onnx_lobs.solve import prepare

    for groups in (1, 3):
        _, layer, c, x, _ = _collected(groups=groups)
        p = prepare(c)
        w = layer.adapter.to_matrices(layer.uses[0].node, layer.read().astype(np.float64))
        np.testing.assert_array_equal(p.old, w)
        a = _rows(x, layer)
        for k in range(groups):
            np.testing.assert_allclose(p.hessians[0][k], a[:, k].T @ a[:, k] / len(a), rtol=1e-6, atol=1e-7)
        assert p.protect is not None and p.protect[-1] and not p.protect[:-1].any()


def test_prepare_refuses_an_overflowing_hessian():
    from onnx_lobs.errors import LobsError
    from onnx_lobs.solve import prepare

    _, _, c, _, _ = _collected()
    c.calib._xx[0, 0, 0] = np.inf
    with pytest.raises(LobsError, match="too large for a Hessian"):
        prepare(c)


def test_solve_groups_spreads_the_count_and_solves_each_group_as_the_solver_does():
    from onnx_lobs.pruning import PruneConfig
    from onnx_lobs.solve import prepare, solve_groups
    from onnx_lobs.solvers import SOLVERS, Target

    _, layer, c, _, _ = _collected(groups=3)
    p = prepare(c)
    config = PruneConfig(method="magnitude", damp=0.01)
    out = solve_groups(p, 0.5, config, None, layer.name)
    total = round(0.5 * p.old.size)
    counts = [total // 3 + (k < total % 3) for k in range(3)]
    assert [int(out.pruned[k].sum()) for k in range(3)] == counts
    for k in range(3):
        w = np.c_[p.old[k], p.old_b[k]]
        ref = SOLVERS["magnitude"].solve(w, p.hessians[0][k], Target(n_prune=counts[k], protect=p.protect, damp=0.01))
        np.testing.assert_array_equal(out.new[k], ref.weights[:, :-1])
        np.testing.assert_array_equal(out.new_b[k], ref.weights[:, -1])


def test_sequential_start_is_the_least_squares_refit_on_the_pruned_inputs():
    """W0 = W C H_p^-1 is what a least-squares fit of the dense outputs from the pruned inputs gives."""
    from onnx_lobs.pruning import PruneConfig
    from onnx_lobs.solve import prepare, solve_groups

    _, layer, c, x, xp = _collected(dtype=np.float64, joint=True)
    p = prepare(c)
    out = solve_groups(p, 0.0, PruneConfig(method="lobs", damp=0.01), None, layer.name)
    w = np.c_[p.old[0], p.old_b[0]]
    ad, ap = _rows(x, layer)[:, 0], _rows(xp, layer)[:, 0]
    refit = np.linalg.lstsq(ap, ad @ w.T, rcond=None)[0].T
    # nothing removed at target 0: the result is W0 up to the 1% dampening of H_p
    np.testing.assert_allclose(np.c_[out.new[0], out.new_b[0]], refit, rtol=0.05, atol=0.05)
    assert out.w0_err <= out.start_err


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_write_back_stores_in_the_weights_dtype_and_returns_what_was_stored(dtype):
    from onnx_lobs.pruning import PruneConfig
    from onnx_lobs.solve import prepare, solve_groups, write_back

    _, layer, c, _, _ = _collected(dtype=dtype)
    p = prepare(c)
    out = solve_groups(p, 0.5, PruneConfig(method="lobs", damp=0.01), None, layer.name)
    stored, new, new_b, mask = write_back(layer, out)
    assert layer.read().dtype == dtype and np.array_equal(layer.read(), stored)
    assert (stored[mask] == 0).all() and int(mask.sum()) == int(out.pruned.sum())
    node = layer.uses[0].node
    np.testing.assert_array_equal(new, layer.adapter.to_matrices(node, stored.astype(np.float64)))
    np.testing.assert_array_equal(new_b, layer.adapter.bias_vector(node, layer.read_bias(), new.shape[1]))


def test_measure_gives_the_direct_mean_squared_output_change():
    from onnx_lobs.pruning import PruneConfig
    from onnx_lobs.report import LayerRecord
    from onnx_lobs.solve import measure, prepare, solve_groups, write_back

    _, layer, c, x, _ = _collected(dtype=np.float64)
    p = prepare(c)
    out = solve_groups(p, 0.5, PruneConfig(method="lobs", damp=0.01), None, layer.name)
    _, new, new_b, _ = write_back(layer, out)
    record = LayerRecord(layer.name, layer.op, layer.weight_name, 5, 6)
    measure(p, new, new_b, c, record)
    a = _rows(x, layer)[:, 0]
    dw = np.c_[new[0], new_b[0]] - np.c_[p.old[0], p.old_b[0]]
    direct = 0.5 * np.mean(np.sum((a @ dw.T) ** 2, axis=1))
    held = 0.5 * np.mean(np.sum((a[:20] @ dw.T) ** 2, axis=1))
    energy = 0.5 * np.mean(np.sum((a @ np.c_[p.old[0], p.old_b[0]].T) ** 2, axis=1))
    assert record.error == pytest.approx(direct, rel=1e-9)
    assert record.holdout_error == pytest.approx(held, rel=1e-9)
    assert record.rel_error == pytest.approx(direct / energy, rel=1e-9)


@pytest.mark.parametrize("joint", [False, True])
def test_stacked_groups_are_least_squares_refits_of_what_each_row_keeps(joint):
    """A grouped layer solved as one stack (solvers/batched.py): the layer's count is met, the
    bias is kept, and each row's kept weights are the exact refit of the dense outputs from that
    row's kept inputs; in sequential mode, of the start W0's outputs (W0 = W C H_p^-1, damped
    as the per-group path damps it) from the pruned inputs."""
    from onnx_lobs.hessian import damped_solve
    from onnx_lobs.pruning import PruneConfig
    from onnx_lobs.solve import W0_DAMP, prepare, solve_groups
    from onnx_lobs.solvers import batched

    _, layer, c, x, xp = _collected(dtype=np.float64, groups=3, joint=joint)
    p = prepare(c)
    g, rows, cols = p.old.shape
    assert batched.fits("obc", g, rows, cols + 1)
    out = solve_groups(p, 0.5, PruneConfig(method="obc", damp=0.0), None, layer.name)
    assert int(out.pruned.sum()) == round(0.5 * p.old.size)
    ad = _rows(x, layer)
    ap = ad if xp is None else _rows(xp, layer)
    for k in range(g):
        w = np.c_[p.old[k], p.old_b[k]]
        if joint:
            w = damped_solve(p.hessians[0][k], W0_DAMP, (w @ p.hessians[1][k]).T).T
        new = np.c_[out.new[k], out.new_b[k]]
        for i in range(rows):
            keep = np.r_[~out.pruned[k, i], True]
            ref = np.linalg.lstsq(ap[:, k][:, keep], ap[:, k] @ w[i], rcond=None)[0]
            np.testing.assert_allclose(new[i, keep], ref, rtol=1e-6, atol=1e-8)
            assert (new[i, ~keep] == 0).all()


def _wide_problem(rng, rows=40, cols=30):
    x = rng.standard_normal((400, cols)) @ (np.eye(cols) + 0.3 * rng.standard_normal((cols, cols)))
    return rng.standard_normal((rows, cols)), x.T @ x / len(x)


def test_the_damp_grid_of_a_wide_layer_runs_on_its_middle_columns(monkeypatch):
    """Over 2 x GRID_COLS columns the grid problem is the middle GRID_COLS columns of DAMP_ROWS rows,
    with the matching share of the count, of the protected columns and of the N:M groups."""
    from onnx_lobs import solve
    monkeypatch.setattr(solve, "GRID_COLS", 8)
    monkeypatch.setattr(solve, "DAMP_ROWS", 6)
    rng = np.random.default_rng(3)
    w, h = _wide_problem(rng)
    protect = np.zeros(30, bool)
    protect[[0, 12, 29]] = True
    groups = np.arange(28).reshape(7, 4)  # columns 11..18 hold only group 3 (12..15) whole
    grid = solve._grid_problem(solve._Grid(w, h, 1.0, protect, groups))
    idx = np.arange(11, 19)
    rows = np.linspace(0, 39, 6).astype(int)
    np.testing.assert_array_equal(grid.w, w[rows][:, idx])
    np.testing.assert_array_equal(grid.h, h[np.ix_(idx, idx)])
    np.testing.assert_array_equal(grid.protect, protect[idx])
    np.testing.assert_array_equal(grid.nm, [[1, 2, 3, 4]])
    assert grid.share == pytest.approx(6 * 7 / (40 * 27))
    narrow = solve._grid_problem(solve._Grid(w[:, :16], h[:16, :16], 1.0, None, None))  # 16 <= 2 x 8: every column
    assert narrow.h.shape == (16, 16) and narrow.share == pytest.approx(6 / 40)


def test_best_damped_walks_the_grid_on_the_block_and_solves_the_whole_layer_at_its_choice(monkeypatch):
    from onnx_lobs import solve
    from onnx_lobs.hessian import layer_error
    from onnx_lobs.pruning import PruneConfig
    from onnx_lobs.solvers import SOLVERS, Target
    monkeypatch.setattr(solve, "GRID_COLS", 8)
    monkeypatch.setattr(solve, "DAMP_ROWS", 6)
    rng = np.random.default_rng(4)
    w, h = _wide_problem(rng)
    spec, count = SOLVERS["sparsegpt"], 600
    grid = solve._grid_problem(solve._Grid(w, h, 1.0, None, None))
    errors = []
    for damp in solve.DAMP_GRID:  # the walk, by hand
        sol = spec.solve(grid.w, grid.h, Target(n_prune=round(count * grid.share), damp=damp), **spec.options)
        errors.append(layer_error(grid.w, sol.weights, grid.h))
        if len(errors) > 1 and errors[-1] > errors[-2]:
            break
    chosen = solve.DAMP_GRID[int(np.argmin(errors))]
    got = solve.best_damped(spec, w, h, PruneConfig(sparsity=0.5), count, None)
    want = spec.solve(w, h, Target(n_prune=count, damp=chosen), **spec.options)
    assert got.damp == chosen and int(got.pruned.sum()) == count
    np.testing.assert_array_equal(got.pruned, want.pruned)
    np.testing.assert_allclose(got.weights, want.weights)


@pytest.mark.parametrize("rows, cols, single", [(2, 10, False), (2, 200, True), (2, 4096, True), (2, 4097, False),
                                                (129, 2047, False)])
def test_small_layers_are_solved_with_blas_on_one_thread(monkeypatch, rows, cols, single):
    """solve_groups runs the solver inside blas_threads: one BLAS thread for small matrices, the
    process's setting for large ones (cols beyond SINGLE_THREAD_COLS, or rows * cols^2 beyond
    SINGLE_THREAD_WORK: 129 x 2047^2 > 2^29) and for tiny ones (rows * cols^2 up to TINY_WORK:
    2 x 10^2, where switching costs more than the work), restored after."""
    from threadpoolctl import ThreadpoolController

    from onnx_lobs import solve
    from onnx_lobs.pruning import PruneConfig
    from onnx_lobs.solvers import SOLVERS

    def threads():
        return {i["num_threads"] for i in ThreadpoolController().info() if i["user_api"] == "blas"}

    seen = []

    def spy(w, h, target, **kw):
        seen.append(threads())
        return SOLVERS["magnitude"].solve(w, h, target)

    monkeypatch.setitem(SOLVERS, "spy", dataclasses.replace(SOLVERS["magnitude"], name="spy", solve=spy))
    monkeypatch.setattr(solve, "resolve", lambda method, g, rows, width: SOLVERS["spy"])
    with ThreadpoolController().limit(limits=2, user_api="blas"):
        before = threads()
        if not before:
            pytest.skip("threadpoolctl finds no BLAS here")
        p = solve.Problem(np.ones((1, rows, cols - 1)), np.ones((1, rows)), (np.eye(cols)[None],) * 3, False)
        solve.solve_groups(p, 0.5, PruneConfig(damp=0.01), None, "layer")
        after = threads()
    assert seen == [{1} if single else before] and after == before == {2}


def test_the_damp_grid_stops_at_a_tie():
    """Nothing removed: every damp gives an error of 0, and the walk stops at the second (each
    step costs a factorisation; stronger damping can do no better)."""
    from onnx_lobs.pruning import PruneConfig
    from onnx_lobs.solve import best_damped
    from onnx_lobs.solvers import SOLVERS

    rng = np.random.default_rng(8)
    w, h = _wide_problem(rng, rows=8, cols=12)
    memo = {}
    sol = best_damped(SOLVERS["sparsegpt"], w, h, PruneConfig(), 0, None, memo=memo)
    assert sorted(d for _, d in memo) == [0.01, 0.1] and sol.damp == 0.01
    np.testing.assert_array_equal(sol.weights, w)


# ----------------------------------------------------------------------------------------------
# sequential mode's guard against a correction that fits the calibration data's noise

def _joint(calib: int, noise: float, seed: int):
    """A Gemm (12 inputs, 8 outputs, bias) whose pruned inputs are the dense ones plus `noise`
    of independent noise, `calib` calibration and 400 held-out samples; the collector and both
    inputs' held-out rows (bias column included), float64."""
    from onnx_lobs.activations import Collector
    from onnx_lobs.graph import find_layers
    from onnx_lobs.modelio import LoadedModel
    from tests.builders import single_layer

    rng = np.random.default_rng(seed)
    model = single_layer("Gemm", rng.standard_normal((12, 8)), (None, 12), bias=rng.standard_normal(8),
                         dtype=np.float64)
    (layer,), _ = find_layers(LoadedModel(model, "m.onnx"))
    c = Collector(layer, True)
    x = rng.standard_normal((calib + 400, 12))
    xp = x + noise * rng.standard_normal(x.shape)
    node = layer.uses[0].node
    c.fold(False, node, x[:calib], xp[:calib])
    c.fold(True, node, x[calib:], xp[calib:])
    return layer, c, _rows(x[calib:], layer)[:, 0], _rows(xp[calib:], layer)[:, 0]


def _held_direct(p, solved, ad, ap):
    """(1/2n) sum ||W' x_p - W x_d||^2 over the held-out rows, straight from them."""
    w, new = np.c_[p.old[0], p.old_b[0]], np.c_[solved.new[0], solved.new_b[0]]
    return 0.5 * np.mean(np.sum((ap @ new.T - ad @ w.T) ** 2, axis=1))


@pytest.mark.parametrize("calib, noise, plain_kept", [(10, 1.0, True), (4000, 0.3, False)])
def test_sequential_mode_solves_from_w_where_the_correction_fails_on_held_out_samples(calib, noise, plain_kept):
    """Ten calibration samples for 13 columns: W0 = W C H_p^-1 fits their noise, and on new samples
    the solve from W itself does far better, so it is kept (and said); with plenty of samples the
    correction holds and its solve is kept. Either way the result is one of the two solves as
    solve_groups gives them, and the choice follows their held-out errors measured directly."""
    from onnx_lobs.pruning import PruneConfig
    from onnx_lobs.report import LayerRecord
    from onnx_lobs.solve import CORRECTION_GUARD, held_error, prepare, solve_groups, solve_layer

    layer, c, ad, ap = _joint(calib, noise, seed=5)
    config = PruneConfig(method="obc", damp=0.01)
    p = prepare(c)
    corrected = solve_groups(p, 0.5, config, None, layer.name)
    plain = solve_groups(dataclasses.replace(p, corrected=False), 0.5, config, None, layer.name)
    err_c, err_p = _held_direct(p, corrected, ad, ap), _held_direct(p, plain, ad, ap)
    assert held_error(p, c.hessians(c.hold), corrected) == pytest.approx(err_c, rel=1e-9)
    assert held_error(p, c.hessians(c.hold), plain) == pytest.approx(err_p, rel=1e-9)
    assert (err_p < CORRECTION_GUARD * err_c) == plain_kept
    record = LayerRecord(layer.name, layer.op, layer.weight_name, 8, 12)
    solve_layer(c, 0.5, record, config)
    w = layer.adapter.to_matrices(layer.uses[0].node, layer.read().astype(np.float64))
    np.testing.assert_allclose(w, (plain if plain_kept else corrected).new, rtol=1e-12, atol=1e-12)
    assert any("not the corrected W0" in n for n in record.notes) == plain_kept
    assert record.corrected_error == pytest.approx(corrected.w0_err)
