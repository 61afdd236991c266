"""Wanda (Sun, Liu, Bair & Kolter 2023): score |w_ij| * ||x_j||, pruned per output row, no
compensation.

||x_j|| over the calibration samples is sqrt(n * H_jj) with H the mean Hessian; the constant
sqrt(n) does not change any order, so the score is |w_ij| * sqrt(H_jj). Dead inputs score 0 and
go first. H is never inverted, so Solution.damp is None.

Counts: each row removes its own smallest scores, and the rows take turns. The layer-wide order
is round t = 1, 2, ... taking every row's t-th smallest removable score, the rows of a round
ordered by that score (ties: row order). The first n_prune entries of that order give every row
floor(n_prune / rows) or one more removals, the extra ones going to the rows whose next weight
is cheapest, and the layer total is exactly n_prune. The selections are nested (a larger count
keeps every weight a smaller one removed).

max_loss: the exact layer error of every prefix of that order is computed (one pass per row,
as magnitude does) and the largest prefix whose error is within max_loss is taken. The error
need not grow with the count (correlated inputs can cancel), so this is a scan, not a bisection.

N:M patterns: per row and group, the m - n smallest scores.
"""

from __future__ import annotations

import numpy as np

from ..hessian import layer_error
from .base import Solution, Target, nm_groups, removable_columns
from .magnitude import smallest_per_group


def scores(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    return np.abs(w) * np.sqrt(np.maximum(np.diagonal(h), 0.0))[None, :]


def balanced_order(score: np.ndarray, removable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every removable entry in the row-balanced order described above."""
    rows = score.shape[0]
    cols = np.flatnonzero(removable)
    if rows == 0 or len(cols) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sub = score[:, cols]
    within = np.argsort(sub, axis=1, kind="stable")  # [rows, n_rem]: each row's own order
    sorted_scores = np.take_along_axis(sub, within, axis=1)
    # Round-major, then by score within the round, then by row.
    round_order = np.argsort(sorted_scores.T, axis=1, kind="stable")  # [n_rem, rows]
    row_of = round_order.ravel()
    rank = np.repeat(np.arange(len(cols)), rows)
    return row_of, cols[within[row_of, rank]]


def _prefix_losses(w, h, row_of, col_of):
    """Exact layer_error of removing the first k entries of the order, for k = 0..len."""
    delta = np.zeros(len(row_of))
    by_row = np.argsort(row_of, kind="stable")
    splits = np.cumsum(np.bincount(row_of, minlength=w.shape[0]))[:-1]
    for at in np.split(by_row, splits):
        if len(at) == 0:
            continue
        q = col_of[at]
        v = w[row_of[at[0]], q]
        # Removing entry q_t after q_1..q_{t-1} of the same row adds
        # v_t * sum_{s<t} v_s H[q_s, q_t] + v_t^2 H[q_t, q_t] / 2.
        g = h[np.ix_(q, q)] * np.outer(v, v)
        delta[at] = np.tril(g, -1).sum(axis=1) + 0.5 * np.diagonal(g)
    return np.concatenate([[0.0], np.cumsum(delta)])


def solve(w: np.ndarray, h: np.ndarray, target: Target) -> Solution:
    rows, cols = w.shape
    score = scores(w, h)
    groups = nm_groups(cols, target)
    if groups is not None:
        mask = smallest_per_group(score, groups, groups.shape[1] - int(target.nm_keep))
    else:
        removable = removable_columns(cols, target)
        row_of, col_of = balanced_order(score, removable)
        if target.n_prune is not None:
            k = min(max(int(target.n_prune), 0), len(row_of))
        else:
            within = np.flatnonzero(_prefix_losses(w, h, row_of, col_of) <= target.max_loss)
            k = int(within[-1]) if len(within) else 0
        mask = np.zeros(w.shape, dtype=bool)
        mask[row_of[:k], col_of[:k]] = True
    new = np.where(mask, 0.0, w)
    return Solution(new, mask, layer_error(w, new, h), None)
