"""The factorisations of the damped Hessian that solvers use, and the memo that the solves of
one Hessian share.

The damped matrix is hessian.damped_hessian's (one definition for every solver): H with dead
inputs decoupled, plus damp * mean(diag H) on the diagonal. Two kinds: "inverse", Hd^-1
(hessian.damped_inverse; lobs and obc), and "upper", U with U^T U = Hd^-1 (sparsegpt)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import lapack

from ..hessian import damped_hessian, damped_inverse, raise_damp_until


# From this many columns U is computed in single precision: the Cholesky and the triangular
# inverse are O(cols^3) and from a few hundred columns they outweigh the layer's sweeps, each damp
# of the grid costing one (ocr-v6-rec's 384 x 768 convs: 0.185 s a solve in double, 0.10 in
# single, the same results to 4 digits); the damped Hessian's condition is at most about
# 100 * cols (damp 1% of its mean diagonal), and a failed or non-finite single-precision factor
# falls back to double.
SINGLE_COLS = 512


@dataclass
class InverseFactor:
    u: np.ndarray  # upper triangular, Hd^-1 = U^T U
    damp: float  # the dampening actually used
    dead: np.ndarray  # bool per column
    _cast: dict = field(default_factory=dict, repr=False)

    def cast(self, dtype) -> np.ndarray:
        """u in dtype, converted once (a sweep per damp on a row subset, then one on all rows)."""
        dtype = np.dtype(dtype)
        if self.u.dtype == dtype:
            return self.u
        if dtype not in self._cast:
            self._cast[dtype] = self.u.astype(dtype)
        return self._cast[dtype]


def inverse_upper_factor(h: np.ndarray, damp: float, max_tries: int = 8) -> InverseFactor:
    """U upper triangular with U^T U = Hd^-1, raising damp tenfold (as damped_inverse does)
    until the factorisation succeeds.

    With P the order-reversing permutation, P Hd P = L L^T (lower Cholesky) gives
    Hd^-1 = (P L^-T P)(P L^-1 P), and P L^-1 P is upper triangular. That is one Cholesky and
    one triangular inverse, about a quarter of the work of inverting Hd and factoring again.
    Dead inputs and the raising of damp follow damped_inverse (the condition differs only in
    that this factorisation, not damped_inverse's, must succeed).
    """
    single = h.shape[0] >= SINGLE_COLS

    def attempt(d):
        return (single and _upper(h, d, np.float32)) or _upper(h, d, np.float64)

    return raise_damp_until(attempt, damp, max_tries)


def _upper(h, d, dtype):
    # P Hd P (damped_hessian's reverse: Hd's memory reversed, a C array) is seen by LAPACK in
    # Fortran order, i.e. transposed: its upper Cholesky factor R (P Hd P = R^T R) and then R^-1
    # are, read back in C order, L = R^T and L^-1. No copies beyond the two reversals.
    rev, dead = damped_hessian(h, d, dtype, reverse=True)
    n = rev.shape[0]
    potrf, trtri = lapack.get_lapack_funcs(("potrf", "trtri"), (rev,))
    up, info = potrf(rev.T, lower=0, clean=1, overwrite_a=1)
    if info != 0:
        return None
    inv_up, info = trtri(up, lower=0, overwrite_c=1)
    if info != 0:
        return None
    # U = P L^-1 P: L^-1's C-order memory, reversed.
    u = np.ascontiguousarray(inv_up.T).ravel()[::-1].copy().reshape(n, n)
    if np.all(np.diagonal(u) > 0) and np.isfinite(u).all():
        return InverseFactor(u, d, dead)
    return None


def memoised(memo: dict | None, key: tuple, compute):
    """compute(), or the value it gave before for this key. The damp grid solves one Hessian
    several times (on a subset of rows, then on all of them), and a factorisation costs as much
    as a whole sweep."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


_FACTORISE = {"inverse": damped_inverse, "upper": inverse_upper_factor}
FACTORISATIONS = frozenset(_FACTORISE)  # the memo keys' kinds that depend on h and the damp alone


def factor(kind: str, h: np.ndarray, damp: float, memo: dict | None):
    """The factorisation `kind` ("inverse" or "upper") of the damped h, memoised under (kind, damp)."""
    return memoised(memo, (kind, damp), lambda: _FACTORISE[kind](h, damp))


def times_inverse(a: np.ndarray, h: np.ndarray, damp: float, kind: str, memo: dict) -> np.ndarray:
    """a Hd^-1 from the factorisation of kind `kind` ('upper' or 'inverse'), memoised for the solver
    that will use it: sequential mode's start W0 = W C Hd^-1 then costs products with a matrix the
    solve needs anyway, not a Cholesky of its own."""
    if kind == "upper":
        u = factor("upper", h, damp, memo).u
        return (a @ u.T) @ u
    return a @ factor("inverse", h, damp, memo).hinv
