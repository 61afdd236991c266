"""Magnitude pruning: zero the smallest |w| of the layer, no compensation. The baseline.

N:M patterns: per row and group, the m - n smallest |w| (ties: the earlier column in the group).
"""

from __future__ import annotations

import numpy as np

from ..hessian import layer_error
from .base import Solution, Target, nm_groups, removable_columns


def smallest_per_group(score: np.ndarray, groups: np.ndarray, n_remove: int) -> np.ndarray:
    """Mask of the n_remove smallest scores of every row within every group (stable order)."""
    mask = np.zeros(score.shape, dtype=bool)
    n_remove = min(max(n_remove, 0), groups.shape[1])
    if n_remove == 0 or groups.size == 0 or score.shape[0] == 0:
        return mask
    order = np.argsort(score[:, groups], axis=2, kind="stable")[:, :, :n_remove]  # [rows, G, k]
    cols = np.take_along_axis(np.broadcast_to(groups, (score.shape[0],) + groups.shape), order, axis=2)
    mask[np.arange(score.shape[0])[:, None, None], cols] = True
    return mask


def _prune_smallest(w: np.ndarray, removable: np.ndarray, k: int) -> np.ndarray:
    score = np.where(removable[None, :], np.abs(w), np.inf)
    order = np.argsort(score, axis=None, kind="stable")[:k]
    mask = np.zeros(w.size, dtype=bool)
    mask[order] = True
    return mask.reshape(w.shape)


def _prefix_losses(w: np.ndarray, h: np.ndarray, removable: np.ndarray, n_max: int) -> np.ndarray:
    """layer_error of zeroing the k smallest removable |w|, for every k = 0..n_max.

    Zeroing entry j of row r after the set S of that row adds
    w_rj * sum_{i in S} w_ri H_ij + w_rj^2 H_jj / 2, so one pass per row gives every step's increment.
    """
    score = np.where(removable[None, :], np.abs(w), np.inf)
    order = np.argsort(score, axis=None, kind="stable")[:n_max]
    r_of, q_of = np.divmod(order, w.shape[1])
    by_row = np.argsort(r_of, kind="stable")  # positions in removal order, grouped by row
    delta = np.zeros(n_max)
    for at in np.split(by_row, np.cumsum(np.bincount(r_of, minlength=w.shape[0]))[:-1]):
        if len(at) == 0:
            continue
        q = q_of[at]
        v = w[r_of[at[0]], q]
        g = h[np.ix_(q, q)] * np.outer(v, v)
        delta[at] = np.tril(g, -1).sum(axis=1) + 0.5 * np.diagonal(g)
    return np.concatenate([[0.0], np.cumsum(delta)])


def solve(w: np.ndarray, h: np.ndarray | None, target: Target) -> Solution:
    removable = removable_columns(w.shape[1], target)
    n_max = int(removable.sum()) * w.shape[0]
    groups = nm_groups(w.shape[1], target)
    if groups is not None:
        mask = smallest_per_group(np.abs(w), groups, groups.shape[1] - int(target.nm_keep))
    elif target.n_prune is not None:
        mask = _prune_smallest(w, removable, min(target.n_prune, n_max))
    else:
        # Largest k whose exact loss stays within max_loss. The loss need not grow with k
        # (correlated inputs can cancel), so every prefix's loss is computed, not bisected.
        losses = _prefix_losses(w, h, removable, n_max)
        within = np.flatnonzero(losses <= target.max_loss)
        mask = _prune_smallest(w, removable, int(within[-1]) if len(within) else 0)
    new = np.where(mask, 0.0, w)
    loss = layer_error(w, new, h) if h is not None else float("nan")
    return Solution(new, mask, loss)
