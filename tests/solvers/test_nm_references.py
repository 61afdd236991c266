"""N:M patterns of lobs, magnitude and wanda against plain-loop references (obc and sparsegpt
have theirs in their own test files)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs.hessian import damped_inverse
from onnx_lobs.solvers import Target, lobs, magnitude, wanda

from .common import (bias_protect, check_invariants, contiguous_groups, conv_groups,
                     correlated_samples, hessian_of)


def reference_lobs_nm(w, h, groups, keep, damp):
    """Each row on its own: with the fixed damped H^-1, repeatedly remove the eligible weight
    with the smallest w_q^2 / (2 [H^-1]_qq) (dead inputs: 0; ties: lowest column), a weight
    being eligible while its group in the row has more than `keep` left; compensate the row
    and re-zero what was removed."""
    inv = damped_inverse(h, damp)
    rows, cols = w.shape
    new = np.array(w, dtype=np.float64)
    pruned = np.zeros(w.shape, bool)
    total = 0.0
    steps = len(groups) * max(len(groups[0]) - keep, 0)
    for r in range(rows):
        for _ in range(steps):
            best = None
            for grp in groups:
                if sum(not pruned[r, c] for c in grp) <= keep:
                    continue
                for q in grp:
                    if pruned[r, q]:
                        continue
                    cost = 0.0 if inv.dead[q] else new[r, q] ** 2 / (2 * inv.hinv[q, q])
                    if best is None or (cost, q) < best:
                        best = (cost, q)
            cost, q = best
            total += cost
            new[r] -= new[r, q] / inv.hinv[q, q] * inv.hinv[q]
            pruned[r, q] = True
            new[r, pruned[r]] = 0.0
    return new, pruned, total


def reference_smallest_per_group(score, groups, keep):
    mask = np.zeros(score.shape, bool)
    for r in range(score.shape[0]):
        for grp in groups:
            order = sorted(grp, key=lambda c: (score[r, c], list(grp).index(c)))
            mask[r, order[:len(grp) - keep]] = True
    return mask


def _case(seed):
    rng = np.random.default_rng(seed)
    if rng.random() < 0.5:
        m = int(rng.choice([2, 3, 4]))
        groups = contiguous_groups(4 * m, m)
        cols = 4 * m + 1
    else:
        m = int(rng.choice([2, 4]))
        kernel = int(rng.choice([2, 3]))
        groups = conv_groups(2 * m, kernel, m)
        cols = 2 * m * kernel + 1
    keep = int(rng.integers(0, m + 1))
    x = correlated_samples(rng, 5 * cols, cols) * np.exp(rng.normal(0, 1, cols))
    x[:, -1] = 1.0
    if rng.random() < 0.3:
        x[:, int(groups[0, -1])] = 0.0
    w = rng.standard_normal((int(rng.integers(1, 5)), cols))
    if rng.random() < 0.3:
        w[rng.random(w.shape) < 0.2] = 0.0
        w[:, -1] = 1.0
    # Distinct scores: exact ties would make the order a matter of convention.
    w += 1e-9 * np.arange(w.size).reshape(w.shape)
    damp = float(rng.choice([0.0, 0.01, 0.1]))
    return w, hessian_of(x), groups, keep, bias_protect(cols), damp


@pytest.mark.parametrize("seed", range(30))
def test_lobs_nm_matches_reference(seed):
    w, h, groups, keep, protect, damp = _case(seed)
    sol = lobs.solve(w, h, Target(protect=protect, damp=damp, nm=groups, nm_keep=keep))
    check_invariants(sol, w, protect, nm=groups, nm_keep=keep)
    new, pruned, total = reference_lobs_nm(w, h, groups, keep, damp)
    np.testing.assert_array_equal(sol.pruned, pruned)
    np.testing.assert_allclose(sol.weights, new, rtol=0, atol=1e-9 * max(1.0, np.abs(new).max()))
    assert sol.predicted_loss == pytest.approx(total, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(30))
def test_magnitude_and_wanda_nm_match_reference(seed):
    w, h, groups, keep, protect, _ = _case(100 + seed)
    target = Target(protect=protect, nm=groups, nm_keep=keep)
    sol = magnitude.solve(w, h, target)
    check_invariants(sol, w, protect, nm=groups, nm_keep=keep)
    np.testing.assert_array_equal(sol.pruned, reference_smallest_per_group(np.abs(w), groups, keep))
    np.testing.assert_array_equal(sol.weights[~sol.pruned], w[~sol.pruned])
    sol = wanda.solve(w, h, target)
    check_invariants(sol, w, protect, nm=groups, nm_keep=keep)
    score = np.abs(w) * np.sqrt(np.diagonal(h))[None, :]
    np.testing.assert_array_equal(sol.pruned, reference_smallest_per_group(score, groups, keep))
