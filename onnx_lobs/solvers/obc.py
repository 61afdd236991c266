"""Exact greedy OBS per output row (OBC: Frantar, Singh & Alistarh 2022).

Each row removes weights one at a time. With G = the inverse of the damped Hessian restricted
to the row's remaining weights (at first the shared Hd^-1), the cheapest weight is
q = argmin w_q^2 / G_qq; removing it and compensating the others, w -= (w_q / G_qq) G[:, q], is
the exact least-squares refit of the remaining weights, and
G -= G[:, q] G[q, :] / G_qq is again the inverse of Hd restricted to what remains. So each
recorded loss w_q^2 / (2 G_qq) is the exact increment of the (damped) layer error, unlike
L-OBS whose H^-1 never changes. Dead inputs (diag H == 0) cost nothing to remove; protected
columns are never removed but keep being compensated.

The rows' loss sequences are then merged as lobs's are (base.merge_counts: sorting by each
row's running maximum, so each row's selection is a prefix of its sequence), the rows ending
with different counts while the layer removes exactly n_prune, or as many as keep the summed
exact losses within max_loss. N:M: each row removes m - n weights per group, a weight being
eligible only while its group in that row holds more than n remaining weights; nothing to merge.

Computation. The greedy above is a Cholesky factorisation of Hd^-1 with a data-dependent pivot
order, so it is computed like a blocked (right-looking) pivoted Cholesky, for a block of rows
at once:
- each row's G lives in one [rows, cols, cols] stack (rows chosen so the stack is <= 512 MB),
  float32 from SINGLE_COLS columns on: the downdates are bound by memory traffic and syrk runs
  twice as fast; the scores and weights stay float64, and since the final weights are refitted
  from the removed set in float64, single precision can only reorder near-ties (tested);
- the rank-1 downdates are deferred: within a panel of up to LAZY steps the pivot's row of G is
  its stored row minus the panel's earlier vectors (a small matrix-vector product) and the
  diagonal is downdated exactly; at the end of the panel each row's G receives all of them in
  one symmetric rank-LAZY update (BLAS syrk, lower triangle only, so rows are read from the
  lower triangle). Same arithmetic as the plain downdates, in BLAS-3;
- removed positions stay in place (masked) until they are a fifth of the matrix, then the
  stack is compacted, so the work follows the shrinking problem: about cols^3 / 3 per row.
Sequences are computed only as far as the merge may need (2 n_prune / rows + 8 removals; the
early removals are the expensive ones, so this saves little unless the target is light); rows
the merge wants more of are recomputed in full.
A row's final weights after its first c removals are then recomputed in one solve from the set
Q it removed (the sequential refits compose to the one-shot optimum): the kept set S gets
w_S = w0_S + Hd_SS^-1 Hd_SQ w0_Q, or equivalently w = w0 - Hd^-1[:, Q] (Hd^-1_QQ)^-1 w0_Q,
whichever system is smaller.

Round-off: in exact arithmetic G_qq >= 1 / Hd_qq (the value if q were uncorrelated with the
rest). With a nearly singular Hd the downdated diagonal can drift below that, even to zero or
below, so it is clamped there; the final weights come from the solve, not the downdates.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import blas

from ..hessian import damped_hessian, layer_error
from .base import (Solution, Target, group_of_column, merge_counts, nm_groups, nm_removals,
                   removable_columns)
from .factors import factor

STACK_BYTES = 512 * 2 ** 20
SINGLE_COLS = 1024  # from this width on the G stack is float32 (see the docstring)
LAZY = 64
COMPACT = 0.8  # drop removed positions once the active part is this fraction of the matrix
REFIT_BYTES = 64 * 2 ** 20


class _Rules:
    """Which weights a row may remove next: per column a group, per group a count left and a
    floor; a weight is eligible while its group in the row has more than `keep` left. Columns
    that may never be removed are in a last group with nothing left."""

    def __init__(self, cols, removable, groups=None, nm_keep=0):
        if groups is None:
            self.group_of = np.where(removable, 0, 1)
            self.left = np.array([int(removable.sum()), 0])
            self.keep = np.array([0, 0])
        else:
            g = groups.shape[0]
            of = group_of_column(cols, groups)
            self.group_of = np.where(of < 0, g, of)
            self.left = np.array([groups.shape[1]] * g + [0])
            self.keep = np.array([int(nm_keep)] * g + [0])

    def steps(self) -> int:
        return int(np.maximum(self.left - self.keep, 0).sum())


def removal_sequences(w, hinv, free, floor, rules, limit, stack_bytes=STACK_BYTES, lazy=LAZY,
                      dtype=None):
    """Every row's first `limit` greedy removals: (columns [rows, limit], losses [rows, limit])."""
    rows, cols = w.shape
    limit = min(limit, rules.steps())
    dtype = np.dtype(dtype or (np.float32 if cols >= SINGLE_COLS else np.float64))
    q_all = np.zeros((rows, limit), dtype=np.int64)
    loss_all = np.zeros((rows, limit))
    per_block = max(1, min(rows, stack_bytes // max(1, dtype.itemsize * cols * cols)))
    for r0 in range(0, rows, per_block):
        r1 = min(rows, r0 + per_block)
        q_all[r0:r1], loss_all[r0:r1] = _block_sequences(w[r0:r1], hinv, free, floor, rules, limit, lazy,
                                                         dtype)
    return q_all, loss_all


def _block_sequences(w, hinv, free, floor, rules, limit, lazy, dtype):
    n, cols = w.shape
    at = np.arange(n)
    syrk = blas.ssyrk if dtype == np.float32 else blas.dsyrk
    g = np.broadcast_to(hinv.astype(dtype), (n, cols, cols)).copy()  # per row G (deferred downdates aside)
    cur = np.array(w, dtype=np.float64)
    pos = np.broadcast_to(np.arange(cols), (n, cols)).copy()  # original column of each position
    diag = np.broadcast_to(np.diagonal(hinv), (n, cols)).copy()
    gid = np.broadcast_to(rules.group_of, (n, cols)).copy()
    left = np.broadcast_to(rules.left, (n, len(rules.left))).copy()
    # +inf where a weight may not be removed (now); the floor is +inf for dead inputs, which
    # makes their loss 0 (the pivot itself uses the true floor).
    closed = np.where(rules.left > rules.keep, 0.0, np.inf)[rules.group_of]
    penalty = np.broadcast_to(closed, (n, cols)).copy()
    score_floor = np.broadcast_to(np.where(free, np.inf, floor), (n, cols)).copy()
    active = np.ones((n, cols), dtype=bool)
    panel = np.zeros((n, lazy, cols), dtype=dtype)  # the deferred downdate vectors
    q_out = np.zeros((n, limit), dtype=np.int64)
    loss_out = np.zeros((n, limit))
    loss = np.empty((n, cols))
    b = 0  # vectors in the panel
    for t in range(limit):
        # Positions keep the original column order, so argmin's first hit is the lowest column.
        np.maximum(diag, score_floor, out=loss)
        np.divide(cur * cur, loss, out=loss)
        loss += penalty
        p = np.argmin(loss, axis=1)
        q = pos[at, p]
        q_out[:, t] = q
        loss_out[:, t] = 0.5 * loss[at, p]

        col = _row(g, at, p)
        if b:
            col -= np.matmul(panel[at, None, :b, p], panel[:, :b, :])[:, 0, :]
        col = col.astype(np.float64, copy=False)
        np.copyto(col, 0.0, where=~active)
        piv = np.maximum(col[at, p], floor[q])
        cur -= (cur[at, p] / piv)[:, None] * col
        cur[at, p] = 0.0
        col /= np.sqrt(piv)[:, None]
        diag -= col * col
        panel[:, b, :] = col
        active[at, p] = False
        penalty[at, p] = np.inf
        _close_full_groups(rules, left, gid, penalty, at, p)
        b += 1
        if b == lazy and t + 1 < limit:
            for r in range(n):  # g[r] -= panel[r]^T panel[r], lower triangle only
                syrk(-1.0, panel[r].T, beta=1.0, c=g[r].T, trans=0, lower=0, overwrite_c=1)
            panel[:] = 0.0
            b = 0
            size = cols - (t + 1)
            if size <= COMPACT * g.shape[1]:
                # Drop the removed positions (every row has removed the same number).
                keep = np.nonzero(active)[1].reshape(n, size)
                g = g[at[:, None, None], keep[:, :, None], keep[:, None, :]]
                cur, pos, gid, penalty, score_floor = (np.take_along_axis(a, keep, axis=1)
                                                       for a in (cur, pos, gid, penalty, score_floor))
                active = np.ones((n, size), dtype=bool)
                panel = np.zeros((n, lazy, size), dtype=dtype)
                loss = np.empty((n, size))
            diag = np.diagonal(g, axis1=1, axis2=2).astype(np.float64)
    return q_out, loss_out


def _row(g, at, p):
    """Row p of each row's symmetric G, of which only the lower triangle is kept up to date."""
    row = g[at, p, :]
    above = np.arange(g.shape[2])[None, :] > p[:, None]
    np.copyto(row, g[at, :, p], where=above)
    return row


def _close_full_groups(rules, left, gid, penalty, at, p):
    """Count the removal against its group; once a row's group is down to its keep, the rest
    of the group becomes ineligible in that row."""
    g = gid[at, p]
    left[at, g] -= 1
    full = np.flatnonzero(left[at, g] <= rules.keep[g])
    if len(full):
        penalty[full] = np.where(gid[full] == g[full, None], np.inf, penalty[full])


def final_weights(w, q_seq, counts, hd, hinv):
    """Each row's optimal weights with its first counts[r] removals zeroed (see the docstring)."""
    rows, cols = w.shape
    new = np.array(w, dtype=np.float64)
    pruned = np.zeros(w.shape, dtype=bool)
    for c in np.unique(counts):
        if c == 0:
            continue
        same = np.flatnonzero(counts == c)
        chunk = max(1, REFIT_BYTES // (8 * max(c, cols - c) ** 2 + 8 * cols))
        for i in range(0, len(same), chunk):
            rs = same[i:i + chunk]
            removed = np.zeros((len(rs), cols), dtype=bool)
            removed[np.arange(len(rs))[:, None], q_seq[rs, :c]] = True
            pruned[rs] = removed
            new[rs] = _refit(w[rs], removed, hd, hinv)
    new[pruned] = 0.0
    return new, pruned


def _refit(w, removed, hd, hinv):
    n, cols = w.shape
    c = int(removed[0].sum())
    q = np.nonzero(removed)[1].reshape(n, c)
    s = np.nonzero(~removed)[1].reshape(n, cols - c)
    at = np.arange(n)[:, None]
    wq = w[at, q]
    out = w.copy()
    try:
        if cols - c <= c:
            a = hd[s[:, :, None], s[:, None, :]]
            rhs = (np.where(removed, w, 0.0) @ hd)[at, s]  # Hd_SQ w0_Q (Hd is symmetric)
            out[at, s] += _solve(a, rhs)
        else:
            a = hinv[q[:, :, None], q[:, None, :]]
            x = np.zeros((n, cols))
            x[at, q] = _solve(a, wq)
            out -= x @ hinv
    except np.linalg.LinAlgError:
        for r in range(n):  # a numerically singular system: least squares, row by row
            hs = hd[np.ix_(s[r], s[r])]
            out[r, s[r]] = w[r, s[r]] + np.linalg.lstsq(hs, hd[np.ix_(s[r], q[r])] @ wq[r], rcond=None)[0]
    out[at, q] = 0.0
    return out


def _solve(a, b):
    if a.shape[1] == 0:
        return np.zeros(b.shape)
    x = np.linalg.solve(a, b[:, :, None])[:, :, 0]
    if not np.all(np.isfinite(x)):
        raise np.linalg.LinAlgError("non-finite solution")
    return x


def solve(w: np.ndarray, h: np.ndarray, target: Target) -> Solution:
    rows, cols = w.shape
    inv = factor("inverse", h, target.damp, target.memo)
    notes = [] if inv.damp == target.damp else [f"dampening raised to {inv.damp:g} to invert H"]
    removable = removable_columns(cols, target)
    groups = nm_groups(cols, target)
    rules = _Rules(cols, removable, groups, target.nm_keep)
    free = inv.dead & removable
    floor = 1.0 / np.diagonal(damped_hessian(h, inv.damp)[0])
    total = rules.steps()
    if rows == 0 or total == 0:
        return Solution(w.copy(), np.zeros(w.shape, bool), 0.0, inv.damp, notes)

    if groups is not None:
        per_row = nm_removals(groups, target)
        q_seq, loss = removal_sequences(w, inv.hinv, free, floor, rules, per_row)
        counts = np.full(rows, per_row)
    else:
        n_prune = None if target.n_prune is None else min(max(int(target.n_prune), 0), rows * total)
        # The early removals cost the most (the matrices are largest), so a partial sequence
        # saves little unless the target is light; rows the merge wants more of are redone.
        # Solves of the same matrix at other counts (target.memo) reuse the sequences.
        key = ("obc sequences", inv.damp, w.shape)
        if target.memo is not None and key in target.memo:
            q_seq, loss, done = target.memo[key]
        else:
            limit = total if n_prune is None else min(total, 2 * math.ceil(n_prune / rows) + 8)
            q_seq = np.zeros((rows, total), dtype=np.int64)
            loss = np.zeros((rows, total))
            q_seq[:, :limit], loss[:, :limit] = removal_sequences(w, inv.hinv, free, floor, rules, limit)
            done = np.full(rows, limit)
            if target.memo is not None:
                target.memo[key] = (q_seq, loss, done)  # extended in place below
        while True:
            counts = merge_counts(loss, done, n_prune, target.max_loss)
            short = np.flatnonzero((counts >= done) & (done < total))
            if len(short) == 0:
                break
            q_seq[short], loss[short] = removal_sequences(w[short], inv.hinv, free, floor, rules, total)
            done[short] = total

    hd, _ = damped_hessian(h, inv.damp)  # only now: the sequences' stacks are gone
    new, pruned = final_weights(w, q_seq, counts, hd, inv.hinv)
    predicted = float(sum(loss[r, :c].sum() for r, c in enumerate(counts)))
    if target.max_loss is not None and groups is None and layer_error(w, new, h) > target.max_loss:
        # The summed losses are exact for Hd, which bounds the error on H from above; only
        # round-off can get here. Back off along the same merged order.
        lo, hi = 0, int(counts.sum())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = final_weights(w, q_seq, merge_counts(loss, done, mid, None), hd, inv.hinv)[0]
            lo, hi = (mid, hi) if layer_error(w, trial, h) <= target.max_loss else (lo, mid)
        counts = merge_counts(loss, done, lo, None)
        new, pruned = final_weights(w, q_seq, counts, hd, inv.hinv)
        predicted = float(sum(loss[r, :c].sum() for r, c in enumerate(counts)))
    return Solution(new, pruned, predicted, inv.damp, notes)
