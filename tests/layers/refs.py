"""Single-node models and brute-force references for the adapter tests.

The ref_* functions share no code with onnx_lobs.layers (a shared bug would hide itself);
columns() and hessian_from_chunks() drive the adapters under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnxruntime as ort
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnx_lobs.hessian import HessianAccumulator
from onnx_lobs.layers import unfold

from ..builders import make_model, single_layer, tensor, vi

HESS_RTOL = 1e-10  # the exact (float64) accumulator against the brute-force references
FAST_RTOL = 1e-6  # the default accumulator's float32 products against the same references
F32_TOL = 1e-4  # columns @ matrices against onnxruntime's float32 op
F64_TOL = 1e-11  # ... and against its float64 op


# ----------------------------------------------------------------------------------------------
# model building / running


def build_model(op, weight, x_shape, bias=None, attrs=None, dtype=np.float32, dynamic_spatial=False):
    """A single-node model x -> op(x, W[, B]) -> y (tests.builders.single_layer).

    dynamic_spatial makes every axis after the channel axis symbolic, so one session serves
    several input sizes.
    """
    attrs = attrs or {}
    if not dynamic_spatial:
        return single_layer(op, weight, x_shape, bias=bias, attrs=attrs, dtype=dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [tensor("W", weight.astype(dtype))]
    inputs = ["x", "W"]
    if bias is not None:
        inits.append(tensor("B", bias.astype(dtype)))
        inputs.append("B")
    node = helper.make_node(op, inputs, ["y"], name=f"{op.lower()}0", **attrs)
    in_dims = ["N", x_shape[1]] + [f"s{i}" for i in range(len(x_shape) - 2)]
    return make_model([node], [vi("x", elem, in_dims)], [vi("y", elem, [f"o{i}" for i in range(len(x_shape))])],
                      inits)


def ort_session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_model(model, x, evaluator="ort"):
    if evaluator == "ort":
        return ort_session(model).run(None, {"x": x})[0]
    # onnxruntime rejects auto_pad SAME_* with dilations != 1; the ONNX reference evaluator follows
    # the spec there.
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def columns(adapter, node, x, weight_shape):
    chunks = list(unfold(adapter, node, x, weight_shape))
    return np.concatenate(chunks, axis=1), len(chunks)


def hessian_from_chunks(adapter, node, x, weight_shape, bias, exact=True):
    g = adapter.geometry(node, weight_shape)
    acc = HessianAccumulator(g.groups, g.cols, bias, exact=exact)
    for c in unfold(adapter, node, x, weight_shape):
        acc.add(c)
    return acc.hessian(), acc.n


def rel_fro(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def assert_op_close(got, ref, tol):
    scale = max(1.0, float(np.max(np.abs(ref))))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------------------------
# brute-force references (explicit loops; no np.pad / sliding_window_view)


def ref_pads(auto_pad, pads, spatial, kernel, strides, dilations):
    """ONNX Conv spec: SAME_* -> out = ceil(in / s), total = (out-1)*s + (k-1)*d + 1 - in."""
    d = len(spatial)
    if auto_pad in ("NOTSET", ""):
        p = list(pads) if pads is not None else [0] * (2 * d)
        return p[:d], p[d:]
    if auto_pad == "VALID":
        return [0] * d, [0] * d
    begin, end = [], []
    for i in range(d):
        out = math.ceil(spatial[i] / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
        if auto_pad == "SAME_UPPER":  # the odd pixel goes at the end
            b = total // 2
        else:  # SAME_LOWER: the odd pixel goes at the beginning
            b = total - total // 2
        begin.append(b)
        end.append(total - b)
    return begin, end


def conv_params(x_shape, w_shape, attrs):
    d = len(x_shape) - 2
    auto = attrs.get("auto_pad", "NOTSET")
    strides = list(attrs.get("strides", [1] * d))
    dil = list(attrs.get("dilations", [1] * d))
    kernel = list(w_shape[2:])
    pb, pe = ref_pads(auto, attrs.get("pads"), list(x_shape[2:]), kernel, strides, dil)
    out = [(x_shape[2 + i] + pb[i] + pe[i] - ((kernel[i] - 1) * dil[i] + 1)) // strides[i] + 1 for i in range(d)]
    return kernel, strides, dil, pb, pe, out


def ref_conv_patches(x, w_shape, attrs):
    """[groups, N * positions, C/g * prod(kernel)] by explicit index arithmetic and bounds checks."""
    n_samples, channels = x.shape[:2]
    spatial = x.shape[2:]
    d = len(spatial)
    g = attrs.get("group", 1)
    cg = channels // g
    assert w_shape[1] == cg
    kernel, strides, dil, pb, _, out = conv_params(x.shape, w_shape, attrs)
    groups = [[] for _ in range(g)]
    for n in range(n_samples):
        for pos in itertools.product(*[range(o) for o in out]):
            for gi in range(g):
                patch = []
                for c in range(cg):
                    for off in itertools.product(*[range(k) for k in kernel]):
                        idx = [pos[i] * strides[i] - pb[i] + off[i] * dil[i] for i in range(d)]
                        inside = all(0 <= idx[i] < spatial[i] for i in range(d))
                        patch.append(float(x[(n, gi * cg + c) + tuple(idx)]) if inside else 0.0)
                groups[gi].append(patch)
    return np.array(groups, dtype=np.float64), out


def ref_gemm_patches(x, attrs):
    """[1, M, K]: row m is alpha * A[m, :] where A = x (transA=0) or x^T (transA=1)."""
    alpha = attrs.get("alpha", 1.0)
    trans_a = attrs.get("transA", 0)
    m_rows = x.shape[1] if trans_a else x.shape[0]
    k_cols = x.shape[0] if trans_a else x.shape[1]
    rows = []
    for m in range(m_rows):
        rows.append([alpha * float(x[k, m] if trans_a else x[m, k]) for k in range(k_cols)])
    return np.array([rows], dtype=np.float64)


def ref_matmul_patches(x):
    """[1, prod(leading), K]: every leading index of x is one sample."""
    k_cols = x.shape[-1]
    rows = []
    for idx in np.ndindex(*x.shape[:-1]):
        rows.append([float(x[idx + (k,)]) for k in range(k_cols)])
    return np.array([rows], dtype=np.float64)


def ref_hessian(patches, bias):
    """mean over patches of v v^T, v = patch (+ trailing 1 with bias), by an explicit loop."""
    g, n, c = patches.shape
    size = c + 1 if bias else c
    h = np.zeros((g, size, size))
    for gi in range(g):
        for r in range(n):
            v = np.empty(size)
            for j in range(c):
                v[j] = patches[gi, r, j]
            if bias:
                v[c] = 1.0
            h[gi] += np.outer(v, v)
    return h / n


# ----------------------------------------------------------------------------------------------
# ConvTranspose by its definition (every input element scatters W[c, :, k] * x into the output)


def ref_ct_layout(x_shape, w_shape, attrs):
    """Per axis (begin crop, output size): the spec's formulas, with onnxruntime's clamp of the
    total crop at 0 for output_shape and SAME_* (the spec's SAME target in*s is then not met)."""
    spatial, kernel = x_shape[2:], w_shape[2:]
    d = len(spatial)
    s = attrs.get("strides", [1] * d)
    dil = attrs.get("dilations", [1] * d)
    extra = attrs.get("output_padding", [0] * d)
    pads = attrs.get("pads", [0] * (2 * d))
    auto = attrs.get("auto_pad", "NOTSET")
    shape = attrs.get("output_shape")
    begin, out = [], []
    for i in range(d):
        full = s[i] * (spatial[i] - 1) + extra[i] + (kernel[i] - 1) * dil[i] + 1
        if shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
            target = shape[i] if shape is not None else spatial[i] * s[i]
            total = max(0, full - target)
            b = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(b)
            out.append(target if shape is not None else full - total)
        elif auto == "VALID":
            begin.append(0)
            out.append(full)
        else:
            begin.append(pads[i])
            out.append(full - pads[i] - pads[i + d])
    return begin, out


def ref_ct_output(x, w, b, attrs):
    """The op by its definition: y[n, g*Cog + o, i*s + k*d - begin] += x[n, g*Cig + c, i] W[g*Cig + c, o, k]."""
    g = attrs.get("group", 1)
    d = x.ndim - 2
    cig, cog = w.shape[0] // g, w.shape[1]
    s = attrs.get("strides", [1] * d)
    dil = attrs.get("dilations", [1] * d)
    begin, out = ref_ct_layout(x.shape, w.shape, attrs)
    y = np.zeros((x.shape[0], g * cog) + tuple(out))
    for n in range(x.shape[0]):
        for ci in range(x.shape[1]):
            gi = ci // cig
            for i in itertools.product(*[range(v) for v in x.shape[2:]]):
                for k in itertools.product(*[range(v) for v in w.shape[2:]]):
                    p = [i[a] * s[a] + k[a] * dil[a] - begin[a] for a in range(d)]
                    if all(0 <= p[a] < out[a] for a in range(d)):
                        for o in range(cog):
                            y[(n, gi * cog + o) + tuple(p)] += float(x[(n, ci) + i]) * float(w[(ci, o) + k])
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, -1) + (1,) * d)
    return y


