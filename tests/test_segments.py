"""Sequential mode by graph segments: the same result as a whole pass per stage, each node run once."""

import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs import PruneConfig, prune
from onnx_lobs import passes, pruning, segments
from onnx_lobs.graph import find_layers
from onnx_lobs.modelio import load_model
from onnx_lobs.topology import layer_stages

from .builders import make_model, mlp, small_cnn, tensor, vi
from .subgraphs import if_model, shared_model


def residual_model(rng):
    """Two inputs, a residual Add, a side branch that reads the model input late, a MatMul."""
    c = 4

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = [tensor("W1", w(c, 3, 3, 3)), tensor("b1", w(c)), tensor("W2", w(c, c, 3, 3)),
             tensor("W3", w(c, c, 1, 1)), tensor("Wg", w(c * 8 * 8, 6)), tensor("Wz", w(5, 6))]
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "W2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["ar", "b"], ["res"]),
             helper.make_node("Conv", ["res", "W3"], ["c"], name="conv3"),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "Wg"], ["g"], name="fc"),
             helper.make_node("Gemm", ["z", "Wz"], ["zz"], name="side", transB=0),
             helper.make_node("Add", ["g", "zz"], ["y"])]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 3, 8, 8]), vi("z", TensorProto.FLOAT, ["N", 5])],
                      [vi("y", TensorProto.FLOAT, ["N", 6]), vi("res", TensorProto.FLOAT, ["N", c, 8, 8])], inits)


def _feeds(model, rng, n=300):
    feed = {}
    for i in model.graph.input:
        dims = [d.dim_value if d.dim_value else n for d in i.type.tensor_type.shape.dim]
        feed[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feed


def _weights(model):
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def load_model_from(model):
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "m.onnx")
    onnx.save_model(model, path)
    try:
        return load_model(path)
    finally:
        os.remove(path)
        os.rmdir(folder)


def _run_both(model, feed, monkeypatch, **kw):
    config = dict(default_exclude=False, sparsity=0.6, sequential=True, batch_size=64, **kw)
    by_segments = prune(model, feed, PruneConfig(**config))
    with monkeypatch.context() as m:
        m.setattr(pruning, "plan", lambda *a: None)
        by_passes = prune(model, feed, PruneConfig(**config))
    return by_segments, by_passes


@pytest.mark.parametrize("build", [mlp, small_cnn, residual_model, shared_model])
@pytest.mark.parametrize("method", ["lobs", "sparsegpt"])
def test_segments_give_the_result_of_whole_passes(build, method, monkeypatch):
    rng = np.random.default_rng(3)
    model = build(rng)
    assert segments.plan(model, layer_stages(model, find_layers(load_model_from(model))[0])) is not None
    a, b = _run_both(model, _feeds(model, rng), monkeypatch, method=method)
    # onnxruntime fuses differently in a segment than in the whole graph (Conv+Add, say), so the
    # float32 activations differ in the last bits, and the solves amplify that a little.
    wa, wb = _weights(a.model), _weights(b.model)
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=0, atol=2e-3 * max(1.0, np.abs(wb[name]).max()))
        assert np.mean((wa[name] == 0) == (wb[name] == 0)) > 0.99
    assert a.report.samples == b.report.samples
    ra = {r.name: r for r in a.report.layers}
    for r in b.report.layers:
        if r.error is not None:
            assert ra[r.name].error == pytest.approx(r.error, rel=1e-3, abs=1e-9)
            assert ra[r.name].propagated_error == pytest.approx(r.propagated_error, rel=1e-3, abs=1e-9)
    assert a.report.fidelity["rel_l2"] == pytest.approx(b.report.fidelity["rel_l2"], rel=1e-3)


def test_a_stage_with_a_layer_on_a_model_input_beside_one_on_computed_values(monkeypatch):
    """conv1 left dense: one stage holds side (reading the model input z as it is) and conv2 (whose
    input needs nodes run), so the segment takes z as an input that none of its nodes reads."""
    rng = np.random.default_rng(6)
    model = residual_model(rng)
    loaded = load_model_from(model)
    stages = layer_stages(model, [l for l in find_layers(loaded)[0] if l.name != "conv1"])
    assert [sorted(l.name for l in s) for s in stages][0] == ["conv2", "side"]
    a, b = _run_both(model, _feeds(model, rng), monkeypatch, exclude=["conv1"])
    wa, wb = _weights(a.model), _weights(b.model)
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=0, atol=2e-3 * max(1.0, np.abs(wb[name]).max()))
    assert a.report.fidelity["rel_l2"] == pytest.approx(b.report.fidelity["rel_l2"], rel=1e-3)


