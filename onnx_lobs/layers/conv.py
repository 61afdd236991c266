"""Conv (1-D, 2-D, 3-D, grouped and depthwise): per group, rows = the group's output channels and
columns = (input channel, kernel position), im2col order; the input unfolds into receptive fields.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import base
from .base import Geometry, channel_groups, checked_keep, kept_per_group, node_attrs


def conv_pads(attrs: dict, spatial: tuple, kernel: tuple) -> list[int]:
    """Explicit [begin..., end...] pads for an input of the given spatial size (ONNX auto_pad rules)."""
    d = len(kernel)
    strides = attrs.get("strides", [1] * d)
    dil = attrs.get("dilations", [1] * d)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * d)))
    if auto == "VALID":
        return [0] * (2 * d)
    begin, end = [], []
    for size, k, s, dl in zip(spatial, kernel, strides, dil):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * dl + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def conv_patches(x: np.ndarray, kernel, strides, dilations, pads) -> np.ndarray:
    """Strided view [N, out..., C, k...] of every receptive field of x [N, C, in...] (im2col)."""
    d = len(kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)]) if any(pads) else x
    span = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    v = sliding_window_view(xp, span, axis=tuple(range(2, 2 + d)))
    v = v[(slice(None), slice(None))
          + tuple(slice(None, None, s) for s in strides)
          + tuple(slice(None, None, dl) for dl in dilations)]
    return v.transpose((0,) + tuple(range(2, 2 + d)) + (1,) + tuple(range(2 + d, 2 + 2 * d)))


def receptive_fields(x: np.ndarray, g: int, kernel: tuple, out_shape: list, patches) -> Iterator[np.ndarray]:
    """Columns of a conv-like op in chunks of whole samples (or of output lines of one sample),
    each [g, n, cols] with every group Fortran-ordered: the copy runs along output positions,
    contiguous in x. patches(x[i:j]) gives the strided view [n, out..., C, k...] (im2col).
    """
    if min(out_shape, default=1) <= 0:
        raise ValueError(f"input {list(x.shape)} gives no output positions for kernel {list(kernel)}")
    d = len(kernel)
    dtype = base.column_dtype(x)
    cg = x.shape[1] // g
    cols = cg * math.prod(kernel)
    per_sample = math.prod(out_shape)
    budget = max(1, min(base.CHUNK_ROWS, base.CHUNK_BYTES // (g * cols * dtype.itemsize)))  # rows per chunk
    if per_sample <= budget:  # whole samples per chunk
        step, lines = budget // per_sample, out_shape[0]
    else:  # one sample is too much: split it along its first output axis
        step, lines = 1, max(1, budget // (per_sample // out_shape[0]))
    for i in range(0, x.shape[0], step):
        p = patches(x[i:i + step])  # [n, out..., C, k...]
        # Split channels into (group, channel) and order the view [g, cg, k..., n, out...] --
        # free on a view -- so the one copy below gathers the patches (and casts) with
        # output positions innermost: runs along x's rows instead of kernel-wide snippets.
        p = p.reshape(p.shape[:1 + d] + (g, cg) + p.shape[2 + d:])
        p = p.transpose((1 + d, 2 + d) + tuple(range(3 + d, 3 + 2 * d)) + tuple(range(1 + d)))
        for j in range(0, out_shape[0], lines):
            v = p[(slice(None),) * (3 + d) + (slice(j, j + lines),)]
            out = np.empty(v.shape, dtype=dtype)
            out[...] = v
            yield out.reshape(g, cols, -1).transpose(0, 2, 1)


def window_overlap(kernel, strides, dilations) -> int:
    """The most windows (of a conv or a pooling op) that one input element can fall in."""
    overlap = 1
    for k, s, dl in zip(kernel, strides, dilations):
        overlap *= min(k, -(-((k - 1) * dl + 1) // s))
    return overlap


class ConvFamily:
    """What Conv and ConvTranspose share: a weight [axis 0, axis 1, kernel...] whose axis 0 the
    group attribute divides, an input of the weight's rank, one bias per output channel."""

    weight_input = 1
    bias_input = 2
    family = "conv"
    axis0 = "output"  # what weight axis 0 counts: output channels (Conv) or input channels

    def skip_reason(self, node, weight_shape):
        if len(weight_shape) < 3:
            return f"{self.op} weight has rank {len(weight_shape)}, expected 3 or more"
        g = node_attrs(node).get("group", 1)
        if weight_shape[0] % g:
            return f"{self.op} has {weight_shape[0]} {self.axis0} channels, not divisible by group={g}"
        return None

    def view_key(self, node):
        return ("group", node_attrs(node).get("group", 1))

    def columns_key(self, node, weight_shape):
        g = self.geometry(node, weight_shape)  # with the kernel, cols fix the input channels
        attrs = tuple(sorted((k, str(v)) for k, v in node_attrs(node).items()))
        return self.op, attrs, g.groups, g.cols, tuple(weight_shape[2:])

    def window(self, node, d: int, weight_shape) -> tuple:
        """(attributes, spatial rank, kernel, strides, dilations) of the node's sliding window."""
        a = node_attrs(node)
        return a, d, tuple(weight_shape[2:]), a.get("strides", [1] * d), a.get("dilations", [1] * d)

    def input_rank(self, weight_shape):
        return len(weight_shape)

    def bias_vector(self, node, c, rows):
        g = node_attrs(node).get("group", 1)
        return c.reshape(g, -1).astype(np.float64)

    def bias_from_vector(self, node, b, like):
        return b.reshape(like.shape)

    def input_columns(self, node, weight_shape, channels):
        """Input channel c is local channel c % cg of group c // cg: columns (c % cg) * K + k there."""
        g = node_attrs(node).get("group", 1)
        cg, k = self.channels(node, weight_shape)[0] // g, math.prod(weight_shape[2:])
        cols = np.zeros((g, cg * k), dtype=bool)
        for c in np.asarray(channels, dtype=np.int64):
            cols[c // cg, (c % cg) * k:(c % cg + 1) * k] = True
        return cols

    def drop_bias(self, node, b, keep):
        return b[np.asarray(keep, dtype=np.int64)]


class Conv(ConvFamily):
    op = "Conv"

    def geometry(self, node, weight_shape):
        g = node_attrs(node).get("group", 1)
        return Geometry(g, weight_shape[0] // g, int(np.prod(weight_shape[1:])))

    def to_matrices(self, node, w):
        g = node_attrs(node).get("group", 1)
        return w.reshape(g, w.shape[0] // g, -1)

    def from_matrices(self, node, m, like):
        return m.reshape(like.shape)

    def unfold(self, node, x, weight_shape):
        a, d, kernel, strides, dil = self.window(node, x.ndim - 2, weight_shape)
        pads = conv_pads(a, x.shape[2:], kernel)
        out_shape = [(x.shape[2 + i] + pads[i] + pads[i + d] - (kernel[i] - 1) * dil[i] - 1) // strides[i] + 1
                     for i in range(d)]
        return receptive_fields(x, a.get("group", 1), kernel, out_shape,
                                lambda xs: conv_patches(xs, kernel, strides, dil, pads))

    def lipschitz_factor(self, node, weight_shape):
        """sqrt of the most receptive fields one input element can fall in (bounds the conv's norm)."""
        a = node_attrs(node)
        kernel = weight_shape[2:]
        d = len(kernel)
        return math.sqrt(window_overlap(kernel, a.get("strides", [1] * d), a.get("dilations", [1] * d)))

    def nm_groups(self, node, weight_shape, m):
        """N:M groups run along input channels at each kernel position (TensorRT's layout).

        Columns are ordered (channel, kernel position), so a group is m channels at stride K.
        """
        return channel_groups(weight_shape[1], math.prod(weight_shape[2:]), m)



    def fan_in(self, node, weight_shape):
        return weight_shape[1]

    def channels(self, node, weight_shape):
        return weight_shape[1] * node_attrs(node).get("group", 1), weight_shape[0]

    def drop_outputs(self, node, w, keep):
        return w[checked_keep(keep, w.shape[0], node_attrs(node).get("group", 1), self.op)]

    def drop_inputs(self, node, w, keep):
        g = node_attrs(node).get("group", 1)
        return w[:, kept_per_group(keep, w.shape[1] * g, g, self.op)[0]]


ADAPTERS = (Conv(),)
