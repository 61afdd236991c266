"""One adapter per prunable op (Gemm, MatMul, Conv, ConvTranspose): how its weight is a matrix,
how its input unfolds into columns.

Every solver works on W[g] (rows x cols) and H[g] = mean x x^T per group g. An adapter is the
only place that knows how an op's weight tensor and input tensor map onto that picture, so adding
an op means adding an adapter here, nothing else.

Scaling conventions: Gemm's alpha is folded into the unfolded input (so the matrix is the stored
weight and the error is in the op's own output units) and beta into the bias vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx import NodeProto, helper

from .errors import LobsError
from .hessian import FAST_ROWS

# Upper bound on the column data materialised at once while unfolding an input.
CHUNK_BYTES = 64 << 20
# At most this many rows (samples x output positions) per conv chunk: the accumulator's float32
# products take FAST_ROWS rows at a time, which it reads from such a chunk without copying.
CHUNK_ROWS = FAST_ROWS


def column_dtype(x: np.ndarray) -> np.dtype:
    """float64 inputs unfold to float64 columns, every other float type to float32 (exactly)."""
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def node_attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass(frozen=True)
class Geometry:
    groups: int
    rows: int  # output units per group
    cols: int  # inputs per group, without the bias column


class Gemm:
    op = "Gemm"
    weight_input = 1
    bias_input = 2

    def skip_reason(self, node, weight_shape):
        if len(weight_shape) != 2:
            return f"Gemm weight has rank {len(weight_shape)}, expected 2"
        return None

    def geometry(self, node, weight_shape):
        k, n = weight_shape if not node_attrs(node).get("transB", 0) else weight_shape[::-1]
        return Geometry(1, n, k)

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

    def nm_groups(self, node, weight_shape, m):
        """N:M groups run along the reduction axis K: m consecutive columns."""
        return contiguous_groups(self.geometry(node, weight_shape).cols, m)


class MatMul:
    op = "MatMul"
    weight_input = 1
    bias_input = None

    def skip_reason(self, node, weight_shape):
        if len(weight_shape) != 2:
            return f"MatMul weight has rank {len(weight_shape)}, expected 2 (batched weights are not pruned)"
        return None

    def geometry(self, node, weight_shape):
        return Geometry(1, weight_shape[1], weight_shape[0])

    def to_matrices(self, node, w):
        return w.T[None]

    def from_matrices(self, node, m, like):
        return m[0].T.reshape(like.shape)

    def bias_vector(self, node, c, rows):
        return None

    def bias_from_vector(self, node, b, like):
        raise AssertionError("MatMul has no bias input")

    def unfold(self, node, x, weight_shape):
        k = x.shape[-1]
        flat = x.reshape(-1, k)
        dtype = column_dtype(x)
        step = max(1, CHUNK_BYTES // (dtype.itemsize * k))
        for i in range(0, flat.shape[0], step):
            yield flat[i:i + step].astype(dtype, copy=False)[None]  # a view when no cast is needed

    def lipschitz_factor(self, node, weight_shape):
        return 1.0

    def nm_groups(self, node, weight_shape, m):
        """N:M groups run along the reduction axis K: m consecutive columns."""
        return contiguous_groups(self.geometry(node, weight_shape).cols, m)


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
    dtype = column_dtype(x)
    cg = x.shape[1] // g
    cols = cg * math.prod(kernel)
    per_sample = math.prod(out_shape)
    budget = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (g * cols * dtype.itemsize)))  # rows per chunk
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


class Conv:
    op = "Conv"
    weight_input = 1
    bias_input = 2

    def skip_reason(self, node, weight_shape):
        if len(weight_shape) < 3:
            return f"Conv weight has rank {len(weight_shape)}, expected 3 or more"
        g = node_attrs(node).get("group", 1)
        if weight_shape[0] % g:
            return f"Conv has {weight_shape[0]} output channels, not divisible by group={g}"
        return None

    def geometry(self, node, weight_shape):
        g = node_attrs(node).get("group", 1)
        return Geometry(g, weight_shape[0] // g, int(np.prod(weight_shape[1:])))

    def to_matrices(self, node, w):
        g = node_attrs(node).get("group", 1)
        return w.reshape(g, w.shape[0] // g, -1)

    def from_matrices(self, node, m, like):
        return m.reshape(like.shape)

    def bias_vector(self, node, c, rows):
        g = node_attrs(node).get("group", 1)
        return c.reshape(g, -1).astype(np.float64)

    def bias_from_vector(self, node, b, like):
        return b.reshape(like.shape)

    def unfold(self, node, x, weight_shape):
        a = node_attrs(node)
        d = x.ndim - 2
        kernel = tuple(weight_shape[2:])
        strides = a.get("strides", [1] * d)
        dil = a.get("dilations", [1] * d)
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
        strides = a.get("strides", [1] * d)
        dil = a.get("dilations", [1] * d)
        overlap = 1
        for k, s, dl in zip(kernel, strides, dil):
            overlap *= min(k, -(-((k - 1) * dl + 1) // s))
        return math.sqrt(overlap)

    def nm_groups(self, node, weight_shape, m):
        """N:M groups run along input channels at each kernel position (TensorRT's layout).

        Columns are ordered (channel, kernel position), so a group is m channels at stride K.
        """
        return channel_groups(weight_shape[1], math.prod(weight_shape[2:]), m)


def conv_transpose_layout(attrs: dict, spatial: tuple, kernel: tuple) -> tuple[list[int], list[int]]:
    """(begin pads, output size) per spatial axis of a ConvTranspose, as onnxruntime computes them.

    The full output of a transposed conv has s*(in-1) + output_padding + (k-1)*d + 1 positions;
    pads crop it. With output_shape, or auto_pad SAME_* (target in*s), the total crop is the full
    size minus the target, split as the spec says (SAME_UPPER: the odd one at the end), but
    onnxruntime clamps it at 0: the output is then the requested size (output_shape) or the
    full size (SAME_*), extended or kept with positions no input reaches.
    """
    d = len(kernel)
    strides = attrs.get("strides", [1] * d)
    dil = attrs.get("dilations", [1] * d)
    extra = attrs.get("output_padding", [0] * d)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    requested = list(attrs.get("output_shape", []))[-d:] if attrs.get("output_shape") else None
    pads = list(attrs.get("pads", [0] * (2 * d)))
    begin, out = [], []
    for i in range(d):
        full = strides[i] * (spatial[i] - 1) + extra[i] + (kernel[i] - 1) * dil[i] + 1
        if requested is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
            want = requested[i] if requested is not None else spatial[i] * strides[i]
            total = max(0, full - want)
            begin.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
            out.append(want if requested is not None else full - total)
        elif auto == "VALID":
            begin.append(0)
            out.append(full)
        else:
            begin.append(pads[i])
            out.append(full - pads[i] - pads[i + d])
    return begin, out


def zero_insert(x: np.ndarray, strides, before, after, dtype) -> np.ndarray:
    """x [N, C, in...] with s-1 zeros between neighbours along each spatial axis, then padded
    (or, for negative amounts, cropped) by before/after: the input of the equivalent conv."""
    inner = [(n - 1) * s + 1 for n, s in zip(x.shape[2:], strides)]
    z = np.zeros(x.shape[:2] + tuple(max(b, 0) + n + max(a, 0) for n, b, a in zip(inner, before, after)), dtype)
    z[(slice(None), slice(None)) + tuple(slice(max(b, 0), max(b, 0) + n, s)
                                         for n, b, s in zip(inner, before, strides))] = x
    return z[(slice(None), slice(None)) + tuple(slice(max(-b, 0), z.shape[2 + i] - max(-a, 0))
                                                for i, (b, a) in enumerate(zip(before, after)))]


class ConvTranspose:
    """Weight [C_in, C_out/g, k...]. Per group, rows = the group's output channels and columns =
    (input channel, kernel position), like Conv's im2col order. The op is the conv, with the
    kernel flipped, of the stride-dilated (zero-inserted) and padded input: the unfolded columns
    are that conv's receptive fields, read with the kernel axes reversed so that column
    (c, k) multiplies the stored weight W[c, o, k]. The Hessian is that conv's.
    """

    op = "ConvTranspose"
    weight_input = 1
    bias_input = 2

    def skip_reason(self, node, weight_shape):
        if len(weight_shape) < 3:
            return f"ConvTranspose weight has rank {len(weight_shape)}, expected 3 or more"
        g = node_attrs(node).get("group", 1)
        if weight_shape[0] % g:
            return f"ConvTranspose has {weight_shape[0]} input channels, not divisible by group={g}"
        return None

    def geometry(self, node, weight_shape):
        g = node_attrs(node).get("group", 1)
        return Geometry(g, weight_shape[1], weight_shape[0] // g * math.prod(weight_shape[2:]))

    def to_matrices(self, node, w):
        g = node_attrs(node).get("group", 1)
        m = w.reshape(g, w.shape[0] // g, w.shape[1], -1)  # [g, C_in/g, C_out/g, K]
        return m.transpose(0, 2, 1, 3).reshape(g, w.shape[1], -1)

    def from_matrices(self, node, m, like):
        g = node_attrs(node).get("group", 1)
        w = m.reshape(g, like.shape[1], like.shape[0] // g, -1).transpose(0, 2, 1, 3)
        return w.reshape(like.shape)

    # One bias per output channel, grouped as the rows: the same as Conv's.
    bias_vector = Conv.bias_vector
    bias_from_vector = Conv.bias_from_vector

    def unfold(self, node, x, weight_shape):
        a = node_attrs(node)
        d = x.ndim - 2
        kernel = tuple(weight_shape[2:])
        strides = a.get("strides", [1] * d)
        dil = a.get("dilations", [1] * d)
        begin, out_shape = conv_transpose_layout(a, x.shape[2:], kernel)
        span = [(k - 1) * dl for k, dl in zip(kernel, dil)]  # (k-1)*d: reach of the flipped kernel
        before = [r - b for r, b in zip(span, begin)]
        # after: whatever makes the stride-1 conv give exactly out_shape positions
        after = [o + r - (n - 1) * s - 1 - b for o, r, n, s, b in zip(out_shape, span, x.shape[2:], strides, before)]
        dtype = column_dtype(x)
        flip = (Ellipsis,) + (slice(None, None, -1),) * d

        def patches(xs):
            z = zero_insert(xs, strides, before, after, dtype)
            return conv_patches(z, kernel, [1] * d, dil, [0] * (2 * d))[flip]

        return receptive_fields(x, a.get("group", 1), kernel, out_shape, patches)

    def lipschitz_factor(self, node, weight_shape):
        """sqrt(prod k): every input element reaches k output positions per axis, each through
        one column of a patch, so sum_p |col_p|^2 <= prod(k) |x|^2 and |y| <= |M| sqrt(prod k) |x|."""
        return math.sqrt(math.prod(weight_shape[2:]))

    def nm_groups(self, node, weight_shape, m):
        """N:M groups run along input channels at each kernel position, as for Conv."""
        g = node_attrs(node).get("group", 1)
        return channel_groups(weight_shape[0] // g, math.prod(weight_shape[2:]), m)


def channel_groups(cg: int, k: int, m: int):
    """Groups of m input channels at one kernel position; columns are ordered (channel, position)."""
    if cg % m:
        return f"{cg} input channels per group do not divide into groups of {m}"
    channels = np.arange(cg).reshape(-1, m)
    return (channels[:, None, :] * k + np.arange(k)[None, :, None]).reshape(-1, m)


def contiguous_groups(cols: int, m: int):
    if cols % m:
        return f"reduction size {cols} does not divide into groups of {m}"
    return np.arange(cols).reshape(-1, m)


ADAPTERS = {a.op: a for a in (Gemm(), MatMul(), Conv(), ConvTranspose())}

# Ops that carry weights we could in principle prune, so inspect() explains why it leaves them.
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger",
                "QLinearConv", "QLinearMatMul"}
# Ops that carry weights we do not prune yet; listed as skipped only when they hold a constant, so a
# user sees every weight the tool left alone (an Einsum of two activations holds none).
UNSUPPORTED_WEIGHTED = {"LSTM": "recurrent layer (LSTM) is not supported yet",
                        "GRU": "recurrent layer (GRU) is not supported yet",
                        "RNN": "recurrent layer (RNN) is not supported yet",
                        "Einsum": "Einsum is not supported yet; export the layer as MatMul or Gemm"}


def unfold(adapter, node, x, weight_shape) -> Iterator[np.ndarray]:
    """Columns [groups, n, cols] of one input batch, in chunks of bounded size.

    float64 inputs give float64 columns, any other float type float32 ones (no rounding either
    way: the accumulator decides the precision of the products). Chunks may be views of x, or
    Fortran-ordered per group (conv); treat them as read-only.

    Inputs gathered from Loop/Scan iterations arrive stacked with extra leading axes; those are
    more samples, so they are merged into the op's own sample axis first.
    """
    if x.size == 0:
        return iter(())
    if not np.isfinite(x).all():  # one NaN would poison the whole Hessian, then every weight
        raise LobsError(f"layer {node.name or node.op_type}: its input contains NaN or Inf on the calibration data")
    rank = INPUT_RANK.get(adapter.op, lambda shape: None)(weight_shape)
    if rank is not None and x.ndim > rank:
        x = x.reshape((-1,) + x.shape[x.ndim - rank + 1:])
    return adapter.unfold(node, x, weight_shape)


# The rank each op's activation input has (None: any rank, leading axes are samples).
# (Gemm merges its own leading axes: with transA its samples are the last axis.)
INPUT_RANK = {"Conv": len, "ConvTranspose": len}
