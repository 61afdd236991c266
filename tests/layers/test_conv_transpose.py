"""ConvTranspose: its cases for the contract (test_contract.py), and the checks against the op's
definition that only it has (onnxruntime runs it in float32 only), its matrix layout, chunking.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from onnx import helper

from onnx_lobs import layers
from onnx_lobs.layers import ADAPTERS

from .cases import LayerCase
from .refs import build_model, columns, conv_operator, ref_ct_layout, ref_ct_output, ref_ct_patches, run_model

# (id, x_shape, w_shape, attrs, with_bias)
CT_CASES = [
    ("1d", (2, 3, 5), (3, 4, 3), {}, True),
    ("1d-stride2", (2, 2, 5), (2, 3, 3), dict(strides=[2]), False),
    ("1d-stride3-dil2-pads", (2, 2, 4), (2, 2, 3), dict(strides=[3], dilations=[2], pads=[2, 1]), True),
    ("1d-output_padding", (1, 2, 4), (2, 2, 3), dict(strides=[3], output_padding=[2]), True),
    ("1d-output_shape-odd", (2, 2, 4), (2, 1, 3), dict(strides=[2], output_shape=[8]), False),
    ("1d-output_shape-upper", (2, 2, 4), (2, 1, 3), dict(strides=[2], output_shape=[8], auto_pad="SAME_UPPER"), True),
    ("1d-output_shape-big", (1, 2, 4), (2, 2, 1), dict(strides=[4], output_shape=[16]), True),  # past the full size
    ("1d-same-upper", (2, 2, 4), (2, 2, 3), dict(strides=[2], auto_pad="SAME_UPPER"), True),
    ("1d-same-lower", (2, 2, 4), (2, 2, 3), dict(strides=[2], auto_pad="SAME_LOWER"), True),
    ("1d-same-clamped", (1, 2, 4), (2, 2, 1), dict(strides=[3], auto_pad="SAME_LOWER"), False),  # s > k: no crop
    ("1d-valid", (2, 2, 3), (2, 3, 2), dict(strides=[2], auto_pad="VALID"), False),
    ("1d-pads-past-kernel", (2, 2, 5), (2, 2, 1), dict(strides=[2], pads=[2, 1]), True),  # the input is cropped
    ("1d-same-dil", (2, 2, 5), (2, 2, 3), dict(auto_pad="SAME_UPPER", dilations=[2]), True),
    ("2d", (2, 3, 4, 3), (3, 2, 3, 2), {}, True),
    ("2d-unet-up", (2, 4, 3, 3), (4, 3, 2, 2), dict(strides=[2, 2]), True),
    ("2d-strides-pads-outpad", (2, 2, 3, 4), (2, 3, 3, 3),
     dict(strides=[2, 3], pads=[1, 0, 1, 2], output_padding=[1, 2]), True),
    ("2d-dil-asym", (1, 2, 4, 3), (2, 2, 2, 3), dict(dilations=[2, 1], strides=[1, 2], pads=[0, 1, 1, 0]), False),
    ("2d-groups2", (2, 4, 3, 3), (4, 3, 3, 3), dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
     True),
    ("2d-groups2-same", (2, 4, 3, 4), (4, 1, 2, 3), dict(group=2, strides=[2, 1], auto_pad="SAME_LOWER"), False),
    ("2d-depthwise", (2, 3, 4, 4), (3, 1, 3, 3), dict(group=3, strides=[2, 2], output_shape=[7, 8]), True),
    ("2d-kernel_shape-attr", (1, 2, 3, 3), (2, 2, 2, 3), dict(kernel_shape=[2, 3], strides=[2, 1]), True),
    ("3d", (1, 2, 3, 2, 3), (2, 2, 2, 2, 2), dict(strides=[2, 1, 2], pads=[0, 1, 0, 1, 0, 1]), True),
    ("3d-groups-dil", (1, 4, 2, 3, 2), (4, 1, 2, 2, 2), dict(group=2, dilations=[1, 2, 2], strides=[2, 2, 1]), False),
    ("3d-same-upper", (1, 2, 2, 3, 2), (2, 2, 3, 2, 2), dict(auto_pad="SAME_UPPER", strides=[2, 2, 2]), True),
]


def _ct_random_cases(count, seed=2024):
    """Random attributes over everything ConvTranspose takes, limited to what onnxruntime runs
    (output_padding below the stride, at least one output position)."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        d = int(rng.integers(1, 4))
        g = int(rng.choice([1, 1, 2, 3]))
        kernel = [int(v) for v in rng.integers(1, 4, d)]
        s = [int(v) for v in rng.integers(1, 4, d)]
        dil = [int(v) for v in rng.integers(1, 3, d)]
        spatial = [int(v) for v in rng.integers(1, 5 if d < 3 else 3, d)]
        attrs = dict(strides=s, dilations=dil)
        if g > 1:
            attrs["group"] = g
        if rng.random() < 0.5:
            attrs["output_padding"] = [int(rng.integers(0, v)) for v in s]
        extra = attrs.get("output_padding", [0] * d)
        full = [s[i] * (spatial[i] - 1) + extra[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(d)]
        mode = rng.choice(["pads", "auto", "output_shape", "none"])
        if mode == "pads":
            attrs["pads"] = [int(v) for v in rng.integers(0, 3, 2 * d)]
        elif mode == "auto":
            attrs["auto_pad"] = str(rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID"]))
        elif mode == "output_shape":
            # onnxruntime asks that the input size be the one the output size implies
            attrs["output_shape"] = [max(1, f - int(rng.integers(0, min(s[i], 2)))) for i, f in enumerate(full)]
            if rng.random() < 0.5:
                attrs["auto_pad"] = "SAME_UPPER"
        x_shape = (2, g * int(rng.integers(1, 3))) + tuple(spatial)
        w_shape = (x_shape[1], int(rng.integers(1, 3))) + tuple(kernel)
        if min(ref_ct_layout(x_shape, w_shape, attrs)[1]) <= 0:
            continue
        cases.append((f"random{len(cases)}", x_shape, w_shape, attrs, bool(rng.random() < 0.5)))
    return cases


CT_ALL = CT_CASES + _ct_random_cases(40)

# the representatives of the structured-pruning checks: plain, strided, cropped, grouped, depthwise
STRUCTURAL = {"1d", "1d-stride3-dil2-pads", "2d-unet-up", "2d-groups2", "2d-groups2-same", "2d-depthwise",
              "3d-groups-dil"}


def _reference(x, w_shape, attrs):
    patches, out = ref_ct_patches(x, w_shape, attrs)
    return patches, (x.shape[0], w_shape[1] * attrs.get("group", 1)) + tuple(out)


def _ct_case(name, x_shape, w_shape, attrs, with_bias, dtype=np.float32):
    return LayerCase("ConvTranspose", name, x_shape, w_shape, attrs,
                     (w_shape[1] * attrs.get("group", 1),) if with_bias else None, _reference, dtype=dtype,
                     seed="ct", op_tol=1e-5, same_positions="outputs", structural=name in STRUCTURAL)


CASES = [_ct_case(*c) for c in CT_ALL]


def _from_columns(adapter, node, x, w, b):
    """The op's output rebuilt from the unfolded columns and matrices: [positions, C_out]."""
    geom = adapter.geometry(node, w.shape)
    cols, _ = columns(adapter, node, x, w.shape)
    mats = adapter.to_matrices(node, w.astype(np.float64))
    bvec = adapter.bias_vector(node, b, geom.rows * geom.groups) if b is not None else None
    parts = []
    for g in range(geom.groups):
        y = cols[g].astype(np.float64) @ mats[g].T
        parts.append(y + bvec[g] if bvec is not None else y)
    return np.concatenate(parts, axis=1), cols


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_transpose_definition_matches_onnxruntime(case):
    """The reference the contract's brute-force columns rest on (the scatter form) is the op."""
    x, w, b, model, _ = case.setup()
    y = run_model(model, x).astype(np.float64)
    np.testing.assert_allclose(ref_ct_output(x, w, b, case.attrs), y, rtol=1e-5,
                               atol=1e-5 * max(1.0, np.abs(y).max()))


@pytest.mark.parametrize("case", [_ct_case(*c, dtype=np.float64) for c in CT_CASES], ids=str)
def test_conv_transpose_float64_columns_reproduce_definition(case):
    """onnxruntime has no float64 ConvTranspose: the float64 check is against the definition."""
    x, w, b, _, node = case.setup()
    got, cols = _from_columns(ADAPTERS["ConvTranspose"], node, x, w, b)
    assert cols.dtype == np.float64
    ref = case.rows(ref_ct_output(x, w, b, case.attrs))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_transpose_matrix_layout(case):
    """Row o of group gi, column (c, kernel position): the stored W[gi*cig + c, o, position]."""
    _, w, _, _, node = case.setup()
    g = case.attrs.get("group", 1)
    cig, cog, k = w.shape[0] // g, w.shape[1], math.prod(w.shape[2:])
    mats = ADAPTERS["ConvTranspose"].to_matrices(node, w)
    assert mats.shape == (g, cog, cig * k)
    for gi, o, c, kk in itertools.product(range(g), range(cog), range(cig), range(k)):
        assert mats[gi, o, c * k + kk] == w[gi * cig + c, o].ravel()[kk]


def test_conv_transpose_nm_groups_run_along_input_channels():
    adapter = ADAPTERS["ConvTranspose"]
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=2)
    w_shape = (16, 3, 2, 3)  # 8 input channels per group, 6 kernel positions
    w = np.arange(math.prod(w_shape), dtype=np.float64).reshape(w_shape)
    groups = adapter.nm_groups(node, w_shape, 4)
    assert groups.shape == (2 * 6, 4)
    assert sorted(groups.ravel().tolist()) == list(range(8 * 6))
    mats = adapter.to_matrices(node, w)
    for grp in groups:
        # one kernel position, 4 consecutive input channels of the group
        for gi in range(2):
            vals = mats[gi, 1, grp]
            chans = [int(np.argwhere(w[:, 1] == v)[0][0]) for v in vals]
            pos = {int(np.argwhere(w[:, 1] == v)[0][1]) * 3 + int(np.argwhere(w[:, 1] == v)[0][2]) for v in vals}
            assert len(pos) == 1 and chans == list(range(chans[0], chans[0] + 4)) and chans[0] % 4 == 0
    assert "do not divide" in adapter.nm_groups(node, (12, 3, 2, 3), 4)  # 6 channels per group


def test_conv_transpose_skip_reasons():
    adapter = ADAPTERS["ConvTranspose"]
    assert "rank 2" in adapter.skip_reason(helper.make_node("ConvTranspose", ["a", "b"], ["y"]), (4, 3))
    assert "not divisible" in adapter.skip_reason(helper.make_node("ConvTranspose", ["a", "b"], ["y"], group=3),
                                                  (4, 1, 3, 3))
    assert adapter.skip_reason(helper.make_node("ConvTranspose", ["a", "b"], ["y"], group=2), (4, 1, 3, 3)) is None


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("1d-stride3-dil2-pads", "2d-groups2", "3d")],
                         ids=str)
