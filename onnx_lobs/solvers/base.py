"""What every solver shares: the Target it is given, the Solution it returns, the N:M helpers,
and the layer-wide merge of per-row removal sequences (lobs and obc)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Target:
    """How much to remove: exactly n_prune weights, or as many as keep the loss <= max_loss.

    With an N:M pattern (nm given) n_prune and max_loss are ignored: every row removes exactly
    m - nm_keep weights of each group (so at most nm_keep non-zeros per row remain in it), and
    columns in no group are not pruned. A group's columns need not be contiguous: a Conv's
    groups run along input channels at one kernel position (stride K in the column index).
    """

    n_prune: int | None = None
    max_loss: float | None = None
    protect: np.ndarray | None = None  # bool per column: never removed (the bias column)
    damp: float = 0.01  # fraction of mean diag(H) added before inverting
    nm: np.ndarray | None = None  # int [n_groups, m]: the columns of each N:M group
    nm_keep: int = 0  # n in "n:m": non-zeros allowed per row in each group
    # Factorisations of this H already made, keyed by kind and damp: shared by the solves of one
    # Hessian (the damp grid), never by solves of different ones.
    memo: dict | None = field(default=None, compare=False, repr=False)


@dataclass
class Solution:
    weights: np.ndarray  # new W, same shape; removed entries are exactly 0
    pruned: np.ndarray  # bool mask, True where a weight was removed
    predicted_loss: float  # the solver's own estimate of delta E
    damp: float | None = None  # dampening actually used (None: H not inverted)
    notes: list[str] = field(default_factory=list)
    # Structured solvers: the whole rows (output units) and columns (inputs) they removed. Their
    # entries are 0 in weights and True in pruned too, so a caller that only swaps tensor contents
    # needs nothing else; a graph rewrite drops them.
    removed_rows: np.ndarray | None = None
    removed_cols: np.ndarray | None = None


def removable_columns(cols: int, target: Target) -> np.ndarray:
    if target.protect is None:
        return np.ones(cols, dtype=bool)
    return ~np.asarray(target.protect, dtype=bool)


def nm_groups(cols: int, target: Target) -> np.ndarray | None:
    """The validated N:M groups as an int64 [n_groups, m] array, or None without a pattern.

    Groups must be disjoint, within range and free of protected columns.
    """
    if target.nm is None:
        return None
    groups = np.asarray(target.nm)
    if groups.ndim != 2 or (groups.size and not np.issubdtype(groups.dtype, np.integer)):
        raise ValueError("nm must be an integer array [n_groups, m] of column indices")
    groups = groups.astype(np.int64)
    if int(target.nm_keep) < 0:
        raise ValueError(f"nm_keep must be >= 0, got {target.nm_keep}")
    flat = groups.ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= cols):
        raise ValueError(f"nm column index out of range for {cols} columns")
    if len(np.unique(flat)) != flat.size:
        raise ValueError("nm groups overlap (a column is listed twice)")
    if flat.size and not removable_columns(cols, target)[flat].all():
        raise ValueError("nm groups contain a protected column")
    return groups


def nm_removals(groups: np.ndarray, target: Target) -> int:
    """How many weights each row removes under the pattern: m - n per group."""
    return groups.shape[0] * max(groups.shape[1] - int(target.nm_keep), 0)


def group_of_column(cols: int, groups: np.ndarray) -> np.ndarray:
    """Per column, the index of its N:M group, or -1 when it is in none."""
    of = np.full(cols, -1, dtype=np.int64)
    of[groups.ravel()] = np.repeat(np.arange(groups.shape[0]), groups.shape[1])
    return of


def merge_counts(loss: np.ndarray, done: np.ndarray, n_prune: int | None,
                 max_loss: float | None) -> np.ndarray:
    """Per-row counts of the layer-wide greedy over rows' removal sequences.

    loss [rows, steps] holds each row's losses in its removal order, of which the first done[r]
    are computed. The greedy always takes the cheapest head among the rows, which is sorting
    each row's entries by the running maximum of its losses (so a row's selection is a prefix of
    its sequence); it takes n_prune entries, or the longest run whose summed losses fit max_loss.
    A row whose count reaches done[r] may want more of its sequence than is computed.
    """
    rows, steps = loss.shape
    computed = np.arange(steps)[None, :] < done[:, None]
    key = np.where(computed, np.maximum.accumulate(loss, axis=1), np.inf)
    order = np.argsort(key, axis=None, kind="stable")
    if n_prune is not None:
        k = n_prune
    else:
        cum = np.cumsum(loss.ravel()[order[:int(computed.sum())]])
        k = int(np.searchsorted(cum, max_loss * (1 + 1e-12), side="right"))
    return np.bincount(order[:k] // max(steps, 1), minlength=rows)
