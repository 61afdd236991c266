"""solve.py's layer-wise objective against the direct mean over samples."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs.solve import _Objective


@pytest.mark.parametrize("joint", [False, True])
def test_objective_equals_the_mean_squared_output_change(joint):
    rng = np.random.default_rng(3 + joint)
    n, rows, cols = 300, 6, 9
    xd = rng.standard_normal((n, cols)) * rng.uniform(0.5, 2.0, cols)
    xp = xd + 0.3 * rng.standard_normal((n, cols)) if joint else xd
    w = rng.standard_normal((rows, cols))
    hp, c, hd = (a.T @ b / n for a, b in ((xp, xp), (xd, xp), (xd, xd)))
    obj = _Objective(w, hp, c, hd, joint)
    assert obj.energy == pytest.approx(0.5 * np.mean(np.sum((xd @ w.T) ** 2, axis=1)), rel=1e-12)
    for w_new in (w, w * (rng.random(w.shape) > 0.5), rng.standard_normal((rows, cols))):
        direct = 0.5 * np.mean(np.sum((xp @ w_new.T - xd @ w.T) ** 2, axis=1))
        assert obj.error(w_new) == pytest.approx(direct, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", ["upper", "inverse"])
def test_times_inverse_equals_a_cholesky_solve_and_fills_the_solvers_memo(kind):
    """Sequential mode's W0 = W C Hd^-1 through the factorisation the solver memoises, dead inputs
    and a tiny dampening included, equals the direct damped solve."""
    from onnx_lobs.hessian import damped_solve
    from onnx_lobs.solvers._damped import times_inverse

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