def test_conv_transpose_chunking_leaves_columns_unchanged(case, monkeypatch):
    x, w, _, _, node = case.setup()
    x = np.concatenate([x] * 3)
    adapter = ADAPTERS["ConvTranspose"]
    full, n_full = columns(adapter, node, x, w.shape)
    assert n_full == 1
    for patch in (dict(CHUNK_BYTES=1), dict(CHUNK_ROWS=full.shape[1] // len(x) + 1)):
        with monkeypatch.context() as m:
            for name, value in patch.items():
                m.setattr(layers.base, name, value)
            cols, n = columns(adapter, node, x, w.shape)
            assert n > 1
            np.testing.assert_array_equal(cols, full)


LIP_CT_CASES = [
    ("ct-plain", (2, 4, 4), (2, 3, 3, 3), {}),
    ("ct-stride2", (2, 3, 3), (2, 2, 2, 2), dict(strides=[2, 2])),
    ("ct-groups-pads", (4, 3, 3), (4, 1, 3, 3), dict(group=2, strides=[2, 1], pads=[1, 1, 1, 1])),
    ("ct-dil-1d", (1, 20), (1, 1, 3), dict(dilations=[2], strides=[3])),
    ("ct-ones-stride2", (1, 30), (1, 1, 4), dict(strides=[2])),  # the factor is loose with strides
    ("ones-ct-1d", (1, 40), (1, 1, 4), {}),  # ... and nearly reached without
]


@pytest.mark.parametrize("name,in_shape,w_shape,attrs", LIP_CT_CASES, ids=[c[0] for c in LIP_CT_CASES])
def test_conv_transpose_lipschitz_factor_bounds_operator_norm(name, in_shape, w_shape, attrs):
    rng = np.random.default_rng(sum(map(ord, name)))
    w = np.ones(w_shape, np.float32) if name.startswith("ones") else rng.standard_normal(w_shape).astype(np.float32)
    model = build_model("ConvTranspose", w, (1,) + in_shape, attrs=attrs)
    node = model.graph.node[0]
    adapter = ADAPTERS["ConvTranspose"]
    bound = max(np.linalg.norm(m, 2) for m in adapter.to_matrices(node, w.astype(np.float64))) \
        * adapter.lipschitz_factor(node, w.shape)
    true_norm = np.linalg.norm(conv_operator(model, in_shape), 2)
    assert true_norm <= bound * (1 + 1e-5)
    if name.startswith("ones"):
        assert true_norm >= 0.9 * bound


def test_conv_transpose_stacked_leading_axes_are_samples():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 2, 4, 3))
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], strides=[2, 1])
    adapter = ADAPTERS["ConvTranspose"]
    expect = np.concatenate([columns(adapter, node, s, (2, 3, 2, 2))[0] for s in x], axis=1)
    np.testing.assert_array_equal(columns(adapter, node, x, (2, 3, 2, 2))[0], expect)


