"""Layer-wise Hessians H = (1/n) sum x x^T, accumulated batch by batch, and their damped inverses.

Only the running sums are kept (sum x x^T, sum x, n), never the activations, so memory is the
Hessians plus one batch whatever the number of calibration samples. When a layer has a bias its
input is augmented with a constant 1 as the last column, so the bias takes part in the solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas, cho_factor, cho_solve, LinAlgError


class HessianAccumulator:
    """Running sums for one layer: per group, sum x x^T (upper triangle), sum x and n."""

    def __init__(self, groups: int, cols: int, bias: bool):
        self.bias = bias
        self.n = 0
        self._xx = np.zeros((groups, cols, cols), order="C")
        self._x = np.zeros((groups, cols))

    def add(self, x: np.ndarray) -> None:
        """Fold in columns x [groups, n, cols] (float64)."""
        for g in range(x.shape[0]):
            xg = x[g]
            # xg.T is Fortran-ordered, so syrk reads it in place and writes only the upper triangle.
            self._xx[g] += blas.dsyrk(1.0, xg.T, trans=0, lower=0)
            if self.bias:
                self._x[g] += xg.sum(axis=0)
        self.n += x.shape[1]

    def merge(self, other: "HessianAccumulator") -> None:
        self._xx += other._xx
        self._x += other._x
        self.n += other.n

    def hessian(self) -> np.ndarray:
        """The mean Hessian [groups, c, c], c = cols (+1 with bias), symmetric, float64."""
        if self.n == 0:
            raise ValueError("no calibration samples reached this layer")
        xx = np.triu(self._xx) + np.triu(self._xx, 1).transpose(0, 2, 1)
        if not self.bias:
            return xx / self.n
        g, c, _ = xx.shape
        h = np.empty((g, c + 1, c + 1))
        h[:, :c, :c] = xx
        h[:, :c, c] = self._x
        h[:, c, :c] = self._x
        h[:, c, c] = self.n
        return h / self.n


@dataclass
class DampedInverse:
    hinv: np.ndarray  # (H + lambda I)^-1 with dead inputs' diagonal set to 1
    damp: float  # the fraction of mean diag(H) actually added
    dead: np.ndarray  # bool per column: inputs that were zero on every calibration sample


def damped_inverse(h: np.ndarray, damp: float, max_tries: int = 8) -> DampedInverse:
    """Invert H + damp * mean(diag H) * I, raising damp tenfold until the Cholesky succeeds.

    Dead inputs (diag H == 0) carry no signal, so their diagonal is set to 1: it keeps H
    invertible without coupling them to anything, and their weights cost nothing to remove.
    """
    h = np.array(h, dtype=np.float64)
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    scale = float(np.mean(np.maximum(diag, 0.0))) or 1.0  # of H itself, not the 1s put in for dead inputs
    d = damp
    for _ in range(max_tries):
        try:
            hd = h + (d * scale) * np.eye(h.shape[0])
            factor = cho_factor(hd, lower=False, check_finite=True)
            hinv = cho_solve(factor, np.eye(h.shape[0]))
            if np.all(np.isfinite(hinv)) and np.all(np.diagonal(hinv) > 0):
                return DampedInverse((hinv + hinv.T) / 2, d, dead)
        except LinAlgError:
            pass
        d = d * 10 if d > 0 else 1e-8
    raise LinAlgError("Hessian could not be regularised")


def layer_error(w_old: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> float:
    """delta E = (1/2n) sum ||(W'-W) x||^2 over the samples H was built from (exact, via H)."""
    dw = w_new - w_old
    return 0.5 * float(np.sum((dw @ h) * dw))


def output_energy(w: np.ndarray, h: np.ndarray) -> float:
    """(1/2n) sum ||W x||^2: the scale that makes a layer error relative."""
    return 0.5 * float(np.sum((w @ h) * w))
