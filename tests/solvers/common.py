"""Helpers shared by the solver tests: sample-built Hessians, invariants, N:M groups."""

from __future__ import annotations

import numpy as np

from onnx_lobs.hessian import damped_inverse
from onnx_lobs.solvers import SOLVERS


def hessian_of(x: np.ndarray) -> np.ndarray:
    return x.T @ x / x.shape[0]


def correlated_samples(rng, n: int, cols: int) -> np.ndarray:
    """Samples whose columns are mixed (correlated), with varied scales."""
    return rng.standard_normal((n, cols)) @ rng.standard_normal((cols, cols))


def output_error(x: np.ndarray, w_old: np.ndarray, w_new: np.ndarray) -> float:
    """(1/2n) sum over samples of ||(W' - W) x||^2, measured on the samples themselves."""
    return 0.5 * float(np.sum((x @ (w_new - w_old).T) ** 2)) / x.shape[0]


def bias_protect(cols: int) -> np.ndarray:
    protect = np.zeros(cols, dtype=bool)
    protect[-1] = True
    return protect


def n_removable(w, protect) -> int:
    return w.shape[0] * int(w.shape[1] - (0 if protect is None else np.sum(protect)))


def solve_with(method, w, h, target, **options):
    """The method's solve as the pipeline calls it (with its registry options), the options it
    has among `options` overridden: solve_with(m, ..., block=5) reaches sparsegpt only."""
    spec = SOLVERS[method]
    ours = {k: v for k, v in options.items() if k in spec.options}
    return spec.solve(w, h, target, **{**spec.options, **ours})


def damped_matrix(h, damp):
    """The damped Hessian the solvers use, obtained independently as inv(damped_inverse)."""
    inv = damped_inverse(h, damp)
    return np.linalg.inv(inv.hinv), inv.dead, inv.damp


def check_invariants(sol, w, protect, expected_count=None, nm=None, nm_keep=None):
    assert sol.weights.shape == w.shape and sol.weights.dtype == np.float64
    assert sol.pruned.shape == w.shape and sol.pruned.dtype == bool
    assert np.all(np.isfinite(sol.weights))
    assert np.all(sol.weights[sol.pruned] == 0.0)
    if protect is not None:
        assert not sol.pruned[:, np.asarray(protect, dtype=bool)].any()
    if expected_count is not None:
        assert int(sol.pruned.sum()) == expected_count
    if nm is not None:
        check_nm(sol, nm, nm_keep)
    assert np.isfinite(sol.predicted_loss) and sol.predicted_loss >= 0.0


def check_nm(sol, groups, keep):
    """Every row removes exactly m - n in each group (so <= n non-zeros), nothing outside."""
    groups = np.asarray(groups)
    m = groups.shape[1]
    per_group = sol.pruned[:, groups].sum(axis=2)  # [rows, G]
    assert np.all(per_group == max(m - keep, 0))
    assert np.all((sol.weights[:, groups] != 0).sum(axis=2) <= keep)
    outside = np.ones(sol.pruned.shape[1], dtype=bool)
    outside[groups.ravel()] = False
    assert not sol.pruned[:, outside].any()


def contiguous_groups(cols: int, m: int) -> np.ndarray:
    """Linear-style groups: columns 0..m-1, m..2m-1, ... (a trailing remainder stays out)."""
    g = cols // m
    return np.arange(g * m).reshape(g, m)


def conv_groups(channels: int, kernel: int, m: int) -> np.ndarray:
    """Conv-style groups: at each kernel position k, m consecutive input channels, i.e. the
    columns c * kernel + k for c in a run of m channels (stride `kernel` in the column index)."""
    out = []
    for k in range(kernel):
        for c0 in range(0, channels - m + 1, m):
            out.append([(c0 + i) * kernel + k for i in range(m)])
    return np.array(out, dtype=np.int64)
