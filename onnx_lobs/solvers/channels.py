"""Structured OBS: which whole channels of a group to remove, and how each consumer compensates.

A consumer of the group is a matrix W [rows, cols] (its bias, if any, the last column) with the
inverse Hessian of its input. A channel occupies a set M of its columns (k_h*k_w for a Conv, a
block after a flatten). Removing M costs e(M) = 1/2 sum_i W_iM [(H^-1)_MM]^-1 W_iM^T, and the
rest of every row moves by -W_iM [(H^-1)_MM]^-1 (H^-1)_M: (ZipLM's block form of OBS). A group's
cost is the sum over its consumers of e(M) / (the consumer's output energy); channels go one at
a time, cheapest first, with H^-1 and W updated exactly after each removal.

magnitude and wanda rank channels without compensating: by the L2 norm of the producer rows, and
by the consumers' diagonal estimate sum_i W_iM^2 H_MM (Wanda's |w|*||x||, squared, per block).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import blas

STRUCTURED_METHODS = ("lobs", "magnitude", "wanda")


@dataclass
class View:
    """One consumer as the channel solves see it; groups that share it update it in turn."""

    w: np.ndarray  # [rows, cols] float64, the bias as the last column when there is one
    hinv: np.ndarray  # [cols, cols] damped inverse Hessian (bias included), downdated in place
    h: np.ndarray  # [cols, cols] the undamped Hessian, for energies and errors
    energy: float = field(init=False)
    w0: np.ndarray = field(init=False)  # the dense W, for errors

    def __post_init__(self):
        self.w, self.hinv = np.ascontiguousarray(self.w), np.ascontiguousarray(self.hinv)
        self.energy = 0.5 * float(np.sum((self.w @ self.h) * self.w)) or 1.0
        self.w0 = self.w.copy()

    def copy(self) -> "View":
        """An independent view in the same state (a trial run leaves the original untouched)."""
        out = View(self.w.copy(), self.hinv.copy(), self.h)
        out.energy, out.w0 = self.energy, self.w0
        return out


@dataclass
class Reader:
    """What one group's channels are to one consumer: columns [channels, m], and which channels
    it reads at all (a consumer after a Split sees only its part)."""

    view: View
    columns: np.ndarray
    present: np.ndarray


@dataclass
class Chosen:
    removed: list[int]  # channels in the order they went
    costs: list[float]  # the normalised cost of each removal, summed over consumers


def block_costs(r: Reader, alive: np.ndarray) -> np.ndarray:
    """e(M_c) / energy for every alive channel c (0 where the consumer does not read it):
    1/2 <[(H^-1)_MM]^-1, W_M^T W_M> per block, the Gram of the block's columns."""
    out = np.zeros(int(alive.sum()))
    mine = r.present[alive]
    if not mine.any():
        return out
    idx = r.columns[alive][mine]  # [k, m]
    v = r.view
    if idx.shape[1] == 1:  # one column per channel: w_c^2 / [H^-1]_cc
        c = idx[:, 0]
        out[mine] = 0.5 * np.einsum("ij,ij->j", v.w[:, c], v.w[:, c]) / v.hinv[c, c] / v.energy
        return out
    b = v.hinv[idx[:, :, None], idx[:, None, :]]  # [k, m, m]
    wm = np.transpose(v.w[:, idx], (1, 0, 2))  # [k, rows, m]
    gram = np.matmul(np.transpose(wm, (0, 2, 1)), wm)  # [k, m, m]
    out[mine] = 0.5 * np.einsum("kmn,kmn->k", np.linalg.inv(b), gram) / v.energy
    return out


