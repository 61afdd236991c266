"""Gemm and MatMul: one matrix, rows = output features, columns = the reduction axis K.

Gemm's alpha is folded into the unfolded input (so the matrix is the stored weight and the
error is in the op's own output units) and beta into the bias vector.
"""

from __future__ import annotations

import numpy as np

from . import base
from .base import Geometry, column_dtype, contiguous_groups, node_attrs


class _Dense:
    """What Gemm and MatMul share: one group, input channels are the columns themselves."""

    weight_input = 1
    family = "dense"

    def _out_axis(self, node) -> int:
        raise NotImplementedError

    def input_rank(self, weight_shape):
        return None

    def fan_in(self, node, weight_shape):
        return self.geometry(node, weight_shape).cols

    def columns_key(self, node, weight_shape):
        return self.op, node_attrs(node).get("transA", 0), self.geometry(node, weight_shape).cols

    def nm_groups(self, node, weight_shape, m):
        """N:M groups run along the reduction axis K: m consecutive columns."""
        return contiguous_groups(self.geometry(node, weight_shape).cols, m)

    def channels(self, node, weight_shape):
        g = self.geometry(node, weight_shape)
        return g.cols, g.rows

    def input_columns(self, node, weight_shape, channels):
        cols = np.zeros((1, self.geometry(node, weight_shape).cols), dtype=bool)
        cols[0, np.asarray(channels, dtype=np.int64)] = True
        return cols

    def drop_outputs(self, node, w, keep):
        axis = self._out_axis(node)
        return np.take(w, base.checked_keep(keep, w.shape[axis], 1, self.op), axis=axis)

    def drop_inputs(self, node, w, keep):
        axis = 1 - self._out_axis(node)
        return np.take(w, base.checked_keep(keep, w.shape[axis], 1, self.op), axis=axis)


class Gemm(_Dense):
    op = "Gemm"
    bias_input = 2

    def _out_axis(self, node):
        return 0 if node_attrs(node).get("transB", 0) else 1

    def skip_reason(self, node, weight_shape):
        if len(weight_shape) != 2:
            return f"Gemm weight has rank {len(weight_shape)}, expected 2"
        return None

    def geometry(self, node, weight_shape):
        k, n = weight_shape if not node_attrs(node).get("transB", 0) else weight_shape[::-1]
        return Geometry(1, n, k)

    def view_key(self, node):
        return ("transB", node_attrs(node).get("transB", 0))

    def to_matrices(self, node, w):
        m = w.T if not node_attrs(node).get("transB", 0) else w
        return m[None]

    def from_matrices(self, node, m, like):
        w = m[0].T if not node_attrs(node).get("transB", 0) else m[0]
        return w.reshape(like.shape)

    def bias_vector(self, node, c, rows):
        """beta*C as a per-row vector, or None when C is not a per-output-unit bias."""
        beta = node_attrs(node).get("beta", 1.0)
        if beta == 0 or c.size != rows or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            return None
        return (beta * c.reshape(1, rows)).astype(np.float64)

    def bias_from_vector(self, node, b, like):
        beta = node_attrs(node).get("beta", 1.0)
        return (b / beta).reshape(like.shape)

    def drop_bias(self, node, b, keep):
        if b.ndim == 0 or b.shape[-1] == 1:  # broadcast along the outputs: nothing to drop
            return b
        return np.take(b, np.asarray(keep, dtype=np.int64), axis=-1)

    def unfold(self, node, x, weight_shape):
        a = node_attrs(node)
        # Extra leading axes (stacked Loop/Scan iterations) are more samples; with transA the
        # samples are A's last axis, so swap before merging them.
        x = np.swapaxes(x, -1, -2) if a.get("transA", 0) else x
        x = x.reshape(-1, x.shape[-1])
        alpha = a.get("alpha", 1.0)
        if alpha == 1.0:
            yield x.astype(column_dtype(x), copy=False)[None]
        else:  # scaled in float64, where it is exact enough for the 1e-10 references
            yield (alpha * x.astype(np.float64))[None]

    def lipschitz_factor(self, node, weight_shape):
        return abs(node_attrs(node).get("alpha", 1.0))


class MatMul(_Dense):
    op = "MatMul"
    bias_input = None

    def _out_axis(self, node):
        return 1

    def skip_reason(self, node, weight_shape):
        if len(weight_shape) != 2:
            return f"MatMul weight has rank {len(weight_shape)}, expected 2 (batched weights are not pruned)"
        return None

    def geometry(self, node, weight_shape):
        return Geometry(1, weight_shape[1], weight_shape[0])

    def view_key(self, node):
        return ()

    def to_matrices(self, node, w):
        return w.T[None]

    def from_matrices(self, node, m, like):
        return m[0].T.reshape(like.shape)

    def bias_vector(self, node, c, rows):
        return None

    def bias_from_vector(self, node, b, like):
        raise AssertionError("MatMul has no bias input")

    def drop_bias(self, node, b, keep):
        raise AssertionError("MatMul has no bias input")

    def unfold(self, node, x, weight_shape):
        k = x.shape[-1]
        flat = x.reshape(-1, k)
        dtype = column_dtype(x)
        step = max(1, base.CHUNK_BYTES // (dtype.itemsize * k))
        for i in range(0, flat.shape[0], step):
            yield flat[i:i + step].astype(dtype, copy=False)[None]  # a view when no cast is needed

    def lipschitz_factor(self, node, weight_shape):
        return 1.0


ADAPTERS = (Gemm(), MatMul())
