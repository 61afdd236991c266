"""The expose rule, checked in onnxruntime: the rewritten model gives the original's outputs
unchanged, plus the exposed value as numpy computes it -- in the main graph, in both If branches, in Loop and Scan bodies, before opset 11."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_lobs import rewrite
from onnx_lobs.graph import find_layers
from onnx_lobs.index import address
from onnx_lobs.modelio import LoadedModel
from onnx_lobs.rewrite.expose import ExposeValue, Request
from tests import subgraphs
from tests.builders import mlp


def _run(model, feed, names=None):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names or [o.name for o in sess.get_outputs()], sess.run(names, feed)))


def _rewritten(model, use):
    m = ir.serde.deserialize_model(model)
    got = rewrite.apply(ExposeValue(), m, Request(use.x, address(use.x_scope), np.dtype(np.float32)))
    return rewrite.to_proto(m), got


def _uses(model):
    return {l.name: l.uses[0] for l in find_layers(LoadedModel(model, "m.onnx"))[0]}


def _outputs_unchanged(model, aug, feed):
    before, after = _run(model, feed), _run(aug, feed)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


def test_main_graph_value_matches_the_model_cut_there():
    rng = np.random.default_rng(0)
    model = mlp(rng, (6, 5, 4, 3))
    use = _uses(model)["fc3"]
    aug, e = _rewritten(model, use)
    assert use.x in {o.name for o in aug.graph.output}  # added untyped: onnxruntime needs no type
    x = rng.standard_normal((7, 6)).astype(np.float32)
    _outputs_unchanged(model, aug, {"x": x})
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    r2 = np.maximum(np.maximum(x @ w["W1"].T + w["b1"], 0) @ w["W2"], 0)  # fc3's input, in numpy
    np.testing.assert_allclose(_run(aug, {"x": x})[e.output], r2, rtol=1e-5, atol=1e-5)
    assert e.stacked == 0 and e.shape is None


@pytest.mark.parametrize("opset", [10, 13])
def test_if_branches_yield_the_value_or_an_empty_stand_in(opset):
    rng = np.random.default_rng(1)
    model = subgraphs.if_model(rng)
    model.opset_import[0].version = opset
    if opset < 11:  # Gemm's C is required before opset 11: a zero bias from the outer scope
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "zb"))
        branch = next(a.g for a in model.graph.node[2].attribute if a.name == "else_branch")
        branch.node[1].input.append("zb")
    use = _uses(model)["then_mm"]
    aug, e = _rewritten(model, use)
    for sign in (1, -1):  # then (sum > 0) and else
        x = (sign * np.abs(rng.standard_normal((3, 6)))).astype(np.float32)
        _outputs_unchanged(model, aug, {"x": x})
        values = _run(aug, {"x": x})
        got = e.value(values)
        if sign > 0:
            np.testing.assert_array_equal(got, np.maximum(x, 0))
        else:
            assert got.size == 0
    assert (e.shape is not None) == (opset < 11)


def test_loop_and_scan_bodies_give_one_slice_per_iteration():
    rng = np.random.default_rng(2)
    for make, feed_shape in ((subgraphs.loop_model, (4, 5)), (subgraphs.scan_model, (6, 4))):
        model = make(rng)
        use = next(iter(_uses(model).values()))
        aug, e = _rewritten(model, use)
        x = rng.standard_normal(feed_shape).astype(np.float32)
        _outputs_unchanged(model, aug, {"x": x})
        got = e.value(_run(aug, {"x": x}))
        w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W"))
        if make is subgraphs.loop_model:
            h, expect = x, []
            for _ in range(3):
                expect.append(h)
                h = np.maximum(h @ w, 0)
            np.testing.assert_allclose(got, np.stack(expect), rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, x)  # the scan input's slices, stacked back
        assert e.stacked == 1


def test_check_says_why_it_does_not_apply():
    m = ir.serde.deserialize_model(mlp(np.random.default_rng(3)))
    assert "no value 'nope'" in ExposeValue().check(m, Request("nope", (), np.dtype(np.float32)))
    assert "no body" in ExposeValue().check(m, Request("x", ((0, "body"),), np.dtype(np.float32)))
    with pytest.raises(rewrite.RewriteError, match="expose-value"):
        rewrite.apply(ExposeValue(), m, Request("nope", (), np.dtype(np.float32)))
