"""Layer-wise OBS (Dong, Chen & Pan 2017, Algorithm 1), with H^-1 computed once per layer.

Removing weight q of a row costs L_q = w_q^2 / (2 [H^-1]_qq) and is compensated by
dw = -(w_q / [H^-1]_qq) H^-1[q, :]. H^-1 is shared by all rows and never updated, so the rows
evolve independently: we run every row's greedy removal sequence side by side (one vectorised
step removes one weight from each row, O(rows x cols)), then merge the sequences in the order
the layer-wide greedy would visit them. That greedy always takes the smallest head among the
rows, which is the same as sorting each row's entries by the running maximum of its losses
(base.merge_counts, which obc shares).

Removed weights stay exactly zero: later compensations do not revive them. Since they never
feed later coefficients, a row's final weights are w0 - sum_t c_t H^-1[q_t, :] on its kept
entries, so the state at any merge point is rebuilt with one matrix product.

N:M patterns: every row removes exactly m - n weights per group, so there is nothing to merge;
each row runs the same greedy, except that a weight is only eligible while its group in that
row still holds more than n unremoved weights (its cost is +inf once the group is full).
"""

from __future__ import annotations

import math

import numpy as np

from ..hessian import layer_error
from .base import (Solution, Target, group_of_column, merge_counts, nm_groups, nm_removals,
                   removable_columns)
from .factors import factor

CHUNK_BYTES = 2 ** 18  # the rows one vectorised step handles: about this many bytes per array


