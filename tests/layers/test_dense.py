"""Gemm and MatMul: their cases for the contract (test_contract.py) and the checks only a dense
op has: which C is a per-unit bias, the Lipschitz factor, dtypes and chunking of the columns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from onnx_lobs import layers
from onnx_lobs.layers import ADAPTERS, node_attrs, unfold

from .cases import LayerCase
from .refs import (
    F64_TOL, HESS_RTOL, build_model, columns, hessian_from_chunks, ref_gemm_patches, ref_hessian,
    ref_matmul_patches, rel_fro, run_model)

# (id, x_shape, w_shape, attrs, c_shape or None)
GEMM_CASES = [
    ("transB0", (5, 4), (4, 3), {}, None),
    ("transB1-biasN", (5, 4), (3, 4), dict(transB=1), (3,)),
    ("transB0-bias1N-alpha-beta", (6, 4), (4, 3), dict(alpha=0.5, beta=2.0), (1, 3)),
    ("transB1-neg-alpha-beta", (5, 3), (4, 3), dict(transB=1, alpha=-1.5, beta=0.3), (4,)),
    ("transA1-transB1", (4, 6), (3, 4), dict(transA=1, transB=1), (3,)),
    ("transA1-transB0-alpha", (4, 5), (4, 2), dict(transA=1, alpha=2.0, beta=-0.7), (1, 2)),
    ("beta0", (5, 4), (4, 3), dict(beta=0.0), (3,)),  # C is ignored by the op and by bias_vector
]

# (id, x_shape, w_shape)
MATMUL_CASES = [
    ("rank2", (5, 4), (4, 3)),
    ("rank3", (2, 3, 4), (4, 5)),
    ("rank4", (2, 2, 3, 4), (4, 3)),
]


def _gemm_reference(x, w_shape, attrs):
    patches = ref_gemm_patches(x, attrs)
    return patches, (patches.shape[1], w_shape[0] if attrs.get("transB", 0) else w_shape[1])


def _matmul_reference(x, w_shape, attrs):
    return ref_matmul_patches(x), tuple(x.shape[:-1]) + (w_shape[1],)


def _gemm_case(name, x_shape, w_shape, attrs, c_shape):
    # with transA=1 the features are x's first axis: not the channels the structured members take
    return LayerCase("Gemm", name, x_shape, w_shape, attrs, c_shape, _gemm_reference, dtype=np.float64,
                     op_tol=F64_TOL, column_rtol=1e-15, bias_rtol=1e-15, bias_ignored=attrs.get("beta") == 0,
                     out_axis=-1, in_axis=None if attrs.get("transA", 0) else -1,
                     structural=name != "beta0")


CASES = [_gemm_case(*c) for c in GEMM_CASES] + [
    LayerCase("MatMul", name, x_shape, w_shape, {}, None, _matmul_reference, dtype=np.float64, op_tol=F64_TOL,
              out_axis=-1, in_axis=-1, structural=True)
    for name, x_shape, w_shape in MATMUL_CASES]


def test_gemm_bias_vector_rejects_non_per_unit_bias():
    adapter = ADAPTERS["Gemm"]
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], beta=2.0)
    rng = np.random.default_rng(3)
    assert adapter.bias_vector(node, rng.standard_normal((5, 3)), 3) is None  # full [M, N] matrix
    assert adapter.bias_vector(node, rng.standard_normal((3, 1)), 3) is None  # column, broadcast on N
    assert adapter.bias_vector(node, rng.standard_normal(()), 3) is None  # scalar
    assert adapter.bias_vector(node, rng.standard_normal((1, 1, 3)), 3) is None
    c = rng.standard_normal(3)
    np.testing.assert_array_equal(adapter.bias_vector(node, c, 3), 2.0 * c[None])


def test_dense_skip_reasons():
    assert ADAPTERS["Gemm"].skip_reason(helper.make_node("Gemm", ["a", "b"], ["y"]), (2, 3, 4)) is not None
    assert ADAPTERS["MatMul"].skip_reason(helper.make_node("MatMul", ["a", "b"], ["y"]), (2, 3, 4)) is not None


def test_empty_input_unfolds_to_nothing():
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    assert list(unfold(ADAPTERS["MatMul"], node, np.zeros((0, 4)), (4, 3))) == []


def test_dense_column_dtypes():
    """Columns keep float32 as it is (a view, nothing copied), widen narrower floats exactly,
    and take alpha in float64 (no float32 rounding)."""
    rng = np.random.default_rng(12)
    x32 = rng.standard_normal((6, 5)).astype(np.float32)
    gemm, matmul = ADAPTERS["Gemm"], ADAPTERS["MatMul"]
    node = helper.make_node("Gemm", ["x", "W"], ["y"])
    (cols,) = unfold(gemm, node, x32, (5, 3))
    assert cols.dtype == np.float32 and np.shares_memory(cols, x32)
    scaled = helper.make_node("Gemm", ["x", "W"], ["y"], alpha=0.3)
    (cols,) = unfold(gemm, scaled, x32, (5, 3))
    assert cols.dtype == np.float64
    np.testing.assert_array_equal(cols[0], node_attrs(scaled)["alpha"] * x32.astype(np.float64))
    (cols,) = unfold(matmul, helper.make_node("MatMul", ["x", "W"], ["y"]), x32, (5, 3))
    assert cols.dtype == np.float32 and np.shares_memory(cols, x32)
    (cols,) = unfold(matmul, helper.make_node("MatMul", ["x", "W"], ["y"]), x32.astype(np.float16), (5, 3))
    assert cols.dtype == np.float32
    np.testing.assert_array_equal(cols[0], x32.astype(np.float16).astype(np.float32))


def test_matmul_chunking_leaves_hessian_unchanged(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 7, 4)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    adapter = ADAPTERS["MatMul"]
    full_cols, n_full = columns(adapter, node, x, (4, 2))
    h_full, _ = hessian_from_chunks(adapter, node, x, (4, 2), False)
    assert n_full == 1
    for chunk_bytes in (1, 4 * 4 * 5):  # one row per chunk, then 5 rows (21 rows: a ragged tail)
        monkeypatch.setattr(layers.base, "CHUNK_BYTES", chunk_bytes)
        cols, n_chunks = columns(adapter, node, x, (4, 2))
        assert n_chunks == math.ceil(21 / max(1, chunk_bytes // 16))  # float32 rows of 4
        np.testing.assert_array_equal(cols, full_cols)
        h, n = hessian_from_chunks(adapter, node, x, (4, 2), False)
        assert n == 21
        assert rel_fro(h, h_full) <= 1e-13
        assert rel_fro(h, ref_hessian(ref_matmul_patches(x), False)) <= HESS_RTOL


# ----------------------------------------------------------------------------------------------
# lipschitz_factor


@pytest.mark.parametrize("alpha,trans_a", [(1.0, 0), (-2.5, 0), (0.3, 1)])
def test_gemm_lipschitz_factor(alpha, trans_a):
    rng = np.random.default_rng(11)
    w = rng.standard_normal((4, 3))
    x_shape = (4, 6) if trans_a else (6, 4)
    model = build_model("Gemm", w, x_shape, attrs=dict(alpha=alpha, transA=trans_a), dtype=np.float64)
    node = model.graph.node[0]
    adapter = ADAPTERS["Gemm"]
    factor = adapter.lipschitz_factor(node, w.shape)
    m = adapter.to_matrices(node, w)[0]
    bound = np.linalg.norm(m, 2) * factor
    for _ in range(10):
        x = rng.standard_normal(x_shape)
        assert np.linalg.norm(run_model(model, x)) <= bound * np.linalg.norm(x) * (1 + 1e-12)
    # the bound is attained by the top right-singular vector of the weight matrix
    top = np.linalg.svd(m)[2][0]
    x = np.zeros(x_shape)
    if trans_a:
        x[:, 0] = top
    else:
        x[0] = top
    assert np.linalg.norm(run_model(model, x)) == pytest.approx(bound, rel=1e-12)


def test_matmul_lipschitz_factor_is_one():
    assert ADAPTERS["MatMul"].lipschitz_factor(helper.make_node("MatMul", ["x", "W"], ["y"]), (4, 3)) == 1.0


# ----------------------------------------------------------------------------------------------
# stacked inputs (Loop/Scan iterations): extra leading axes are more samples


STACK_CASES = [
    ("Gemm", (3, 5, 4), (4, 3), dict(alpha=0.5)),
    ("Gemm", (2, 3, 5, 4), (3, 4), dict(transB=1)),
    ("Gemm", (3, 4, 5), (4, 3), dict(transA=1, alpha=2.0)),
    ("MatMul", (3, 2, 5, 4), (4, 3), {}),
]


@pytest.mark.parametrize("op,x_shape,w_shape,attrs", STACK_CASES,
                         ids=[f"{c[0]}-{len(c[1])}d-{i}" for i, c in enumerate(STACK_CASES)])
def test_dense_stacked_leading_axes_are_samples(op, x_shape, w_shape, attrs):
    """Gemm's input has rank 2 (so each leading index is one input); MatMul's slices are samples already."""
    rng = np.random.default_rng(len(x_shape) * 31 + len(attrs))
    x = rng.standard_normal(x_shape)
    node = helper.make_node(op, ["x", "W"], ["y"], **attrs)
    adapter = ADAPTERS[op]
    slices = [x[idx] for idx in np.ndindex(*x.shape[:x.ndim - 2])] if op == "Gemm" else [x]
    expect = np.concatenate([columns(adapter, node, s, w_shape)[0] for s in slices], axis=1)
    got, _ = columns(adapter, node, x, w_shape)
    geom = adapter.geometry(node, w_shape)
    assert got.shape == (geom.groups, expect.shape[1], geom.cols)
    np.testing.assert_array_equal(got, expect)
