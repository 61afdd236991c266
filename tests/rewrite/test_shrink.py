"""The shrink rule, checked in onnxruntime: removing channels by hand-written edits gives exactly
what the dense model computes with those channels' consumer columns set to zero."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs import rewrite
from onnx_lobs.rewrite import RewriteError
from onnx_lobs.rewrite.shrink import ForgetShape, SetAttr, SetEntry, SetInput, ShrinkChannels, SliceInput

RNG = np.random.default_rng(0)
KEEP = np.array([0, 2, 3, 5])


def _t(name, a, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(a, dtype), name)


def _model(weight_as="initializer"):
    """Conv(6) -> BN -> Mul(shared per-channel s) -> Relu -> Conv(4); s is also used by a second Mul."""
    w1, w2 = RNG.standard_normal((6, 3, 3, 3)), RNG.standard_normal((4, 6, 1, 1))
    inits = [_t("b1", RNG.standard_normal(6)), _t("w2", w2),
             _t("g", RNG.uniform(.5, 1.5, 6)), _t("beta", RNG.standard_normal(6)),
             _t("mean", RNG.standard_normal(6) * .1), _t("var", RNG.uniform(.5, 1.5, 6)),
             _t("s", RNG.uniform(.5, 1.5, (1, 6, 1, 1)))]
    nodes = []
    if weight_as == "initializer":
        inits.append(_t("w1", w1))
    elif weight_as == "constant":
        nodes.append(helper.make_node("Constant", [], ["w1"], value=_t("w1v", w1)))
    else:  # fp16 storage, cast to fp32 for the computation
        inits.append(_t("w1h", w1, np.float16))
        nodes.append(helper.make_node("Cast", ["w1h"], ["w1"], to=TensorProto.FLOAT))
    nodes += [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
              helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"]),
              helper.make_node("Mul", ["bn", "s"], ["sc"]),
              helper.make_node("Relu", ["sc"], ["r"]),
              helper.make_node("Conv", ["r", "w2"], ["y"]),
              helper.make_node("Mul", ["x6", "s"], ["z"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5]),
                                       helper.make_tensor_value_info("x6", TensorProto.FLOAT, ["N", 6, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6, 1, 1])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _run(model, feed):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feed)


def _position(model, op, k=0):
    return [i for i, n in enumerate(model.graph.node) if n.op_type == op][k]


def _edits(model):
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w2 = arrays["w2"]
    conv1, conv2 = _position(model, "Conv", 0), _position(model, "Conv", 1)
    bn, mul = _position(model, "BatchNormalization"), _position(model, "Mul", 0)
    return ([SliceInput(conv1, 1, 0, KEEP), SliceInput(conv1, 2, 0, KEEP), SetInput(conv2, 1, w2[:, KEEP])]
            + [SliceInput(bn, k, 0, KEEP) for k in (1, 2, 3, 4)] + [SliceInput(mul, 1, 1, KEEP)]
            + [ForgetShape(v) for v in ("c1", "bn", "sc", "r")])


@pytest.mark.parametrize("weight_as", ["initializer", "constant", "fp16"])
def test_removing_channels_equals_zeroing_their_consumer_columns(weight_as):
    model = _model(weight_as)
    feed = {"x": RNG.standard_normal((2, 3, 5, 5)).astype(np.float32),
            "x6": RNG.standard_normal((2, 6, 1, 1)).astype(np.float32)}
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    w2 = next(t for t in zeroed.graph.initializer if t.name == "w2")
    a = numpy_helper.to_array(w2).copy()
    a[:, np.setdiff1d(np.arange(6), KEEP)] = 0
    w2.CopyFrom(_t("w2", a))
    before = model.SerializeToString()
    m = ir.serde.deserialize_model(model)
    rewrite.apply(ShrinkChannels(), m, _edits(model))
    out = rewrite.to_proto(m, model)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    got, want = _run(out, feed), _run(zeroed, feed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])  # the other reader of s still sees all six entries
    stored = {t.name: t for t in out.graph.initializer}
    assert list(stored["s"].dims) == [1, 6, 1, 1]  # shared: the sliced Mul got its own copy
    assert list(stored["s__kept"].dims) == [1, 4, 1, 1]
    assert list(numpy_helper.to_array(stored["w2"]).shape) == [4, 4, 1, 1]
    if weight_as == "fp16":
        assert stored["w1h"].data_type == TensorProto.FLOAT16 and list(stored["w1h"].dims) == [4, 3, 3, 3]
    assert model.SerializeToString() == before  # the model the IR was read from is untouched


def test_entries_and_attributes():
    shape = _t("shape", [2, 12], np.int64)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    m = ir.serde.deserialize_model(model)
    rewrite.apply(ShrinkChannels(), m, [SetEntry(0, 1, 1, 6), SetAttr(0, "allowzero", 0)])
    out = rewrite.to_proto(m, model)
    assert numpy_helper.to_array(out.graph.initializer[0]).tolist() == [2, 6]
    assert out.graph.node[0].attribute[0].i == 0


def test_check_says_why_not():
    model = _model()
    m = ir.serde.deserialize_model(model)
    with pytest.raises(RewriteError, match="not a constant"):
        rewrite.apply(ShrinkChannels(), m, [SliceInput(_position(model, "Conv", 0), 0, 1, KEEP)])
    with pytest.raises(RewriteError, match="no axis 3"):
        rewrite.apply(ShrinkChannels(), m, [SliceInput(_position(model, "Conv", 0), 2, 3, KEEP)])
    with pytest.raises(RewriteError, match="no node"):
        rewrite.apply(ShrinkChannels(), m, [SetAttr(99, "group", 1)])