def remove_block(view: View, cols: np.ndarray) -> None:
    """Remove the columns cols with the optimal update of the rest, and downdate H^-1, in
    place: W -= W_M B^-1 (H^-1)_M,: and H^-1 -= (H^-1)_:,M B^-1 (H^-1)_M,: with B = (H^-1)_MM."""
    b = view.hinv[np.ix_(cols, cols)]
    rows_m = view.hinv[cols, :]  # (H^-1)_M,: [m, cols], a copy
    z = np.linalg.solve(b, rows_m)  # B^-1 (H^-1)_M,:
    wm = view.w[:, cols]  # a copy
    # on the transposes (Fortran-ordered views of the C-ordered arrays), BLAS updates in place
    for target, new in ((view.w, blas.dgemm(-1.0, z, wm, beta=1.0, c=view.w.T, trans_a=1, trans_b=1,
                                            overwrite_c=1)),
                        (view.hinv, blas.dgemm(-1.0, z, rows_m, beta=1.0, c=view.hinv.T, trans_a=1, overwrite_c=1))):
        if not np.shares_memory(new, target):  # not C-ordered: BLAS worked on a copy
            target[...] = new.T
    view.w[:, cols] = 0.0
    view.hinv[cols, :] = 0.0
    view.hinv[:, cols] = 0.0
    view.hinv[cols, cols] = 1.0  # decoupled: removed columns no longer take part


def obs_channels(readers: list[Reader], channels: int, n_remove: int) -> Chosen:
    """Greedy block OBS over all consumers at once: the cheapest channel, then update, repeat."""
    alive = np.ones(channels, bool)
    removed, costs = [], []
    for _ in range(n_remove):
        total = sum(block_costs(r, alive) for r in readers)
        pick = int(np.flatnonzero(alive)[int(np.argmin(total))])
        costs.append(float(np.min(total)))
        for r in readers:
            if r.present[pick]:
                remove_block(r.view, r.columns[pick])
        alive[pick] = False
        removed.append(pick)
    return Chosen(removed, costs)


def replay(readers: list[Reader], chosen: Chosen, n_remove: int) -> Chosen:
    """The first n_remove removals of an earlier greedy run from the same state, without pricing
    every channel again: the same weights and H^-1 as running obs_channels for n_remove."""
    for pick in chosen.removed[:n_remove]:
        for r in readers:
            if r.present[pick]:
                remove_block(r.view, r.columns[pick])
    return Chosen(list(chosen.removed[:n_remove]), list(chosen.costs[:n_remove]))


def rank_without_compensation(scores: np.ndarray, readers: list[Reader], n_remove: int) -> Chosen:
    """Remove the n_remove lowest-scoring channels; the consumers' columns are only zeroed."""
    order = [int(c) for c in np.argsort(scores, kind="stable")[:n_remove]]
    costs = [float(sum(_plain_cost(r, c) for r in readers if r.present[c])) for c in order]
    for r in readers:
        for c in order:
            if r.present[c]:
                r.view.w[:, r.columns[c]] = 0.0
    return Chosen(order, costs)


def _plain_cost(r: Reader, c: int) -> float:
    cols = r.columns[c]
    wm = r.view.w[:, cols]
    return 0.5 * float(np.sum((wm @ r.view.h[np.ix_(cols, cols)]) * wm)) / r.view.energy


def wanda_scores(readers: list[Reader], channels: int) -> np.ndarray:
    """sum over consumers of sum_i W_iM^2 H_MM / energy, per channel (diagonal, no cross terms)."""
    total = np.zeros(channels)
    for r in readers:
        d = np.diagonal(r.view.h)
        s = np.sum(r.view.w[:, r.columns] ** 2 * d[r.columns][None], axis=(0, 2)) / r.view.energy
        total += np.where(r.present, s, 0.0)
    return total


def magnitude_scores(producer_rows: list[np.ndarray]) -> np.ndarray:
    """Squared L2 norm of each channel's producer rows [channels, ...], summed over producers
    (rows of channels a producer does not make are zero)."""
    return np.sum([np.sum(r.reshape(r.shape[0], -1).astype(np.float64) ** 2, axis=1) for r in producer_rows],
                  axis=0)


def kept_count(channels: int, fraction: float, multiple: int = 1) -> int:
    """Channels kept when fraction of them go, rounded to a multiple (at least one multiple)."""
    keep = channels - int(round(fraction * channels))
    if multiple > 1:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    return max(1, min(channels, keep))
