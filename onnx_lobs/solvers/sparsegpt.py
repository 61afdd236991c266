"""SparseGPT (Frantar & Alistarh 2023): column-by-column OBS with lazy block updates.

Let U be the upper triangular factor of the damped inverse, Hd^-1 = U^T U. Then for every j the
inverse of Hd restricted to the columns j.. is U[j:, j:]^T U[j:, j:], whose row j is
U_jj U[j, j:]. So sweeping the columns left to right, removing column j's weight (or keeping it)
and compensating only the columns not yet processed is the OBS update

    err = (w_j - q_j) / U_jj,   w[:, j:] -= err * U[j, j:],   with q_j = 0 (removed) or w_j,

and since U^-T U^T = I the steps' corrections are Hd-orthogonal: the damped error of the result
is exactly sum err^2 / 2 whatever the mask. That is predicted_loss, except for dead inputs
(diag H == 0): removing them costs nothing, so they score 0 and their err is not counted. With
damp = 0 and no dead inputs predicted_loss is exactly layer_error; with damping it is an upper
bound of it (the damped objective adds damp * scale * |dw|^2 / 2).

Columns are processed in blocks of B (solve's `block`). A column's error needs its current
weight, i.e. the corrections of every earlier column: those of earlier blocks reach a block in
one matrix product at their block's end (W[:, end:] -= Err @ U[block, end:]), those inside a
block are gathered per sub-block of INNER columns and per column (see sweep). The order of the
additions changes, the result does not (the tests check block sizes 1..cols against an
unblocked reference). Protected columns are never removed (err = 0) but do receive the
compensation.

Cost: the factorisation is O(cols^3) (one Cholesky, one triangular inverse); the sweep is
O(rows * cols^2), nearly all in matrix products.

Masks:
- unstructured: at the start of each block, over the whole [rows x B] block (its removable
  columns), the entries with the smallest w^2 / U_jj^2 are removed, the weights being the
  current ones (all earlier blocks' updates applied). Block b removes
  f(c_b) - f(c_{b-1}) where c_b counts the removable entries of blocks 0..b and
  f(c) = round(n_prune * c / total removable), in exact integer arithmetic (half rounds up).
  The rounding errors then telescope and the layer removes exactly n_prune, each block within
  one weight of the layer's ratio.
- N:M: a group's mask is chosen when the sweep reaches its first column, from the current
  weights of all of its columns (the pending lazy update is applied to the columns of the group
  lying beyond the block), removing per row the m - n smallest w^2 / U_cc^2. Groups thus may be
  non-contiguous and may straddle blocks.

max_loss: bisection over n_prune (one sweep per trial, the factorisation is shared) for the
largest count whose exact layer_error is within max_loss. The error of a sweep need not grow
with the count, so the result is within the budget but may not be the largest such count.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas

from ..hessian import layer_error
from .base import Solution, Target, nm_groups, nm_removals, removable_columns
from .factors import factor

INNER = 16  # columns whose corrections are gathered per column (matrix-vector); per sub-block beyond
# From this many weights the sweep runs in single precision: on wide layers with many rows its
# column steps are bound by memory traffic, which halves (as OBC's stacks, solvers/obc.py; the
# float64 reference tests run below it, and a test compares both precisions above it).
SINGLE_WEIGHTS = 1 << 18


def sweep(w, u, mask, block, choose_block=None, choose_group=None, inner=None, dtype=np.float64):
    """Run the sweep. mask [rows, cols] bool is read column by column as the sweep reaches it,
    and may be filled in on the way: by choose_block(i1, i2, w_block) before each block, and by
    choose_group(c, current) at each column c, where current(cols) gives the current weights
    of columns >= c (every pending update applied).

    Nothing is updated column by column: a column's pending corrections are gathered when the
    sweep reaches it, one matrix-vector product with the errors of its sub-block of `inner`
    columns so far. Each sub-block gets those of the block's earlier sub-blocks as one product
    at its start, the block its final weights as one product at its end (W_b - E_b U_bb: U is
    upper triangular) and the later columns theirs as another. Same sums, reordered: the Python
    step per column is three calls on vectors of `rows`, and every product stays in BLAS.

    Returns (weights, errors [rows, cols]) in dtype; removed entries of weights are exactly 0.
    """
    w = np.array(w, dtype=dtype, order="F")  # a block and all after it are contiguous
    u = np.asarray(u, dtype=dtype)
    rows, cols = w.shape
    errors = np.zeros((rows, cols), dtype=dtype, order="F")
    gemm = blas.get_blas_funcs("gemm", (w,))
    block, inner = max(1, int(block)), max(1, int(INNER if inner is None else inner))
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        wb = w[:, i1:i2]  # the block, as the earlier blocks left it
        if choose_block is not None:
            choose_block(i1, i2, wb)
        ub, eb = u[i1:i2, i1:i2], errors[:, i1:i2]
        # unstructured masks are whole blocks chosen up front: mask / U_jj once per block
        scale = mask[:, i1:i2] / np.diagonal(ub) if choose_group is None else None
        for s0 in range(0, i2 - i1, inner):
            s1 = min(s0 + inner, i2 - i1)
            cur = gemm(-1.0, eb[:, :s0], ub[:s0, s0:s1], beta=1.0, c=wb[:, s0:s1]) if s0 else wb[:, s0:s1]
            for j in range(s0, s1):
                c = i1 + j
                if choose_group is not None:
                    choose_group(c, lambda cs: _current(cs, w, wb, cur, eb, u, i1, s0, s1, j))
                # err = current w_j / U_jj where removed, else 0
                col = cur[:, j - s0] - eb[:, s0:j] @ ub[s0:j, j] if j > s0 else cur[:, 0]
                err = eb[:, j]
                if scale is not None:
                    np.multiply(col, scale[:, j], out=err)
                else:
                    np.multiply(col, mask[:, c], out=err)
                    err /= ub[j, j]
        # the block's final weights and the later columns' corrections: W[:, i1:] -= E_b U[b, i1:]
        tail = w[:, i1:]
        out = gemm(-1.0, eb, u[i1:i2, i1:], beta=1.0, c=tail, overwrite_c=1)
        if out.ctypes.data != tail.ctypes.data:  # not updated in place
            tail[...] = out
        np.putmask(wb, mask[:, i1:i2], 0.0)
    return w, errors


def _current(cs, w, wb, cur, eb, u, i1, s0, s1, j):
    """Current weights of columns cs (all >= the column j being processed, block-relative)."""
    out = np.empty((w.shape[0], len(cs)))
    i2 = i1 + wb.shape[1]
    for k, c in enumerate(cs):
        if c < i1 + s1:  # in the sub-block: its own earlier columns are pending
            out[:, k] = cur[:, c - i1 - s0] - eb[:, s0:j] @ u[i1 + s0:i1 + j, c]
        elif c < i2:  # later in the block: the whole block's so far are pending
            out[:, k] = wb[:, c - i1] - eb[:, :j] @ u[i1:i1 + j, c]
        else:  # after the block: likewise
            out[:, k] = w[:, c] - eb[:, :j] @ u[i1:i1 + j, c]
    return out


class _NMChooser:
    """Chooses each N:M group's mask when the sweep reaches the group's first column."""

    def __init__(self, groups, n_remove, diag_u, free, mask):
        self.groups = groups
        self.n_remove = min(n_remove, groups.shape[1])
        self.scale = np.where(free, 0.0, 1.0 / diag_u ** 2)
        self.mask = mask
        starts = groups.min(axis=1)
        self.starting_at = np.full(len(diag_u), -1, dtype=np.int64)
        self.starting_at[starts] = np.arange(len(groups))

    def __call__(self, c, current):
        g = self.starting_at[c]
        if g < 0 or self.n_remove == 0:
            return
        cols = self.groups[g]
        score = current(cols) ** 2 * self.scale[cols][None, :]
        order = np.argsort(score, axis=1, kind="stable")[:, :self.n_remove]
        self.mask[np.arange(score.shape[0])[:, None], cols[order]] = True


def smallest(score: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k smallest entries, ties to the first in row-major order: what a stable
    argsort's first k would give, in linear time."""
    flat = score.ravel()
    sel = np.zeros(flat.size, dtype=bool)
    if k >= flat.size:
        sel[:] = True
    elif k > 0:
        kth = np.partition(flat, k - 1)[k - 1]
        sel = flat < kth
        sel[np.flatnonzero(flat == kth)[:k - int(sel.sum())]] = True
    return sel.reshape(score.shape)


