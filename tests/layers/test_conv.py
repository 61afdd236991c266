"""Conv (1-D/2-D/3-D, grouped, depthwise): its cases for the contract (test_contract.py) and the
checks that only a Conv has: auto_pad and pads against the spec, the Lipschitz factor, chunking.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from onnx_lobs import layers
from onnx_lobs.layers import ADAPTERS, conv_pads, node_attrs, unfold

from .cases import LayerCase
from .refs import (
    F32_TOL, FAST_RTOL, HESS_RTOL, assert_op_close, build_model, case_rng, columns, conv_operator, conv_params,
    hessian_from_chunks, ort_session, ref_conv_patches, ref_hessian, ref_pads, rel_fro, run_model)

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

# the representatives of the structured-pruning checks: plain, strided, padded, grouped, depthwise
STRUCTURAL = {"1d", "2d-strides", "2d-same-lower-odd", "2d-groups2", "2d-depthwise", "2d-depthwise-x2",
              "3d-groups-dil"}


def _reference(x, w_shape, attrs):
    patches, out = ref_conv_patches(x, w_shape, attrs)
    return patches, (x.shape[0], w_shape[0]) + tuple(out)


def _needs_reference_evaluator(attrs):
    auto = attrs.get("auto_pad", "NOTSET")
    return auto.startswith("SAME") and any(d != 1 for d in attrs.get("dilations", []))


CASES = [LayerCase("Conv", name, x_shape, w_shape, attrs, (w_shape[0],) if with_bias else None, _reference,
                   evaluator="reference" if _needs_reference_evaluator(attrs) else "ort",
                   same_positions="inputs", structural=name in STRUCTURAL)
         for name, x_shape, w_shape, attrs, with_bias in CONV_CASES]
BY_NAME = {c.name: c for c in CASES}


def test_same_upper_and_lower_really_differ():
    """Guard on the case list: the odd-total SAME cases must give different pads and outputs."""
    for pair in (("2d-same-upper-odd", "2d-same-lower-odd"), ("2d-same-upper-even", "2d-same-lower-even")):
        up, lo = BY_NAME[pair[0]], BY_NAME[pair[1]]
        assert conv_params(up.x_shape, up.w_shape, up.attrs)[3] != conv_params(lo.x_shape, lo.w_shape, lo.attrs)[3]
        x, w, b, model_u, _ = up.setup()
        model_l = build_model("Conv", w, x.shape, bias=b, attrs=lo.attrs)
        assert not np.allclose(run_model(model_u, x), run_model(model_l, x))


def test_conv_skip_reasons():
    conv = ADAPTERS["Conv"]
    assert conv.skip_reason(helper.make_node("Conv", ["a", "b"], ["y"]), (4, 3)) is not None
    assert conv.skip_reason(helper.make_node("Conv", ["a", "b"], ["y"], group=3), (4, 1, 3, 3)) is not None
    assert conv.skip_reason(helper.make_node("Conv", ["a", "b"], ["y"], group=2), (4, 1, 3, 3)) is None


# ----------------------------------------------------------------------------------------------
# chunking


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[0] in ("2d", "2d-groups2", "3d")], ids=lambda c: c[0])
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
                m.setattr(layers.base, name, value)
            chunks = list(unfold(adapter, node, x, w_shape))
            assert len(chunks) == expect
            assert all(ch.dtype == np.float32 and ch.shape[0] == g and ch.shape[2] == c for ch in chunks)
            np.testing.assert_array_equal(np.concatenate(chunks, axis=1), full_cols)
            for exact, tol in ((True, HESS_RTOL), (False, FAST_RTOL)):
                h, n = hessian_from_chunks(adapter, node, x, w_shape, with_bias, exact=exact)
                assert n == full_cols.shape[1]
                assert rel_fro(h, h_full) <= (1e-13 if exact else tol)
                assert rel_fro(h, ref_hessian(ref_conv_patches(x, w_shape, attrs)[0], with_bias)) <= tol


def test_conv_column_dtypes_and_layouts():
    """Narrower floats widen to float32 exactly, float64 stays, and conv chunks are
    Fortran-ordered per group (what the accumulator's syrk reads in place)."""
    rng = np.random.default_rng(12)
    conv = ADAPTERS["Conv"]
    xc = rng.standard_normal((3, 4, 6, 5)).astype(np.float16)
    cnode = helper.make_node("Conv", ["x", "W"], ["y"], group=2, pads=[1, 1, 1, 1])
    chunks = list(unfold(conv, cnode, xc, (4, 2, 3, 3)))
    assert all(c.dtype == np.float32 and all(c[g].flags.f_contiguous for g in range(2)) for c in chunks)
    ref = ref_conv_patches(xc.astype(np.float32), (4, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1]))[0]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), ref)
    assert list(unfold(conv, cnode, xc.astype(np.float64), (4, 2, 3, 3)))[0].dtype == np.float64


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
        assert_op_close(got, y.astype(np.float64), F32_TOL)


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


# ----------------------------------------------------------------------------------------------
# stacked inputs (Loop/Scan iterations): extra leading axes are more samples


STACK_CASES = [
    ((3, 2, 2, 6, 5), (3, 2, 3, 2), dict(pads=[1, 0, 1, 1])),
    ((2, 2, 4, 7), (4, 2, 3), dict(group=2, strides=[2])),
]


@pytest.mark.parametrize("x_shape,w_shape,attrs", STACK_CASES, ids=["2d-stacked", "1d-groups-stacked"])
def test_conv_stacked_leading_axes_are_samples(x_shape, w_shape, attrs):
    rng = np.random.default_rng(len(x_shape) * 31 + len(attrs))
    x = rng.standard_normal(x_shape)
    node = helper.make_node("Conv", ["x", "W"], ["y"], **attrs)
    adapter = ADAPTERS["Conv"]
    slices = [x[idx] for idx in np.ndindex(*x.shape[:x.ndim - len(w_shape)])]
    expect = np.concatenate([columns(adapter, node, s, w_shape)[0] for s in slices], axis=1)
    got, _ = columns(adapter, node, x, w_shape)
    geom = adapter.geometry(node, w_shape)
    assert got.shape == (geom.groups, expect.shape[1], geom.cols)
    np.testing.assert_array_equal(got, expect)
