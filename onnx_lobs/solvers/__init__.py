"""Pruning solvers: pure functions (W, H, Target) -> Solution, one module per method.

A solver sees one weight matrix W [rows, cols] (the bias, when there is one, is the last
column and is protected: compensated, never removed) and the layer's mean Hessian H. It knows
nothing of ONNX, files or progress bars.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Target:
    """How much to remove: exactly n_prune weights, or as many as keep the loss <= max_loss."""

    n_prune: int | None = None
    max_loss: float | None = None
    protect: np.ndarray | None = None  # bool per column: never removed (the bias column)
    damp: float = 0.01  # fraction of mean diag(H) added before inverting


@dataclass
class Solution:
    weights: np.ndarray  # new W, same shape; removed entries are exactly 0
    pruned: np.ndarray  # bool mask, True where a weight was removed
    predicted_loss: float  # the solver's own estimate of delta E
    damp: float | None = None  # dampening actually used (None: H not inverted)
    notes: list[str] = field(default_factory=list)


def removable_columns(cols: int, target: Target) -> np.ndarray:
    if target.protect is None:
        return np.ones(cols, dtype=bool)
    return ~np.asarray(target.protect, dtype=bool)


def _methods():
    from . import lobs, magnitude

    return {"lobs": lobs.solve, "magnitude": magnitude.solve}


def get_solver(method: str):
    methods = _methods()
    if method not in methods:
        raise KeyError(method)
    return methods[method]


METHODS = ("lobs", "magnitude")