class _BlockChooser:
    """Unstructured: each block removes its share of n_prune, the smallest w^2 / U_jj^2."""

    def __init__(self, rows, n_prune, removable, diag_u, free, mask):
        self.rows = rows
        self.removable = removable
        self.total = rows * int(removable.sum())
        self.n_prune = min(max(int(n_prune), 0), self.total)
        self.before = np.concatenate([[0], np.cumsum(removable)])  # removable columns before j
        self.scale = np.where(free, 0.0, 1.0 / diag_u ** 2)
        self.mask = mask

    def _share(self, c):
        # round(n_prune * c / total), half up, in integers
        return (2 * self.n_prune * c + self.total) // (2 * self.total) if self.total else 0

    def __call__(self, i1, i2, w1):
        k = self._share(self.rows * int(self.before[i2])) - self._share(self.rows * int(self.before[i1]))
        if k == 0:
            return
        score = w1 ** 2 * self.scale[None, i1:i2]
        score[:, ~self.removable[i1:i2]] = np.inf
        self.mask[:, i1:i2] |= smallest(score, k)


def _run(w, fac, target, block, removable, groups, n_prune):
    rows, cols = w.shape
    mask = np.zeros(w.shape, dtype=bool, order="F")  # read a column at a time
    diag_u = np.diagonal(fac.u)
    dtype = np.float32 if rows * cols >= SINGLE_WEIGHTS else np.float64
    if groups is not None:
        chooser = _NMChooser(groups, groups.shape[1] - int(target.nm_keep), diag_u, fac.dead, mask)
        new, errors = sweep(w, fac.cast(dtype), mask, block, choose_group=chooser, dtype=dtype)
    else:
        chooser = _BlockChooser(rows, n_prune, removable, diag_u, fac.dead, mask)
        new, errors = sweep(w, fac.cast(dtype), mask, block, choose_block=chooser, dtype=dtype)
    predicted = 0.5 * float(np.sum(np.square(errors[:, ~fac.dead], dtype=np.float64)))
    return new.astype(np.float64, order="C"), mask, predicted


