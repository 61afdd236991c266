"""Exposing inner tensors and grouping layers into stages."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs.graph import find_layers
from onnx_lobs.modelio import LoadedModel
from onnx_lobs.activations import expose
from onnx_lobs.topology import layer_stages
from tests import subgraphs
from tests.builders import make_model, mlp, tensor, vi


def layers_of(model):
    return find_layers(LoadedModel(model, "m.onnx"))


def test_expose_returns_the_tensors_seen_inside_a_loop():
    rng = np.random.default_rng(2)
    model = subgraphs.loop_model(rng, trips=3)
    layer = layers_of(model)[0][0]
    u = layer.uses[0]
    aug, exposed = expose(model, [(u.x, u.x_scope, np.float32)])
    e = next(iter(exposed.values()))
    x = rng.standard_normal((4, 5)).astype(np.float32)
    sess = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    stacked = sess.run([e.output], {"x": x})[0]
    w = numpy_helper.to_array(model.graph.initializer[0])
    h, expect = x, []
    for _ in range(3):
        expect.append(h)
        h = np.maximum(h @ w, 0)
    np.testing.assert_allclose(stacked, np.stack(expect), rtol=1e-5, atol=1e-6)
    assert e.stacked == 1


def test_stages_follow_dependencies():
    rng = np.random.default_rng(3)
    layers, _ = layers_of(mlp(rng))
    model = mlp(rng)
    layers, _ = layers_of(model)
    assert [[l.name for l in s] for s in layer_stages(model, layers)] == [["fc1"], ["fc2"], ["fc3"]]
    # two parallel MatMuls on the same input share a stage; the one after both comes next
    nodes = [helper.make_node("MatMul", ["x", "A"], ["a"], name="left"),
             helper.make_node("MatMul", ["x", "B"], ["b"], name="right"),
             helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("MatMul", ["s", "C"], ["y"], name="after")]
    w = [tensor(n, rng.standard_normal((4, 4)).astype(np.float32)) for n in "ABC"]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 4])], [vi("y", TensorProto.FLOAT, ["N", 4])], w)
    layers, _ = layers_of(model)
    assert [[l.name for l in s] for s in layer_stages(model, layers)] == [["left", "right"], ["after"]]
    # a layer inside a Loop body after an outer layer
    model = subgraphs.loop_model(rng)
    layers, _ = layers_of(model)
    assert len(layer_stages(model, layers)) == 1
