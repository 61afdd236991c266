"""Layer inputs into accumulators: layers that read one tensor alike share one Hessian."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs import PruneConfig, activations, prune, segments
from onnx_lobs.activations import Collector, share
from onnx_lobs.graph import find_layers
from onnx_lobs.modelio import as_loaded

from .builders import make_model, tensor, vi


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def attention_like(rng, d=16):
    """q/k/v MatMuls of different widths (GQA) on one tensor, gate/up on another, a Gemm with
    transA on the first (other columns), and a down projection."""
    inits = [tensor("Wq", _w(rng, d, d)), tensor("Wk", _w(rng, d, d // 2)), tensor("Wv", _w(rng, d, d // 2)),
             tensor("Wo", _w(rng, 2 * d, d)), tensor("Wg", _w(rng, d, 2 * d)), tensor("Wu", _w(rng, d, 2 * d)),
             tensor("Wd", _w(rng, 2 * d, d)), tensor("Wt", _w(rng, 4, 3))]
    n = helper.make_node
    nodes = [n("Relu", ["x"], ["h"]),
             n("MatMul", ["h", "Wq"], ["q"], name="q"), n("MatMul", ["h", "Wk"], ["k"], name="k"),
             n("MatMul", ["h", "Wv"], ["v"], name="v"),
             n("Concat", ["q", "k", "v"], ["qkv"], axis=1), n("MatMul", ["qkv", "Wo"], ["o"], name="o"),
             n("Add", ["o", "x"], ["r"]),
             n("MatMul", ["r", "Wg"], ["g"], name="gate"), n("MatMul", ["r", "Wu"], ["u"], name="up"),
             n("Sigmoid", ["g"], ["gs"]), n("Mul", ["gs", "u"], ["gu"]),
             n("MatMul", ["gu", "Wd"], ["y"], name="down"),
             n("Slice", ["h", "s0", "s1", "s2"], ["h4"]),
             n("Gemm", ["h4", "Wt"], ["t"], name="side", transA=1)]
    inits += [tensor("s0", np.array([0], np.int64)), tensor("s1", np.array([4], np.int64)),
              tensor("s2", np.array([0], np.int64))]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", d])],
                      [vi("y", TensorProto.FLOAT, ["N", d]), vi("t", TensorProto.FLOAT, [4, 3])], inits)


def _collectors(model, joint=False):
    layers, _ = find_layers(as_loaded(model))
    return {layer.name: Collector(layer, joint) for layer in layers}


def test_layers_reading_one_tensor_alike_share_their_accumulators():
    cs = _collectors(attention_like(np.random.default_rng(0)))
    folding = share(list(cs.values()))
    assert cs["q"].calib is cs["k"].calib is cs["v"].calib and cs["q"].hold is cs["v"].hold
    assert cs["gate"].calib is cs["up"].calib
    assert cs["o"].calib is not cs["q"].calib and cs["side"].calib is not cs["q"].calib
    assert [c.layer.name for c in folding] == ["q", "o", "gate", "down", "side"]


def test_only_empty_accumulators_are_shared_and_each_folds_once():
    cs = _collectors(attention_like(np.random.default_rng(0)))
    node = cs["k"].layer.uses[0].node
    cs["k"].fold(False, node, np.ones((3, 16), np.float32), None)  # k already holds a batch
    folding = share(list(cs.values()))
    assert cs["q"].calib is cs["v"].calib and cs["k"].calib is not cs["q"].calib
    assert {"q", "k"} <= {c.layer.name for c in folding} and "v" not in {c.layer.name for c in folding}
    again = share(list(cs.values()))  # a second pass over the same collectors folds q's sums once
    assert sum(c.calib is cs["q"].calib for c in again) == 1


@pytest.mark.parametrize("attrs", [{"strides": [2, 2]}, {"kernel": (1, 3)}, {"pads": [1, 1, 1, 1]}])
def test_convolutions_on_one_input_share_only_when_their_columns_agree(attrs):
    rng = np.random.default_rng(1)
    kernel = attrs.get("kernel", (3, 1))
    other = {k: v for k, v in attrs.items() if k != "kernel"}
    inits = [tensor("A", _w(rng, 4, 2, 3, 1)), tensor("B", _w(rng, 6, 2, 3, 1)), tensor("C", _w(rng, 5, 2, *kernel))]
    nodes = [helper.make_node("Conv", ["x", "A"], ["a"], name="a"),
             helper.make_node("Conv", ["x", "B"], ["b"], name="b"),  # more outputs, same columns
             helper.make_node("Conv", ["x", "C"], ["c"], name="c", **other)]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                       [vi(n, TensorProto.FLOAT, [None] * 4) for n in "abc"], inits)
    cs = _collectors(model)
    share(list(cs.values()))
    assert cs["a"].calib is cs["b"].calib and cs["c"].calib is not cs["a"].calib


def _unshared(monkeypatch):
    for module in (activations, segments):
        monkeypatch.setattr(module, "share", lambda collectors: list(collectors))


@pytest.mark.parametrize("config", [
    dict(sparsity=0.5), dict(pattern=(2, 4), sequential=False), dict(sparsity=0.5, sequential=True),
    dict(global_sparsity=0.5), dict(method="obc", sparsity=0.6, sequential=True)])
def test_shared_hessians_give_the_same_result_as_one_per_layer(config, monkeypatch):
    rng = np.random.default_rng(2)
    model = attention_like(rng)
    data = {"x": rng.standard_normal((200, 16)).astype(np.float32)}
    cfg = PruneConfig(default_exclude=False, **config)
    shared = prune(model, data, cfg)
    with monkeypatch.context() as m:
        _unshared(m)
        alone = prune(model, data, cfg)
    for a, b in zip(shared.model.graph.initializer, alone.model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    for ra, rb in zip(shared.report.layers, alone.report.layers):
        assert (ra.name, ra.sparsity, ra.error, ra.holdout_error) == (rb.name, rb.sparsity, rb.error, rb.holdout_error)
    assert shared.report.fidelity == alone.report.fidelity