def solve(w: np.ndarray, h: np.ndarray, target: Target, block: int = 128) -> Solution:
    """block: B, the columns per lazily-updated block, which is also the unit of the
    unstructured mask's selection (see the module docstring)."""
    rows, cols = w.shape
    fac = factor("upper", h, target.damp, target.memo)
    removable = removable_columns(cols, target)
    groups = nm_groups(cols, target)
    notes = [] if fac.damp == target.damp else [f"dampening raised to {fac.damp:g} to factor H^-1"]
    if groups is not None and nm_removals(groups, target) == 0:
        groups = np.zeros((0, 1), dtype=np.int64)
    if groups is not None or target.n_prune is not None:
        new, mask, predicted = _run(w, fac, target, block, removable, groups, target.n_prune)
        return Solution(new, mask, predicted, fac.damp, notes)

    total = rows * int(removable.sum())
    best = _run(w, fac, target, block, removable, None, 0)
    trial = _run(w, fac, target, block, removable, None, total)
    if layer_error(w, trial[0], h) <= target.max_loss:
        best = trial
    else:
        lo, hi = 0, total  # error(lo) within budget, error(hi) over it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = _run(w, fac, target, block, removable, None, mid)
            if layer_error(w, trial[0], h) <= target.max_loss:
                lo, best = mid, trial
            else:
                hi = mid
    return Solution(*best, fac.damp, notes)