def test_every_node_runs_at_most_once_and_only_what_the_stages_need():
    rng = np.random.default_rng(4)
    model = residual_model(rng)
    layers = find_layers(load_model_from(model))[0]
    stages = layer_stages(model, layers)
    plan = segments.plan(model, stages)
    assert len(plan) == len(stages)
    seen = [k for seg in plan for k in seg.nodes]
    assert len(seen) == len(set(seen))
    names = [n.name for n in model.graph.node]
    # The final Add and the last layers feed no stage: never run by the segments.
    assert "fc" not in {names[k] for k in seen}
    # Each stored tensor is read later or exposed; model inputs are read where needed.
    for s, seg in enumerate(plan):
        later = set().union(*(set(p.reads) | set(p.exposed) for p in plan[s + 1:])) if s + 1 < len(plan) else set()
        assert set(seg.keeps) <= later | set(seg.exposed)
    assert "z" in set().union(*(set(p.reads) for p in plan))


def test_layers_inside_a_subgraph_fall_back_to_whole_passes(monkeypatch):
    rng = np.random.default_rng(5)
    model = if_model(rng)
    layers = find_layers(load_model_from(model))[0]
    assert any(u.x_scope for layer in layers for u in layer.uses)
    assert segments.plan(model, layer_stages(model, layers)) is None


def test_the_temporary_folder_is_removed_even_on_failure(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    model = small_cnn(rng)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prune(model, _feeds(model, rng, 100), PruneConfig(default_exclude=False, sequential=True))
    assert os.listdir(tmp_path) == []

    def boom(*a, **k):
        raise RuntimeError("solver failed")

    monkeypatch.setattr(passes, "solve_layer", boom)
    with pytest.raises(RuntimeError):
        prune(model, _feeds(model, rng, 100), PruneConfig(default_exclude=False, sequential=True))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("budget", [0, 40_000, None])  # every cut tensor on disk, some, none
def test_segments_match_whole_passes_exactly_in_float64(monkeypatch, budget):
    if budget is not None:
        monkeypatch.setattr(segments, "MEMORY_BYTES", budget)
    rng = np.random.default_rng(7)
    model = mlp(rng, sizes=(12, 24, 16, 6), dtype=np.float64)
    x = rng.standard_normal((300, 12))
    a, b = _run_both(model, {"x": x}, monkeypatch, method="obc")
    wa, wb = _weights(a.model), _weights(b.model)
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-9, atol=1e-12)


def test_the_store_keeps_tensors_in_memory_while_its_budget_lasts_and_on_disk_beyond():
    store = segments.Store(budget=3200)
    a, b, c = np.arange(250.0), np.ones((10, 20), np.float32), np.full(300, 7.0)  # 2000, 800, 2400 bytes
    store.put("d", "a", 0, a)
    store.put("p", "b", 0, b)
    store.put("d", "c", 0, c)  # over the budget: written
    assert store.bytes == 2800 and len(os.listdir(store.folder)) == 1
    for side, name, v in (("d", "a", a), ("p", "b", b), ("d", "c", c)):
        np.testing.assert_array_equal(store.get(side, name, 0), v)
    store.drop("a", 1)
    assert store.bytes == 800
    store.put("p", "c", 0, c)  # room again: kept
    assert store.bytes == 800 + 2400
    store.drop("c", 1)
    assert store.bytes == 800 and os.listdir(store.folder) == []
    store.close()
    assert not os.path.exists(store.folder)


def test_a_tail_fed_the_values_it_reads_computes_the_models_outputs():
    """segments.tails: the values made before the start (and the graph inputs) that later nodes
    read, the outputs made from there on; the cut model run on them gives the whole model's."""
    from onnx_lobs.runtime import make_session

    rng = np.random.default_rng(5)
    w = [rng.standard_normal((4, 4)).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w1"], ["a"]), helper.make_node("Add", ["a", "r"], ["s"]),
             helper.make_node("MatMul", ["x", "w2"], ["b"]), helper.make_node("Add", ["s", "b"], ["y"])]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(a, f"w{k}") for k, a in enumerate(w)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    h = x @ w[0]
    r = np.maximum(h, 0)
    y = r @ w[1] + r + x @ w[2]
    assert segments.first_reads(model, {"w0", "w1", "w2", "r"}) == {"w0": 0, "w1": 2, "w2": 4, "r": 2}
    t2, t4 = segments.tails(model, [2, 4])
    assert (t2.reads, t2.outputs) == (["r", "x"], ["y"]) and (t4.reads, t4.outputs) == (["s", "x"], ["y"])
    types = {n: (TensorProto.FLOAT, 2) for n in ("r", "s", "x")}
    got = make_session(segments.tail_model(model, t2, types)).run(["y"], {"r": r, "x": x})[0]
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)
    got = make_session(segments.tail_model(model, t4, types)).run(["y"], {"s": r @ w[1] + r, "x": x})[0]
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)
    assert len(model.graph.node) == 6  # the caller's model is left alone
