"""ConvTranspose (1-D, 2-D, 3-D, grouped): the transposed conv seen as a conv of its
zero-inserted input, so its matrices and Hessian are that conv's.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Geometry, channel_groups, checked_keep, column_dtype, kept_per_group, node_attrs
from .conv import ConvFamily, conv_patches, receptive_fields


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


class ConvTranspose(ConvFamily):
    """Weight [C_in, C_out/g, k...]. Per group, rows = the group's output channels and columns =
    (input channel, kernel position), like Conv's im2col order. The op is the conv, with the
    kernel flipped, of the stride-dilated (zero-inserted) and padded input: the unfolded columns
    are that conv's receptive fields, read with the kernel axes reversed so that column
    (c, k) multiplies the stored weight W[c, o, k]. The Hessian is that conv's.
    """

    op = "ConvTranspose"
    axis0 = "input"

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

    def unfold(self, node, x, weight_shape):
        a, d, kernel, strides, dil = self.window(node, x.ndim - 2, weight_shape)
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



    def fan_in(self, node, weight_shape):
        # (the whole column count, channels times kernel positions, as before the adapters said)
        return self.geometry(node, weight_shape).cols

    def channels(self, node, weight_shape):
        return weight_shape[0], weight_shape[1] * node_attrs(node).get("group", 1)

    def drop_outputs(self, node, w, keep):
        g = node_attrs(node).get("group", 1)
        return w[:, kept_per_group(keep, w.shape[1] * g, g, self.op)[0]]

    def drop_inputs(self, node, w, keep):
        g = node_attrs(node).get("group", 1)
        return w[checked_keep(keep, w.shape[0], g, self.op)]


ADAPTERS = (ConvTranspose(),)