def ref_ct_patches(x, w_shape, attrs):
    """[groups, N * positions, Cig * prod(k)]: column (c, k) of output position p holds the input
    element that W[c, :, k] carries to p, x[c, (p + begin - k*d) / s] when that is a whole index
    inside x, else 0. Explicit loops and divisibility checks; no zero-inserted array."""
    g = attrs.get("group", 1)
    d = x.ndim - 2
    cig = w_shape[0] // g
    s = attrs.get("strides", [1] * d)
    dil = attrs.get("dilations", [1] * d)
    begin, out = ref_ct_layout(x.shape, w_shape, attrs)
    groups = [[] for _ in range(g)]
    for n in range(x.shape[0]):
        for p in itertools.product(*[range(o) for o in out]):
            for gi in range(g):
                patch = []
                for c in range(cig):
                    for k in itertools.product(*[range(v) for v in w_shape[2:]]):
                        num = [p[a] + begin[a] - k[a] * dil[a] for a in range(d)]
                        if all(num[a] % s[a] == 0 and 0 <= num[a] // s[a] < x.shape[2 + a] for a in range(d)):
                            patch.append(float(x[(n, gi * cig + c) + tuple(num[a] // s[a] for a in range(d))]))
                        else:
                            patch.append(0.0)
                groups[gi].append(patch)
    return np.array(groups, dtype=np.float64), out


def case_ids(cases):
    return [c[0] for c in cases]


def case_rng(name):
    return np.random.default_rng(sum(map(ord, name)) + 12345)


def conv_operator(model, in_shape):
    """Dense matrix of the (bias-free) conv as a linear map, from onnxruntime on one-hot inputs."""
    n_in = math.prod(in_shape)
    basis = np.eye(n_in, dtype=np.float32).reshape((n_in,) + tuple(in_shape))
    y = run_model(model, basis).astype(np.float64)
    return y.reshape(n_in, -1).T