# ----------------------------------------------------------------------------------------------
# ConvTranspose end to end


def test_conv_transpose_reported_error_is_the_measured_change():
    """A lone ConvTranspose: the error the report gives equals 1/2 mean ||dY||^2 over output
    positions of the real op's output, on calibration and held-out samples alike."""
    from onnx_lobs import PruneConfig, prune
    from onnx_lobs.calibration import HOLDOUT_FRACTION

    rng = np.random.default_rng(3)
    model = build_model("ConvTranspose", rng.standard_normal((6, 2, 3, 3)).astype(np.float32), (1, 6, 5, 4),
                        bias=rng.standard_normal(4).astype(np.float32),
                        attrs=dict(group=2, strides=[2, 2], pads=[1, 0, 1, 1], output_padding=[1, 0]))
    x = rng.standard_normal((60, 6, 5, 4)).astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(sparsity=0.6, default_exclude=False))
    rec = result.report.layers[0]
    assert rec.op == "ConvTranspose" and rec.sparsity == pytest.approx(0.6, abs=0.02)
    h = len(x) // HOLDOUT_FRACTION
    for part, reported in ((slice(0, len(x) - h), rec.error), (slice(len(x) - h, None), rec.holdout_error)):
        d = run_model(result.model, x[part]).astype(np.float64) - run_model(model, x[part]).astype(np.float64)
        d = np.moveaxis(d, 1, -1).reshape(-1, d.shape[1])
        assert reported == pytest.approx(0.5 * np.mean(np.sum(d ** 2, axis=1)), rel=1e-4)


