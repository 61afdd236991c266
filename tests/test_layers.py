"""Adapters (im2col / matrix views) checked against onnxruntime and slow brute-force references.

For every case the unfolded columns and weight matrices must reproduce the op as onnxruntime
computes it on a single-node model, and the Hessian accumulated from those columns must equal one
built by explicit Python loops over samples, output positions and kernel offsets (padding by bounds
checks only; tests/layer_refs.py). ConvTranspose has its own file.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from onnx_lobs import layers
from onnx_lobs.layers import ADAPTERS, conv_pads, node_attrs, unfold
from tests.layer_refs import (
    FAST_RTOL, HESS_RTOL, assert_op_close, build_model, case_ids, case_rng, columns, conv_operator,
    conv_params, hessian_from_chunks, ort_session, ref_conv_patches, ref_gemm_patches, ref_hessian,
    ref_matmul_patches, ref_pads, rel_fro, run_model)



# ----------------------------------------------------------------------------------------------
# cases

# (id, x_shape, w_shape, attrs, with_bias)
CONV_CASES = [
    ("1d", (2, 3, 9), (4, 3, 3), {}, True),
    ("1d-stride-dil-pads", (2, 3, 11), (4, 3, 3), dict(strides=[2], dilations=[2], pads=[1, 2]), False),
    ("1d-k1", (3, 2, 5), (3, 2, 1), {}, True),
    ("2d", (2, 3, 7, 6), (5, 3, 3, 2), {}, True),
    ("2d-strides", (2, 2, 9, 8), (4, 2, 3, 3), dict(strides=[2, 3]), False),
    ("2d-dil-asym-pads", (2, 2, 8, 7), (3, 2, 3, 2), dict(dilations=[2, 1], pads=[1, 0, 2, 3]), True),
    ("2d-pads-big-stride", (2, 2, 7, 7), (3, 2, 2, 3), dict(strides=[3, 2], pads=[2, 1, 0, 2]), True),
    ("2d-notset-explicit", (2, 2, 6, 6), (3, 2, 3, 3), dict(auto_pad="NOTSET", pads=[1, 1, 1, 1]), False),
    ("2d-kernel_shape-attr", (2, 2, 6, 5), (3, 2, 3, 2), dict(kernel_shape=[3, 2], pads=[0, 1, 0, 1]), True),
    ("2d-valid", (2, 3, 8, 7), (4, 3, 3, 3), dict(auto_pad="VALID", strides=[2, 2]), True),
    # total pad odd along both axes (7 - 1 + 2 - 7 = 1 and 6 - 1 + 4 - 6 = 3): UPPER and LOWER differ
    ("2d-same-upper-odd", (2, 2, 7, 6), (3, 2, 2, 4), dict(auto_pad="SAME_UPPER"), True),
    ("2d-same-lower-odd", (2, 2, 7, 6), (3, 2, 2, 4), dict(auto_pad="SAME_LOWER"), True),
    # even total along axis 0 (2), odd along axis 1 (1), with strides
    ("2d-same-upper-stride", (2, 2, 7, 8), (3, 2, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2]), False),
    ("2d-same-lower-stride", (2, 2, 7, 8), (3, 2, 3, 3), dict(auto_pad="SAME_LOWER", strides=[2, 2]), False),
    # even sizes, even kernel: total = 1 (odd)
    ("2d-same-upper-even", (1, 2, 6, 6), (2, 2, 2, 2), dict(auto_pad="SAME_UPPER"), False),
    ("2d-same-lower-even", (1, 2, 6, 6), (2, 2, 2, 2), dict(auto_pad="SAME_LOWER"), False),
    # stride > kernel: the spec's total is negative, no padding at all
    ("1d-same-upper-neg", (2, 2, 5), (2, 2, 1), dict(auto_pad="SAME_UPPER", strides=[3]), True),
    ("1d-same-lower-neg", (2, 2, 5), (2, 2, 1), dict(auto_pad="SAME_LOWER", strides=[3]), True),
    # SAME_* with dilation (onnxruntime refuses it: checked with the ONNX reference evaluator)
    ("1d-same-upper-dil", (2, 2, 8), (2, 2, 2), dict(auto_pad="SAME_UPPER", strides=[3], dilations=[2]), True),
    ("1d-same-lower-dil", (2, 2, 8), (2, 2, 2), dict(auto_pad="SAME_LOWER", strides=[3], dilations=[2]), True),
    ("2d-groups2", (2, 4, 6, 6), (6, 2, 3, 3), dict(group=2, pads=[1, 0, 0, 1]), True),
    ("2d-groups2-nobias", (2, 4, 5, 6), (4, 2, 2, 3), dict(group=2, strides=[2, 1]), False),
    ("2d-depthwise", (2, 3, 6, 5), (3, 1, 3, 3), dict(group=3, pads=[1, 1, 1, 1]), True),
    ("2d-depthwise-x2", (2, 3, 7, 6), (6, 1, 3, 3), dict(group=3, strides=[2, 2]), False),
    ("2d-depthwise-x2-same", (2, 3, 7, 6), (6, 1, 3, 2), dict(group=3, auto_pad="SAME_LOWER"), True),
    ("3d", (2, 2, 4, 5, 4), (3, 2, 2, 3, 2), dict(pads=[1, 0, 0, 0, 1, 1], strides=[1, 2, 1]), True),
    ("3d-groups-dil", (1, 4, 5, 5, 4), (4, 2, 2, 2, 2), dict(group=2, dilations=[2, 1, 2]), False),
    ("3d-same-lower", (1, 2, 3, 4, 5), (2, 2, 2, 2, 2), dict(auto_pad="SAME_LOWER", strides=[1, 2, 2]), True),
]

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


def _conv_setup(case):
    name, x_shape, w_shape, attrs, with_bias = case
    rng = case_rng(name)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32) if with_bias else None
    model = build_model("Conv", w, x_shape, bias=b, attrs=attrs)
    return x, w, b, model, model.graph.node[0]


def _gemm_setup(case):
    name, x_shape, w_shape, attrs, c_shape = case
    rng = case_rng(name)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    c = rng.standard_normal(c_shape) if c_shape is not None else None
    model = build_model("Gemm", w, x_shape, bias=c, attrs=attrs, dtype=np.float64)
    return x, w, c, model, model.graph.node[0]


def _matmul_setup(case):
    name, x_shape, w_shape = case
    rng = case_rng(name)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    model = build_model("MatMul", w, x_shape, dtype=np.float64)
    return x, w, model, model.graph.node[0]


def _needs_reference_evaluator(attrs):
    auto = attrs.get("auto_pad", "NOTSET")
    return auto.startswith("SAME") and any(d != 1 for d in attrs.get("dilations", []))


# ----------------------------------------------------------------------------------------------
# Conv


@pytest.mark.parametrize("case", CONV_CASES, ids=case_ids(CONV_CASES))
def test_conv_columns_reproduce_op(case):
    _, x_shape, w_shape, attrs, _ = case
    x, w, b, model, node = _conv_setup(case)
    adapter = ADAPTERS["Conv"]
    assert adapter.skip_reason(node, w.shape) is None
    geom = adapter.geometry(node, w.shape)
    cols, _ = columns(adapter, node, x, w.shape)
    mats = adapter.to_matrices(node, w.astype(np.float64))
    assert mats.shape == (geom.groups, geom.rows, geom.cols)
    assert cols.shape[0] == geom.groups and cols.shape[2] == geom.cols
    assert cols.dtype == np.float32  # float32 input: the columns are its values, not rounded

    evaluator = "reference" if _needs_reference_evaluator(attrs) else "ort"
    y = run_model(model, x, evaluator).astype(np.float64)
    out_spatial = y.shape[2:]
    assert cols.shape[1] == x.shape[0] * math.prod(out_spatial)

    bvec = adapter.bias_vector(node, b, geom.rows * geom.groups) if b is not None else None
    if b is not None:
        assert bvec.shape == (geom.groups, geom.rows)
    for g in range(geom.groups):
        got = cols[g] @ mats[g].T
        if bvec is not None:
            got = got + bvec[g]
        ref = np.moveaxis(y[:, g * geom.rows:(g + 1) * geom.rows], 1, -1).reshape(-1, geom.rows)
        assert_op_close(got, ref, np.float32)

    # the columns are exactly the hand-extracted receptive fields, in (sample, position) order
    patches, out = ref_conv_patches(x, w_shape, attrs)
    assert tuple(out) == tuple(out_spatial)
    np.testing.assert_array_equal(cols, patches)


@pytest.mark.parametrize("case", CONV_CASES, ids=case_ids(CONV_CASES))
def test_conv_hessian_matches_loops(case):
    _, _, w_shape, attrs, with_bias = case
    x, w, b, _, node = _conv_setup(case)
    adapter = ADAPTERS["Conv"]
    h, n = hessian_from_chunks(adapter, node, x, w.shape, with_bias)
    patches, out = ref_conv_patches(x, w_shape, attrs)
    ref = ref_hessian(patches, with_bias)
    assert n == x.shape[0] * math.prod(out)
    assert h.shape == ref.shape
    assert rel_fro(h, ref) <= HESS_RTOL
    h_fast, _ = hessian_from_chunks(adapter, node, x, w.shape, with_bias, exact=False)
    assert rel_fro(h_fast, ref) <= FAST_RTOL


@pytest.mark.parametrize("case", CONV_CASES, ids=case_ids(CONV_CASES))
def test_conv_round_trips(case):
    x, w, b, _, node = _conv_setup(case)
    adapter = ADAPTERS["Conv"]
    for arr in (w, w.astype(np.float64)):
        back = adapter.from_matrices(node, adapter.to_matrices(node, arr), arr)
        assert back.shape == arr.shape and back.dtype == arr.dtype
        np.testing.assert_array_equal(back, arr)
    if b is not None:
        geom = adapter.geometry(node, w.shape)
        bvec = adapter.bias_vector(node, b, geom.rows * geom.groups)
        back = adapter.bias_from_vector(node, bvec, b)
        assert back.shape == b.shape
        np.testing.assert_array_equal(back, b)


def test_same_upper_and_lower_really_differ():
    """Guard on the case list: the odd-total SAME cases must give different pads and outputs."""
    by_id = {c[0]: c for c in CONV_CASES}
    for pair in (("2d-same-upper-odd", "2d-same-lower-odd"), ("2d-same-upper-even", "2d-same-lower-even")):
        up, lo = by_id[pair[0]], by_id[pair[1]]
        assert conv_params(up[1], up[2], up[3])[3] != conv_params(lo[1], lo[2], lo[3])[3]
        x, w, b, model_u, _ = _conv_setup(up)
        model_l = build_model("Conv", w, x.shape, bias=b, attrs=lo[3])
        assert not np.allclose(run_model(model_u, x), run_model(model_l, x))


# ----------------------------------------------------------------------------------------------
# Gemm


@pytest.mark.parametrize("case", GEMM_CASES, ids=case_ids(GEMM_CASES))
def test_gemm_columns_reproduce_op(case):
    x, w, c, model, node = _gemm_setup(case)
    adapter = ADAPTERS["Gemm"]
    assert adapter.skip_reason(node, w.shape) is None
    geom = adapter.geometry(node, w.shape)
    cols, _ = columns(adapter, node, x, w.shape)
    mats = adapter.to_matrices(node, w)
    assert mats.shape == (1, geom.rows, geom.cols)
    y = run_model(model, x)
    got = cols[0] @ mats[0].T
    bvec = adapter.bias_vector(node, c, geom.rows) if c is not None else None
    if node_attrs(node).get("beta", 1.0) == 0:
        assert bvec is None
    elif c is not None:
        assert bvec.shape == (1, geom.rows)
    if bvec is not None:
        got = got + bvec[0]
    assert got.shape == y.shape
    assert_op_close(got, y, np.float64)
    np.testing.assert_allclose(cols, ref_gemm_patches(x, node_attrs(node)), rtol=1e-15, atol=0)


@pytest.mark.parametrize("case", GEMM_CASES, ids=case_ids(GEMM_CASES))
def test_gemm_hessian_matches_loops(case):
    x, w, c, _, node = _gemm_setup(case)
    adapter = ADAPTERS["Gemm"]
    geom = adapter.geometry(node, w.shape)
    bias = c is not None and adapter.bias_vector(node, c, geom.rows) is not None
    h, n = hessian_from_chunks(adapter, node, x, w.shape, bias)
    ref = ref_hessian(ref_gemm_patches(x, node_attrs(node)), bias)
    assert n == ref_gemm_patches(x, node_attrs(node)).shape[1]
    assert rel_fro(h, ref) <= HESS_RTOL


@pytest.mark.parametrize("case", GEMM_CASES, ids=case_ids(GEMM_CASES))
def test_gemm_round_trips(case):
    x, w, c, _, node = _gemm_setup(case)
    adapter = ADAPTERS["Gemm"]
    for arr in (w, w.astype(np.float32)):
        back = adapter.from_matrices(node, adapter.to_matrices(node, arr), arr)
        assert back.shape == arr.shape and back.dtype == arr.dtype
        np.testing.assert_array_equal(back, arr)
    if c is not None:
        bvec = adapter.bias_vector(node, c, adapter.geometry(node, w.shape).rows)
        if bvec is not None:
            back = adapter.bias_from_vector(node, bvec, c)
            assert back.shape == c.shape
            np.testing.assert_allclose(back, c, rtol=1e-15, atol=0)


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


# ----------------------------------------------------------------------------------------------
# MatMul


@pytest.mark.parametrize("case", MATMUL_CASES, ids=case_ids(MATMUL_CASES))
def test_matmul_columns_reproduce_op(case):
    x, w, model, node = _matmul_setup(case)
    adapter = ADAPTERS["MatMul"]
    assert adapter.skip_reason(node, w.shape) is None
    geom = adapter.geometry(node, w.shape)
    cols, _ = columns(adapter, node, x, w.shape)
    mats = adapter.to_matrices(node, w)
    assert mats.shape == (1, geom.rows, geom.cols)
    assert adapter.bias_vector(node, np.zeros(geom.rows), geom.rows) is None
    y = run_model(model, x)
    assert y.shape == x.shape[:-1] + (w.shape[1],)
    assert_op_close(cols[0] @ mats[0].T, y.reshape(-1, geom.rows), np.float64)
    np.testing.assert_array_equal(cols, ref_matmul_patches(x))


@pytest.mark.parametrize("case", MATMUL_CASES, ids=case_ids(MATMUL_CASES))
def test_matmul_hessian_matches_loops(case):
    x, w, _, node = _matmul_setup(case)
    adapter = ADAPTERS["MatMul"]
    h, n = hessian_from_chunks(adapter, node, x, w.shape, False)
    assert n == math.prod(x.shape[:-1])
    assert rel_fro(h, ref_hessian(ref_matmul_patches(x), False)) <= HESS_RTOL


@pytest.mark.parametrize("case", MATMUL_CASES, ids=case_ids(MATMUL_CASES))
def test_matmul_round_trips(case):
    x, w, _, node = _matmul_setup(case)
    adapter = ADAPTERS["MatMul"]
    for arr in (w, w.astype(np.float32)):
        back = adapter.from_matrices(node, adapter.to_matrices(node, arr), arr)
        assert back.shape == arr.shape and back.dtype == arr.dtype
        np.testing.assert_array_equal(back, arr)


def test_skip_reasons():
    assert ADAPTERS["Gemm"].skip_reason(helper.make_node("Gemm", ["a", "b"], ["y"]), (2, 3, 4)) is not None
    assert ADAPTERS["MatMul"].skip_reason(helper.make_node("MatMul", ["a", "b"], ["y"]), (2, 3, 4)) is not None
    conv = ADAPTERS["Conv"]
    assert conv.skip_reason(helper.make_node("Conv", ["a", "b"], ["y"]), (4, 3)) is not None
    assert conv.skip_reason(helper.make_node("Conv", ["a", "b"], ["y"], group=3), (4, 1, 3, 3)) is not None
    assert conv.skip_reason(helper.make_node("Conv", ["a", "b"], ["y"], group=2), (4, 1, 3, 3)) is None


def test_empty_input_unfolds_to_nothing():
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    assert list(unfold(ADAPTERS["MatMul"], node, np.zeros((0, 4)), (4, 3))) == []


# ----------------------------------------------------------------------------------------------
# chunking


@pytest.mark.parametrize("case", [CONV_CASES[3], CONV_CASES[20], CONV_CASES[25]], ids=lambda c: c[0])
def test_conv_chunking_leaves_hessian_unchanged(case, monkeypatch):
    _, x_shape, w_shape, attrs, with_bias = case
    rng = case_rng("chunk" + case[0])
    x = rng.standard_normal((5,) + tuple(x_shape[1:])).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], **attrs)
    adapter = ADAPTERS["Conv"]
    full_cols, n_full = columns(adapter, node, x, w_shape)
    h_full, _ = hessian_from_chunks(adapter, node, x, w_shape, with_bias)
    assert n_full == 1
    g, rows, c = full_cols.shape
    lines = conv_params(x.shape, w_shape, attrs)[5][0]  # output positions along the first axis
    per_sample, per_line = rows // 5, rows // 5 // lines
    row_bytes = 4 * g * c  # float32 columns
    settings = [
        (dict(CHUNK_BYTES=row_bytes * 2 * per_sample + 7), 3),  # two samples a chunk (ragged tail)
        (dict(CHUNK_ROWS=2 * per_sample + 1), 3),  # the same, bounded by rows
        (dict(CHUNK_BYTES=1), 5 * lines),  # less than a sample: one output line a chunk
        (dict(CHUNK_ROWS=2 * per_line), 5 * math.ceil(lines / 2)),  # two lines a chunk
    ]
    for patch, expect in settings:
        with monkeypatch.context() as m:
            for name, value in patch.items():
                m.setattr(layers, name, value)
            chunks = list(unfold(adapter, node, x, w_shape))
            assert len(chunks) == expect
            assert all(ch.dtype == np.float32 and ch.shape[0] == g and ch.shape[2] == c for ch in chunks)
            np.testing.assert_array_equal(np.concatenate(chunks, axis=1), full_cols)
            for exact, tol in ((True, HESS_RTOL), (False, FAST_RTOL)):
                h, n = hessian_from_chunks(adapter, node, x, w_shape, with_bias, exact=exact)
                assert n == full_cols.shape[1]
                assert rel_fro(h, h_full) <= (1e-13 if exact else tol)
                assert rel_fro(h, ref_hessian(ref_conv_patches(x, w_shape, attrs)[0], with_bias)) <= tol


def test_column_dtypes_and_layouts():
    """Columns keep float32 and float64 as they are and widen narrower floats to float32 exactly;
    nothing is copied that need not be, and conv chunks are Fortran-ordered per group (what the
    accumulator's syrk reads in place)."""
    rng = np.random.default_rng(12)
    x32 = rng.standard_normal((6, 5)).astype(np.float32)
    gemm, matmul = ADAPTERS["Gemm"], ADAPTERS["MatMul"]
    node = helper.make_node("Gemm", ["x", "W"], ["y"])
    (cols,) = unfold(gemm, node, x32, (5, 3))
    assert cols.dtype == np.float32 and np.shares_memory(cols, x32)
    scaled = helper.make_node("Gemm", ["x", "W"], ["y"], alpha=0.3)
    (cols,) = unfold(gemm, scaled, x32, (5, 3))  # alpha applied in float64: no float32 rounding
    assert cols.dtype == np.float64
    np.testing.assert_array_equal(cols[0], node_attrs(scaled)["alpha"] * x32.astype(np.float64))
    (cols,) = unfold(matmul, helper.make_node("MatMul", ["x", "W"], ["y"]), x32, (5, 3))
    assert cols.dtype == np.float32 and np.shares_memory(cols, x32)
    (cols,) = unfold(matmul, helper.make_node("MatMul", ["x", "W"], ["y"]), x32.astype(np.float16), (5, 3))
    assert cols.dtype == np.float32
    np.testing.assert_array_equal(cols[0], x32.astype(np.float16).astype(np.float32))
    conv = ADAPTERS["Conv"]
    xc = rng.standard_normal((3, 4, 6, 5)).astype(np.float16)
    cnode = helper.make_node("Conv", ["x", "W"], ["y"], group=2, pads=[1, 1, 1, 1])
    chunks = list(unfold(conv, cnode, xc, (4, 2, 3, 3)))
    assert all(c.dtype == np.float32 and all(c[g].flags.f_contiguous for g in range(2)) for c in chunks)
    ref = ref_conv_patches(xc.astype(np.float32), (4, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1]))[0]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), ref)
    assert list(unfold(conv, cnode, xc.astype(np.float64), (4, 2, 3, 3)))[0].dtype == np.float64


