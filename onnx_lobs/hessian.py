"""Layer-wise Hessians H = (1/n) sum x x^T, accumulated batch by batch, and their damped inverses.

Only the running sums are kept (sum x x^T, sum x, n), never the activations, so memory is the
Hessians plus one batch whatever the number of calibration samples. When a layer has a bias its
input is augmented with a constant 1 as the last column, so the bias takes part in the solve.

Precision. The running totals are always float64. By default (the pipeline's choice) float32
columns are multiplied in float32 -- X^T X of at most FAST_ROWS rows at a time, in one BLAS ssyrk
-- and each product is added into the float64 total: about twice the speed of float64 products,
and the total stays within 1e-6 (relative, Frobenius) of the all-float64 result on real
activations (tests/test_hessian.py measures it). The sums of the bias column (sum x, n) are
always accumulated in float64. exact=True upcasts every batch to float64 instead (the adapter
tests check against brute force to 1e-10 that way); float64 columns always take that path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, blas, lapack

# Rows per float32 product on the fast path: rounding grows with the rows summed in float32, so
# longer inputs are cut into products of at most this many rows, each added into float64.
FAST_ROWS = 8192
BATCHED_COLS = 64  # groups at most this wide are multiplied as one stack


def sums_nbytes(groups: int, cols: int) -> int:
    """The bytes of one accumulator's totals once made: sum x x^T and sum x, float64."""
    return groups * (cols * cols + cols) * 8