@pytest.mark.parametrize("method", ["lobs", "sparsegpt", "magnitude"])
def test_unet_with_conv_transpose_prunes_end_to_end(method, tmp_path):
    import onnx

    from onnx_lobs import PruneConfig, find_layers, load_model, prune, save_model
    from tests.builders import small_unet

    rng = np.random.default_rng(0)
    model = small_unet(rng)
    x = rng.standard_normal((50, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "unet.onnx"
    onnx.save(model, path)
    found, skipped = find_layers(load_model(str(path)))
    assert [(l.name, l.op) for l in found] == [("enc", "Conv"), ("up", "ConvTranspose"), ("skip", "Conv"),
                                               ("refine", "ConvTranspose"), ("head", "Conv")] and not skipped
    up = {l.name: l for l in found}["up"]
    assert (up.geometry.groups, up.geometry.rows, up.geometry.cols, up.bias is not None) == (1, 8, 32, True)
    dense = run_model(model, x)
    for config in (PruneConfig(method=method, sparsity=0.5), PruneConfig(method=method, pattern=(2, 4)),
                   PruneConfig(method=method, sparsity=0.5, sequential=True)):
        result = prune(str(path), {"x": x}, config)
        out = tmp_path / "out.onnx"
        save_model(result.model, str(out))
        onnx.checker.check_model(onnx.load(out))
        recs = {r.name: r for r in result.report.layers}
        for name in ("up", "refine"):
            assert recs[name].skipped is None and recs[name].sparsity == pytest.approx(0.5, abs=0.01)
            mask = result.masks[{"up": "Wu", "refine": "Wr"}[name]]
            w = {t.name: t for t in result.model.graph.initializer}[{"up": "Wu", "refine": "Wr"}[name]]
            assert np.all(onnx.numpy_helper.to_array(w)[mask] == 0)
        if config.pattern is not None:  # at most 2 non-zeros in every 4 input channels at a position
            wr = onnx.numpy_helper.to_array({t.name: t for t in result.model.graph.initializer}["Wr"])
            per_group = wr.reshape(2, 2, 4, 4, 9)  # [group, 4-channel block, channel, out, position]
            assert np.all(np.count_nonzero(per_group, axis=2) <= 2)
        y = run_model(result.model, x)
        assert np.all(np.isfinite(y)) and result.report.fidelity["rel_l2"] < 1
        assert np.linalg.norm(y - dense) < np.linalg.norm(dense)
    assert onnx.load(path) == model