def test_matmul_chunking_leaves_hessian_unchanged(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 7, 4)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    adapter = ADAPTERS["MatMul"]
    full_cols, n_full = columns(adapter, node, x, (4, 2))
    h_full, _ = hessian_from_chunks(adapter, node, x, (4, 2), False)
    assert n_full == 1
    for chunk_bytes in (1, 4 * 4 * 5):  # one row per chunk, then 5 rows (21 rows: a ragged tail)
        monkeypatch.setattr(layers, "CHUNK_BYTES", chunk_bytes)
        cols, n_chunks = columns(adapter, node, x, (4, 2))
        assert n_chunks == math.ceil(21 / max(1, chunk_bytes // 16))  # float32 rows of 4
        np.testing.assert_array_equal(cols, full_cols)
        h, n = hessian_from_chunks(adapter, node, x, (4, 2), False)
        assert n == 21
        assert rel_fro(h, h_full) <= 1e-13
        assert rel_fro(h, ref_hessian(ref_matmul_patches(x), False)) <= HESS_RTOL


# ----------------------------------------------------------------------------------------------
# conv_pads


def _pad_cases():
    cases = []
    for auto in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        for k in (1, 2, 3, 4):
            for s in (1, 2, 3):
                cases.append((auto, k, s))
    return cases


@pytest.mark.parametrize("auto,k,s", _pad_cases())
def test_conv_pads_against_spec_and_onnxruntime(auto, k, s):
    """For every input length 1..9: conv_pads equals the spec's formula, the unfold has as many
    positions as onnxruntime has outputs, and the conv values agree."""
    rng = np.random.default_rng(100 * k + s)
    w = rng.standard_normal((2, 1, k)).astype(np.float32)
    attrs = dict(auto_pad=auto, strides=[s])
    explicit = [1, 2] if auto == "NOTSET" else None
    if explicit:
        attrs["pads"] = explicit
    model = build_model("Conv", w, (1, 1, 9), attrs=attrs, dynamic_spatial=True)
    node = model.graph.node[0]
    a = node_attrs(node)
    sess = ort_session(model)
    adapter = ADAPTERS["Conv"]
    mats = adapter.to_matrices(node, w.astype(np.float64))
    for size in range(1, 10):
        pb, pe = ref_pads(auto, explicit, [size], [k], [s], [1])
        if size + pb[0] + pe[0] < k:
            continue  # no output position at all (VALID/NOTSET with a too-short input)
        assert conv_pads(a, (size,), (k,)) == pb + pe
        x = rng.standard_normal((2, 1, size)).astype(np.float32)
        y = sess.run(None, {"x": x})[0]
        if auto.startswith("SAME"):
            assert y.shape[2] == math.ceil(size / s)
        cols, _ = columns(adapter, node, x, w.shape)
        assert cols.shape[1] == 2 * y.shape[2]
        got = (cols[0] @ mats[0].T).reshape(2, y.shape[2], 2).transpose(0, 2, 1)
        assert_op_close(got, y.astype(np.float64), np.float32)


@pytest.mark.parametrize("auto", ["SAME_UPPER", "SAME_LOWER"])
def test_conv_pads_same_with_dilation_multi_dim(auto):
    """Dilated SAME (which onnxruntime refuses): the spec's formula, axis by axis, and the str form."""
    for spatial, kernel, strides, dil in [((7, 8), (3, 2), (2, 3), (2, 2)), ((6, 5, 4), (2, 3, 1), (1, 2, 3), (3, 1, 2))]:
        attrs = dict(auto_pad=auto.encode(), strides=list(strides), dilations=list(dil))
        pb, pe = ref_pads(auto, None, list(spatial), list(kernel), list(strides), list(dil))
        assert conv_pads(attrs, spatial, kernel) == pb + pe
        attrs["auto_pad"] = auto
        assert conv_pads(attrs, spatial, kernel) == pb + pe


# ----------------------------------------------------------------------------------------------
# lipschitz_factor


LIP_CASES = [
    ("plain", (2, 5, 5), (3, 2, 3, 3), {}),
    ("stride2", (2, 6, 6), (3, 2, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    ("stride-gt-kernel", (1, 7, 7), (2, 1, 2, 2), dict(strides=[3, 3])),
    ("dilated", (2, 7, 6), (2, 2, 3, 2), dict(dilations=[2, 3], pads=[2, 1, 2, 1])),
    ("dilated-strided", (1, 9), (2, 1, 3), dict(dilations=[2], strides=[2])),
    ("groups", (4, 5, 5), (4, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1])),
    ("depthwise", (3, 6, 5), (6, 1, 3, 3), dict(group=3, auto_pad="SAME_UPPER")),
    ("3d", (1, 4, 4, 4), (2, 1, 2, 2, 2), dict(strides=[1, 2, 1])),
    # one channel, all-ones kernel: the bound is nearly reached on a long enough input, so these
    # check the factor is not too small (a too-large factor would pass the cases above)
    ("ones-kernel", (1, 12, 12), (1, 1, 3, 3), dict(pads=[2, 2, 2, 2])),
    ("ones-dil2-stride2", (1, 60), (1, 1, 3), dict(dilations=[2], strides=[2])),
    # (dilation 3, stride 2: an input element is in at most 2 of the 3-tap fields, the factor
    # allows 3, so the bound is only an upper bound here)
    ("loose-ones-dil3-stride2", (1, 60), (1, 1, 3), dict(dilations=[3], strides=[2])),
    ("ones-stride2", (1, 40), (1, 1, 4), dict(strides=[2], pads=[3, 3])),
    ("ones-2d-mixed", (1, 20, 20), (1, 1, 3, 2), dict(dilations=[2, 1], strides=[2, 1], pads=[4, 1, 4, 1])),
]


@pytest.mark.parametrize("name,in_shape,w_shape,attrs", LIP_CASES, ids=[c[0] for c in LIP_CASES])
def test_conv_lipschitz_factor_bounds_operator_norm(name, in_shape, w_shape, attrs):
    rng = np.random.default_rng(sum(map(ord, name)))
    ones = "ones" in name
    w = np.ones(w_shape, np.float32) if ones else rng.standard_normal(w_shape).astype(np.float32)
    model = build_model("Conv", w, (1,) + in_shape, attrs=attrs)
    node = model.graph.node[0]
    adapter = ADAPTERS["Conv"]
    factor = adapter.lipschitz_factor(node, w.shape)
    assert 1.0 <= factor <= math.sqrt(math.prod(w_shape[2:])) + 1e-12
    w_norm = max(np.linalg.norm(m, 2) for m in adapter.to_matrices(node, w.astype(np.float64)))
    bound = w_norm * factor
    t = conv_operator(model, in_shape)
    true_norm = np.linalg.norm(t, 2)
    assert true_norm <= bound * (1 + 1e-5)
    # random inputs, and power iteration (which approaches the worst case from below)
    xs = rng.standard_normal((20,) + in_shape).astype(np.float32)
    ys = run_model(model, xs).astype(np.float64)
    for xi, yi in zip(xs, ys):
        assert np.linalg.norm(yi) <= bound * np.linalg.norm(xi.astype(np.float64)) * (1 + 1e-5)
    v = rng.standard_normal(t.shape[1])
    for _ in range(200):
        v = t.T @ (t @ v)
        v /= np.linalg.norm(v)
    assert np.linalg.norm(t @ v) <= bound * (1 + 1e-5)
    assert 0.98 * true_norm <= np.linalg.norm(t @ v) <= true_norm * (1 + 1e-6)
    if name.startswith("ones"):
        assert true_norm >= 0.9 * bound


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
    ("Conv", (3, 2, 2, 6, 5), (3, 2, 3, 2), dict(pads=[1, 0, 1, 1])),
    ("Conv", (2, 2, 4, 7), (4, 2, 3), dict(group=2, strides=[2])),
    ("MatMul", (3, 2, 5, 4), (4, 3), {}),
]


@pytest.mark.parametrize("op,x_shape,w_shape,attrs", STACK_CASES,
                         ids=[f"{c[0]}-{len(c[1])}d-{i}" for i, c in enumerate(STACK_CASES)])
def test_stacked_leading_axes_are_samples(op, x_shape, w_shape, attrs):
    rng = np.random.default_rng(len(x_shape) * 31 + len(attrs))
    x = rng.standard_normal(x_shape)
    node = helper.make_node(op, ["x", "W"], ["y"], **attrs)
    adapter = ADAPTERS[op]
    rank = len(w_shape) if op == "Conv" else (2 if op == "Gemm" else None)
    if rank is None:
        slices = [x]
    else:
        slices = [x[idx] for idx in np.ndindex(*x.shape[:x.ndim - rank])]
    expect = np.concatenate([columns(adapter, node, s, w_shape)[0] for s in slices], axis=1)
    got, _ = columns(adapter, node, x, w_shape)
    geom = adapter.geometry(node, w_shape)
    assert got.shape == (geom.groups, expect.shape[1], geom.cols)
    np.testing.assert_array_equal(got, expect)
