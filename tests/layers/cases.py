"""What a test case of an adapter is: one single-node model, and how to read its output.

Each per-op test module lists its cases as `CASES` (LayerCase instances); test_contract.py runs
the checks every adapter must pass over all of them, so a new adapter brings its cases along.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .refs import F32_TOL, build_model, case_rng, run_model


@dataclass(frozen=True)
class LayerCase:
    op: str
    name: str
    x_shape: tuple
    w_shape: tuple
    attrs: dict
    bias_shape: tuple | None
    # (x, w_shape, attrs) -> (columns [groups, n, cols] in float64, the op's output shape), by
    # brute force (refs.py)
    reference: Callable
    dtype: type = np.float32
    seed: str = ""  # prefix of the case's random seed
    evaluator: str = "ort"  # "reference": onnxruntime refuses the op, the ONNX evaluator runs it
    op_tol: float = F32_TOL  # columns @ matrices (and any rewrite) against the op's output
    column_rtol: float = 0.0  # the columns against the brute-force ones (0: exactly equal)
    bias_rtol: float = 0.0  # the bias after bias_vector and bias_from_vector (0: exactly equal)
    bias_ignored: bool = False  # the op reads no bias although it has one (Gemm with beta=0)
    out_axis: int = 1  # the axis of y holding the output channels
    in_axis: int | None = 1  # the axis of x holding the input channels (None: none the
    #                          structured members handle, as Gemm's with transA=1)
    same_positions: str | None = None  # "inputs" or "outputs": the channels whose kept local
    #                          positions must agree across groups (they share one weight axis)
    structural: bool = False  # one of the representatives checked for structured pruning

    def __str__(self):
        return f"{self.op}-{self.name}"

    def setup(self):
        """(x, w, b, model, node), the same on every call."""
        rng = case_rng(self.seed + self.name)
        x = rng.standard_normal(self.x_shape).astype(self.dtype)
        w = rng.standard_normal(self.w_shape).astype(self.dtype)
        b = rng.standard_normal(self.bias_shape).astype(self.dtype) if self.bias_shape is not None else None
        model = self.model(w, b, self.x_shape)
        return x, w, b, model, model.graph.node[0]

    def model(self, w, b, x_shape):
        """The case's op with another weight (and bias), for inputs of another shape."""
        return build_model(self.op, w, x_shape, bias=b, attrs=self.attrs, dtype=self.dtype)

    def run(self, model, x) -> np.ndarray:
        return run_model(model, x.astype(self.dtype), self.evaluator).astype(np.float64)

    def rows(self, y: np.ndarray) -> np.ndarray:
        """The output as [positions, channels], the layout of columns @ matrices."""
        return np.moveaxis(y, self.out_axis, -1).reshape(-1, y.shape[self.out_axis])

