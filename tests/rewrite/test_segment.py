"""The segment rule, checked in onnxruntime: a cut of the model fed the tensors its nodes read
from the rest gives exactly the tensors the whole model computes there."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto

from onnx_lobs import rewrite
from onnx_lobs.rewrite.expose import ExposeValue, Request
from onnx_lobs.rewrite.segment import Cut, ExtractSegment
from tests.builders import mlp, small_cnn


def _run(model, feed, names):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feed)))


def _whole(model, names, feed):
    """The model's values `names`, exposed as outputs (the slow reference: the whole graph runs)."""
    m = ir.serde.deserialize_model(model)
    for n in names:
        rewrite.apply(ExposeValue(), m, Request(n, (), np.dtype(np.float32)))
    return _run(rewrite.to_proto(m), feed, names)


@pytest.mark.parametrize("build,x_shape", [(mlp, (9, 12)), (small_cnn, (3, 2, 8, 8))])
def test_a_middle_cut_reproduces_the_whole_model_there(build, x_shape):
    rng = np.random.default_rng(0)
    model = build(rng)
    nodes = list(model.graph.node)
    lo, hi = 1, len(nodes) - 1  # drop the first and the last node
    reads = [i for i in nodes[lo].input if i and i not in {t.name for t in model.graph.initializer}]
    keeps = [nodes[hi - 1].output[0]]
    x = rng.standard_normal(x_shape).astype(np.float32)
    ref = _whole(model, reads + keeps, {"x": x})
    m = ir.serde.deserialize_model(model)
    cut = Cut(tuple(range(lo, hi)), tuple((n, TensorProto.FLOAT, ref[n].ndim) for n in reads), tuple(keeps))
    rewrite.apply(ExtractSegment(), m, cut)
    seg = rewrite.to_proto(m, model)
    assert len(seg.graph.node) == hi - lo and [i.name for i in seg.graph.input] == reads
    used = {i for n in seg.graph.node for i in n.input}
    assert all(t.name in used for t in seg.graph.initializer)  # nothing the cut does not read
    got = _run(seg, {n: ref[n] for n in reads}, keeps)
    np.testing.assert_array_equal(got[keeps[0]], ref[keeps[0]])


def test_check_says_why_it_does_not_apply():
    m = ir.serde.deserialize_model(mlp(np.random.default_rng(1)))
    assert "not all in a graph" in ExtractSegment().check(m, Cut((99,), (), ()))
    assert "not made by the kept nodes" in ExtractSegment().check(m, Cut((0,), (), ("y",)))
    assert "no value 'nope'" in ExtractSegment().check(m, Cut((0,), (("nope", 1, 2),), ("h1",)))