class _Sequences:
    """Each row's greedy removal sequence, computed lazily as far as the merge needs it."""

    def __init__(self, w, hinv, dead, removable, groups=None, nm_keep=0):
        self.hinv = hinv
        self.diag = np.diagonal(hinv).copy()
        # Dead inputs cost nothing to remove; a removed or protected weight costs +inf.
        self.half_inv_diag = np.where(dead & removable, 0.0, 0.5 / self.diag)
        rows = w.shape[0]
        self.n_rem = int(removable.sum())
        self.cur = w.copy()
        self.penalty = np.zeros(w.shape)
        self.penalty[:, ~removable] = np.inf
        self.q = np.zeros((rows, self.n_rem), dtype=np.int64)
        self.loss = np.zeros((rows, self.n_rem))
        self.coef = np.zeros((rows, self.n_rem))
        self.done = np.zeros(rows, dtype=np.int64)
        self.groups = groups
        if groups is not None:
            self.nm_keep = nm_keep
            self.group_of = group_of_column(w.shape[1], groups)
            self.left = np.full((rows, groups.shape[0]), groups.shape[1], dtype=np.int64)

    def advance(self, rows: np.ndarray, steps: int) -> None:
        """Each of these rows' next `steps` removals. Rows are independent, so they go in chunks
        small enough for the cache: a step streams every array of its rows several times."""
        steps = min(steps, self.n_rem - int(self.done[rows].max()))
        chunk = max(1, CHUNK_BYTES // (8 * self.cur.shape[1]))
        for i in range(0, len(rows), chunk):
            self._advance(rows[i:i + chunk], steps)

    def _advance(self, rows: np.ndarray, steps: int) -> None:
        w, penalty = self.cur[rows], self.penalty[rows]
        base = self.done[rows]
        at = np.arange(len(rows))
        loss = np.empty_like(w)
        for t in range(steps):
            np.multiply(w, w, out=loss)
            loss *= self.half_inv_diag
            loss += penalty
            q = np.argmin(loss, axis=1)
            c = w[at, q] / self.diag[q]
            # Entries already removed drift here, but they never feed a later coefficient
            # and rebuild() zeroes them, so they are not re-zeroed on every step.
            w -= c[:, None] * self.hinv[q]
            penalty[at, q] = np.inf
            if self.groups is not None:
                self._close_full_groups(rows, penalty, q)
            self.q[rows, base + t] = q
            self.loss[rows, base + t] = loss[at, q]
            self.coef[rows, base + t] = c
        self.cur[rows], self.penalty[rows] = w, penalty
        self.done[rows] += steps

    def _close_full_groups(self, rows, penalty, q):
        """N:M: once a row's group is down to nm_keep weights, its others become ineligible."""
        g = self.group_of[q]
        left = self.left[rows, g] - 1
        self.left[rows, g] = left
        full = np.flatnonzero(left <= self.nm_keep)
        if len(full):
            penalty[full[:, None], self.groups[g[full]]] = np.inf

    def rebuild(self, w, counts):
        """Weights, mask and predicted loss after the first counts[r] removals of each row."""
        rows = w.shape[0]
        comp = np.zeros_like(w)
        pruned = np.zeros(w.shape, dtype=bool)
        r_idx = np.repeat(np.arange(rows), counts)
        t_idx = np.concatenate([np.arange(c) for c in counts]) if rows else np.zeros(0, int)
        q_idx = self.q[r_idx, t_idx]
        comp[r_idx, q_idx] = self.coef[r_idx, t_idx]
        pruned[r_idx, q_idx] = True
        new = w - comp @ self.hinv
        new[pruned] = 0.0
        return new, pruned, float(self.loss[r_idx, t_idx].sum())


def solve(w: np.ndarray, h: np.ndarray, target: Target) -> Solution:
    inv = factor("inverse", h, target.damp, target.memo)
    rows, cols = w.shape
    removable = removable_columns(cols, target)
    groups = nm_groups(cols, target)
    if groups is not None:
        return _solve_nm(w, inv, groups, target)
    seq = _Sequences(w, inv.hinv, inv.dead, removable)
    if seq.n_rem == 0 or rows == 0:
        return Solution(w.copy(), np.zeros(w.shape, bool), 0.0, inv.damp)
    n_prune = None if target.n_prune is None else min(target.n_prune, rows * seq.n_rem)
    if n_prune is not None:
        first = math.ceil(1.25 * n_prune / rows) + 4
    else:
        first = max(16, seq.n_rem // 4)
    seq.advance(np.arange(rows), min(first, seq.n_rem))
    while True:
        counts = merge_counts(seq.loss, seq.done, n_prune, target.max_loss)
        # Rows the merge took to the end of their computed sequence may want more of it.
        saturated = np.flatnonzero((counts >= seq.done) & (seq.done < seq.n_rem))
        if len(saturated) == 0:
            break
        seq.advance(saturated, max(8, first // 2))

    new, pruned, predicted = seq.rebuild(w, counts)
    if target.max_loss is not None and layer_error(w, new, h) > target.max_loss:
        # The paper's rule sums single-removal losses; their interactions can push the real
        # error past the budget, so back off (bisecting along the same greedy order) until
        # the exact error on H fits.
        lo, hi = 0, int(counts.sum())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = seq.rebuild(w, merge_counts(seq.loss, seq.done, mid, None))
            if layer_error(w, trial[0], h) <= target.max_loss:
                lo = mid
            else:
                hi = mid
        new, pruned, predicted = seq.rebuild(w, merge_counts(seq.loss, seq.done, lo, None))
    return Solution(new, pruned, predicted, inv.damp, _notes(inv, target))


def _notes(inv, target):
    return [] if inv.damp == target.damp else [f"dampening raised to {inv.damp:g} to invert H"]


def _solve_nm(w, inv, groups, target):
    rows, cols = w.shape
    in_group = np.zeros(cols, dtype=bool)
    in_group[groups.ravel()] = True
    per_row = nm_removals(groups, target)
    if per_row == 0 or rows == 0:
        return Solution(w.copy(), np.zeros(w.shape, bool), 0.0, inv.damp, _notes(inv, target))
    seq = _Sequences(w, inv.hinv, inv.dead, in_group, groups, int(target.nm_keep))
    seq.advance(np.arange(rows), per_row)
    new, pruned, predicted = seq.rebuild(w, np.full(rows, per_row))
    return Solution(new, pruned, predicted, inv.damp, _notes(inv, target))