class HessianAccumulator:
    """Running sums for one layer: per group, sum x x^T (upper triangle), sum x and n (float64)."""

    def __init__(self, groups: int, cols: int, bias: bool, exact: bool = False):
        self.bias = bias
        self.exact = exact
        self.n = 0
        self._xx = np.zeros((groups, cols, cols), order="C")  # upper triangle used; lower stays 0
        self._x = np.zeros((groups, cols))

    def add(self, x: np.ndarray) -> None:
        """Fold in columns x [groups, n, cols]: any float dtype and memory layout."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != self._xx.shape[0] or x.shape[2] != self._xx.shape[2]:
            raise ValueError(f"columns of shape {x.shape} for an accumulator of "
                             f"{self._xx.shape[0]} group(s) x {self._xx.shape[2]} columns")
        if x.shape[1] == 0:
            return
        fast = not self.exact and x.dtype != np.float64
        x = x.astype(np.float32 if fast else np.float64, copy=False)
        groups, n, cols = x.shape
        if self.bias:
            self._x += np.einsum("gij->gj", x, dtype=np.float64)  # float64 sums (einsum: the fastest)
        if groups > 1 and cols <= BATCHED_COLS:
            # Many small groups (depthwise and grouped convs): one stacked product for them all,
            # not a BLAS call per group, whose overhead would dwarf its work.
            step = FAST_ROWS if fast else n
            for i in range(0, n, step):
                xt = x[:, i:i + step].transpose(0, 2, 1)
                self._xx += np.triu(np.matmul(xt, xt.transpose(0, 2, 1)))
        elif fast:
            # One float32 scratch per call: syrk writes the upper triangle of scratch.T, the rest
            # stays 0, so adding it whole leaves the total's lower triangle 0 too.
            scratch = np.zeros((cols, cols), np.float32, order="F")
            for g in range(groups):
                for i in range(0, n, FAST_ROWS):
                    _syrk(blas.ssyrk, x[g, i:i + FAST_ROWS], 0.0, scratch)
                    self._xx[g] += scratch.T
        else:
            for g in range(groups):
                _syrk(blas.dsyrk, x[g], 1.0, self._xx[g].T)
        self.n += n

    def merge(self, other: "HessianAccumulator") -> None:
        self._xx += other._xx
        self._x += other._x
        self.n += other.n

    def quadratic_form(self, k: int, w: np.ndarray) -> float:
        """(1/2) sum_i w_i H w_i^T for group k's mean H (w [rows, c] with the bias column when
        augmented), straight from the totals: the upper triangle T (diagonal included) gives
        x^T H x = (2 x^T T x - x^T diag(T) x) / n, so no [c, c] matrix is assembled (a held-out
        error on ResNet-50's widest layers: assembling H cost more than the product)."""
        if self.n == 0:
            raise ValueError("no calibration samples reached this layer")
        m = self._xx.shape[2]
        t = self._xx[k]
        v = w[:, :m]
        total = 4.0 * quadratic_form(v, t) - float(np.sum(np.square(v) @ np.diagonal(t)))
        if self.bias:
            b = w[:, m]
            total += 2.0 * float(b @ (v @ self._x[k])) + float(b @ b) * self.n
        return 0.5 * total / self.n

    def hessian(self) -> np.ndarray:
        """The mean Hessian [groups, c, c], c = cols (+1 with bias), symmetric, float64."""
        whole = slice(0, self._xx.shape[2])
        return self._mean_block(whole, whole)

    def blocks(self, split: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(H_p, C, H_d) of a joint accumulator over [x_d (split columns), x_p (split columns)]:
        mean x_p x_p^T, mean x_d x_p^T and mean x_d x_d^T, each augmented with the bias column.
        Read straight from the totals' upper triangle, without forming the joint matrix."""
        d, p = slice(0, split), slice(split, 2 * split)
        return self._mean_block(p, p), self._mean_block(d, p), self._mean_block(d, d)

    def _mean_block(self, r: slice, c: slice) -> np.ndarray:
        """The mean of the totals' block [r, c] (square), plus the bias row and column."""
        if self.n == 0:
            raise ValueError("no calibration samples reached this layer")
        g = self._xx.shape[0]
        m = r.stop - r.start
        k = m + self.bias
        h = np.empty((g, k, k))
        top = h[:, :m, :m]
        if r == c:
            # A diagonal block: its lower triangle in the totals is 0, so the upper plus its
            # transpose is the full matrix with the diagonal counted twice.
            u = self._xx[:, r, r]
            np.add(u, u.transpose(0, 2, 1), out=top)
            idx = np.arange(m)
            top[:, idx, idx] *= 0.5
        else:  # wholly above the diagonal: stored in full
            top[...] = self._xx[:, r, c]
        if self.bias:
            h[:, :m, m] = self._x[:, r]
            h[:, m, :m] = self._x[:, c]
            h[:, m, m] = self.n
        h /= self.n
        return h


class HeldOut:
    """The held-out twin of a HessianAccumulator: its columns kept as they are while they take
    less memory than the sums would, folded into sums beyond that. A held-out set is one sample
    in ten, so for wide layers the columns are far smaller (a 1B Llama's down projection: 800
    held-out tokens x 8192 columns in float32 are 26 MB, its sums 537 MB). The errors read from
    the columns are exact; a Hessian is built from them only when a solve asks for one."""

    def __init__(self, groups: int, cols: int, bias: bool, exact: bool = False):
        self.bias, self.exact, self.n = bias, exact, 0
        self.shape = (groups, cols)
        self.limit = sums_nbytes(groups, cols)  # what the sums take
        self.cols: list[np.ndarray] = []
        self.sums: HessianAccumulator | None = None

    @property
    def nbytes(self) -> int:
        return self.limit if self.sums is not None else sum(c.nbytes for c in self.cols)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[0] != self.shape[0] or x.shape[2] != self.shape[1]:
            raise ValueError(f"columns of shape {x.shape} for an accumulator of "
                             f"{self.shape[0]} group(s) x {self.shape[1]} columns")
        if x.shape[1] == 0:
            return
        self.n += x.shape[1]
        if self.sums is None:
            keep = np.float64 if self.exact or x.dtype == np.float64 else np.float32
            if self.nbytes + np.dtype(keep).itemsize * x.size <= self.limit:
                self.cols.append(np.array(x, dtype=keep))
                return
            self.sums = self._summed()  # the columns would outgrow the sums: sums from here on
            self.cols = []
        self.sums.add(x)

    def merge(self, other: "HeldOut") -> None:
        """Add another shard's held-out columns or sums (distributed.py)."""
        for x in other.cols:
            self.add(x)
        if other.sums is not None:
            if self.sums is None:
                self.sums = self._summed()
                self.cols = []
            self.sums.merge(other.sums)
            self.n += other.sums.n

    def _summed(self) -> HessianAccumulator:
        acc = HessianAccumulator(*self.shape, self.bias, self.exact)
        for x in self.cols:
            acc.add(x)
        return acc

    def quadratic_form(self, k: int, w: np.ndarray) -> float:
        """(1/2n) sum ||w x||^2 over group k's held-out columns (x with the 1 when augmented)."""
        if self.sums is not None:
            return self.sums.quadratic_form(k, w)
        if self.n == 0:
            raise ValueError("no calibration samples reached this layer")
        m = self.shape[1]
        total = 0.0
        for x in self.cols:
            y = x[k].astype(np.float64) @ w[:, :m].T
            if self.bias:
                y += w[:, m]
            total += float(np.einsum("ij,ij->", y, y))
        return 0.5 * total / self.n

    def hessian(self) -> np.ndarray:
        return (self.sums or self._summed()).hessian()

    def blocks(self, split: int):
        return (self.sums or self._summed()).blocks(split)


def _syrk(syrk, x: np.ndarray, beta: float, c: np.ndarray) -> None:
    """c <- beta * c + x^T x in place, on c's lower triangle; c is Fortran-ordered, so its lower
    triangle is the upper one of c.T (C-ordered). x is read as is when it is C- or Fortran-ordered.
    """
    if x.flags.f_contiguous:
        a, trans = x, 1  # a^T a
    else:
        a, trans = np.asfortranarray(x.T), 0  # a a^T; x.T of a C-ordered x is Fortran-ordered: no copy
    res = syrk(1.0, a, beta=beta, c=c, trans=trans, lower=1, overwrite_c=1)
    if not np.shares_memory(res, c):  # f2py works in place on a Fortran-ordered c of the right type
        c[...] = res


@dataclass
class DampedInverse:
    hinv: np.ndarray  # (H + lambda I)^-1 with dead inputs' diagonal set to 1
    damp: float  # the fraction of mean diag(H) actually added
    dead: np.ndarray  # bool per column: inputs that were zero on every calibration sample


def damped_hessian(h: np.ndarray, damp: float, dtype=np.float64, reverse: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(Hd, dead): H + damp * mean(diag H) * I with every dead input (diag H == 0) decoupled and
    given a unit diagonal. Dead inputs carry no signal: the 1 keeps Hd invertible without
    coupling them to anything, and their weights cost nothing to remove. The scale is the mean
    diagonal of H itself, not of the 1s put in for dead inputs. reverse: P Hd P instead, P the
    order-reversing permutation (dead still in H's order), built in dtype by one pass over H
    (the factor of Hd^-1 wants it so: solvers/factors.py)."""
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    n = h.shape[0]
    out = np.ascontiguousarray(h).ravel()[::-1].astype(dtype).reshape(n, n) if reverse else np.array(h, dtype=dtype)
    if dead.any():
        idx = np.flatnonzero(dead[::-1] if reverse else dead)
        out[idx, :] = 0
        out[:, idx] = 0
        out[idx, idx] = 1.0
    scale = float(np.maximum(diag, 0.0).sum() / n) if n else 0.0
    out.flat[::n + 1] += damp * (scale or 1.0)  # the diagonal (out is a C array of its own)
    return out, dead


def raise_damp_until(attempt, damp: float, max_tries: int = 8):
    """attempt(d) for d = damp, then tenfold more each time (from 1e-8 if damp is 0), until it
    returns something other than None: too little dampening shows as a failed factorisation."""
    d = damp
    for _ in range(max_tries):
        result = attempt(d)
        if result is not None:
            return result
        d = d * 10 if d > 0 else 1e-8
    raise LinAlgError("Hessian could not be regularised")


def damped_inverse(h: np.ndarray, damp: float, max_tries: int = 8) -> DampedInverse:
    """Invert damped_hessian(h, damp), raising damp tenfold until the Cholesky succeeds."""
    def attempt(d):
        hd, dead = damped_hessian(h, d)
        up, info = lapack.dpotrf(hd, lower=0, clean=0, overwrite_a=1)
        if info != 0:
            return None
        inv, info = lapack.dpotri(up, lower=0, overwrite_c=1)  # upper triangle of Hd^-1
        if info != 0:
            return None
        hinv = np.triu(inv)
        hinv += np.triu(inv, 1).T
        if np.all(np.isfinite(hinv)) and np.all(np.diagonal(hinv) > 0):
            return DampedInverse(hinv, d, dead)
        return None

    return raise_damp_until(attempt, damp, max_tries)


def damped_solve(h: np.ndarray, damp: float, rhs: np.ndarray, max_tries: int = 8) -> np.ndarray:
    """Hd^-1 rhs for Hd = damped_hessian(h, damp), raising damp as damped_inverse does: one
    Cholesky and two triangular solves, a third of the work of forming Hd^-1."""
    def attempt(d):
        up, info = lapack.dpotrf(damped_hessian(h, d)[0], lower=0, clean=1, overwrite_a=1)
        if info != 0:
            return None
        x, info = lapack.dpotrs(up, rhs, lower=0)
        return x if info == 0 and np.all(np.isfinite(x)) else None

    return raise_damp_until(attempt, damp, max_tries)


# From this many multiply-adds the quadratic forms below run in float32 (a relative precision of
# about 1e-6, far below what a report or a comparison of two solves needs): on ResNet-50's widest
# layers each one cost a third of a second in double, and a layer takes three or four of them.
SINGLE_FORM = 1 << 28


def quadratic_form(w: np.ndarray, h: np.ndarray) -> float:
    """(1/2) sum_i w_i H w_i^T over the rows of w."""
    if w.size * h.shape[0] >= SINGLE_FORM:
        w32 = w.astype(np.float32)
        return 0.5 * float(np.einsum("ij,ij->", w32 @ h.astype(np.float32, copy=False), w32, dtype=np.float64))
    return 0.5 * float(np.sum((w @ h) * w))


def layer_error(w_old: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> float:
    """delta E = (1/2n) sum ||(W'-W) x||^2 over the samples H was built from (exact, via H)."""
    return quadratic_form(w_new - w_old, h)


def output_energy(w: np.ndarray, h: np.ndarray) -> float:
    """(1/2n) sum ||W x||^2: the scale that makes a layer error relative."""
    return quadratic_form(w, h)
