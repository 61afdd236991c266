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

STRUCTURED_METHODS = ("lobs", "magnitude", "wanda")


@dataclass
class View:
    """One consumer of a group as the channel solve sees it."""

    w: np.ndarray  # [rows, cols] float64, the bias as the last column when there is one
    hinv: np.ndarray  # [cols, cols] damped inverse Hessian (bias included)
    h: np.ndarray  # [cols, cols] the undamped Hessian, for energies and errors
    columns: np.ndarray  # [channels, m] the columns of each channel
    energy: float = field(init=False)

    def __post_init__(self):
        self.energy = 0.5 * float(np.sum((self.w @ self.h) * self.w)) or 1.0


@dataclass
class Chosen:
    removed: list[int]  # channels in the order they went
    costs: list[float]  # the normalised cost of each removal, summed over consumers
    weights: list[np.ndarray]  # each view's new W (removed columns zero)


def block_costs(view: View, alive: np.ndarray) -> np.ndarray:
    """e(M_c) / energy for every alive channel c of one consumer, with its current W and H^-1."""
    idx = view.columns[alive]  # [k, m]
    b = view.hinv[idx[:, :, None], idx[:, None, :]]  # [k, m, m]
    wm = np.transpose(view.w[:, idx], (1, 2, 0))  # [k, m, rows]
    y = np.linalg.solve(b, wm)
    return 0.5 * np.sum(wm * y, axis=(1, 2)) / view.energy


def remove_block(view: View, cols: np.ndarray) -> None:
    """Remove the columns cols with the optimal update of the rest, and downdate H^-1."""
    b = view.hinv[np.ix_(cols, cols)]
    rows_m = view.hinv[cols, :]  # (H^-1)_M,:
    coef = np.linalg.solve(b, view.w[:, cols].T)  # [m, rows]
    view.w -= coef.T @ rows_m
    view.hinv -= rows_m.T @ np.linalg.solve(b, rows_m)
    view.w[:, cols] = 0.0
    view.hinv[cols, :] = 0.0
    view.hinv[:, cols] = 0.0
    view.hinv[cols, cols] = 1.0  # decoupled: removed columns no longer take part


def obs_channels(views: list[View], n_remove: int) -> Chosen:
    """Greedy block OBS over all consumers at once: the cheapest channel, then update, repeat."""
    channels = views[0].columns.shape[0]
    alive = np.ones(channels, bool)
    removed, costs = [], []
    for _ in range(n_remove):
        total = sum(block_costs(v, alive) for v in views)
        pick = int(np.flatnonzero(alive)[int(np.argmin(total))])
        costs.append(float(np.min(total)))
        for v in views:
            remove_block(v, v.columns[pick])
        alive[pick] = False
        removed.append(pick)
    return Chosen(removed, costs, [v.w for v in views])


def rank_without_compensation(scores: np.ndarray, views: list[View], n_remove: int) -> Chosen:
    """Remove the n_remove lowest-scoring channels; the consumers' columns are only zeroed."""
    order = [int(c) for c in np.argsort(scores, kind="stable")[:n_remove]]
    out = []
    for v in views:
        w = v.w.copy()
        for c in order:
            w[:, v.columns[c]] = 0.0
        out.append(w)
    costs = [float(sum(_plain_cost(v, c) for v in views)) for c in order]
    return Chosen(order, costs, out)


def _plain_cost(view: View, c: int) -> float:
    cols = view.columns[c]
    wm = view.w[:, cols]
    return 0.5 * float(np.sum((wm @ view.h[np.ix_(cols, cols)]) * wm)) / view.energy


def wanda_scores(views: list[View]) -> np.ndarray:
    """sum over consumers of sum_i W_iM^2 H_MM / energy, per channel (diagonal, no cross terms)."""
    total = 0.0
    for v in views:
        d = np.diagonal(v.h)
        total = total + np.sum(v.w[:, v.columns] ** 2 * d[v.columns][None], axis=(0, 2)) / v.energy
    return np.asarray(total)


def magnitude_scores(producer_rows: list[np.ndarray]) -> np.ndarray:
    """Squared L2 norm of each channel's producer rows [channels, ...], summed over producers."""
    return np.sum([np.sum(r.reshape(r.shape[0], -1).astype(np.float64) ** 2, axis=1) for r in producer_rows],
                  axis=0)


def kept_count(channels: int, fraction: float, multiple: int = 1) -> int:
    """Channels kept when fraction of them go, rounded to a multiple (at least one multiple)."""
    keep = channels - int(round(fraction * channels))
    if multiple > 1:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    return max(1, min(channels, keep))
