"""The damped Hessian itself, and the factor of its inverse that SparseGPT sweeps with.

hessian.damped_inverse inverts Hd = H' + damp * mean(diag H) * I, where H' is H with every dead
input (diag H == 0) decoupled and given a unit diagonal. Some solvers need Hd itself or a
triangular factor of Hd^-1 rather than Hd^-1, so the same matrix is rebuilt here; the tests
check that it is the inverse of damped_inverse's result, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, lapack


def damped_hessian(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(Hd, dead): the matrix hessian.damped_inverse(h, damp) inverts, and the dead inputs."""
    h = np.array(h, dtype=np.float64)
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    scale = float(np.mean(np.maximum(diag, 0.0))) or 1.0
    h[np.diag_indices_from(h)] += damp * scale
    return h, dead


@dataclass
class InverseFactor:
    u: np.ndarray  # upper triangular, Hd^-1 = U^T U
    damp: float  # the dampening actually used
    dead: np.ndarray  # bool per column


def inverse_upper_factor(h: np.ndarray, damp: float, max_tries: int = 8) -> InverseFactor:
    """U upper triangular with U^T U = Hd^-1, raising damp tenfold (as damped_inverse does)
    until the factorisation succeeds.

    With P the order-reversing permutation, P Hd P = L L^T (lower Cholesky) gives
    Hd^-1 = (P L^-T P)(P L^-1 P), and P L^-1 P is upper triangular. That is one Cholesky and
    one triangular inverse, about a quarter of the work of inverting Hd and factoring again.
    Dead inputs and the raising of damp follow damped_inverse (the condition differs only in
    that this factorisation, not damped_inverse's, must succeed).
    """
    d = damp
    for _ in range(max_tries):
        hd, dead = damped_hessian(h, d)
        n = hd.shape[0]
        # P Hd P as a C array is Hd's memory reversed. LAPACK sees that memory in Fortran
        # order, i.e. transposed: its upper Cholesky factor R (P Hd P = R^T R) and then R^-1
        # are, read back in C order, L = R^T and L^-1. No copies beyond the two reversals.
        rev = hd.ravel()[::-1].copy().reshape(n, n)
        del hd
        up, info = lapack.dpotrf(rev.T, lower=0, clean=1, overwrite_a=1)
        if info == 0:
            inv_up, info = lapack.dtrtri(up, lower=0, overwrite_c=1)
            if info == 0:
                # U = P L^-1 P: L^-1's C-order memory, reversed.
                u = np.ascontiguousarray(inv_up.T).ravel()[::-1].copy().reshape(n, n)
                if np.all(np.diagonal(u) > 0) and np.isfinite(u).all():
                    return InverseFactor(u, d, dead)
        d = d * 10 if d > 0 else 1e-8
    raise LinAlgError("Hessian could not be regularised")
