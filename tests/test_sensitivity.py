"""The output probe against numpy: the squared relative change of every float output."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs.sensitivity import OutputProbe, output_probe


def _model(w: np.ndarray):
    """y = x @ w, and an integer output (its argmax) that the probe must leave out."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("ArgMax", ["y"], ["k"], axis=1)]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("k", TensorProto.INT64, ["N", 1])],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_error_is_the_squared_relative_change_of_the_float_outputs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((5, 6)).astype(np.float32)} for _ in range(3)]
    dense = [[f["x"] @ w, np.argmax(f["x"] @ w, axis=1)[:, None]] for f in feeds]
    probe = OutputProbe(feeds, dense)
    assert probe.error(_model(w)) < 1e-12
    w2 = w.copy()
    w2[2] = 0.0
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    want = np.sum((x @ w2 - x @ w) ** 2) / np.sum((x @ w) ** 2)
    np.testing.assert_allclose(probe.error(_model(w2)), want, rtol=1e-5)
    assert probe.runs == 2


def test_output_probe_takes_whole_feeds_up_to_the_samples_asked():
    feeds = [{"x": np.ones((10, 6), np.float32)} for _ in range(4)]
    dense = [[np.ones((10, 3), np.float32)] for _ in range(4)]
    assert len(output_probe(feeds, dense, samples=15).feeds) == 3  # at least PROBE_FEEDS feeds...
    assert len(output_probe(feeds, dense, samples=5).feeds) == 2  # 20 samples: 4 x 5
    big = [{"x": np.ones((40, 6), np.float32)} for _ in range(4)]
    assert len(output_probe(big, [[np.ones((40, 3), np.float32)]] * 4, samples=15).feeds) == 2  # ... up to 4x
    assert len(output_probe(feeds, dense, samples=1000).feeds) == 4
    assert output_probe([], []) is None
    assert output_probe(feeds, [[np.zeros((10, 3), np.float32)]] * 4) is None  # nothing to be relative to


def _scaled_model(scale: np.ndarray, shift: np.ndarray):
    """y = x * scale + shift on [N, C, A]: a detector's head, channels of very different sizes."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 5])],
                              [numpy_helper.from_array(scale.astype(np.float32).reshape(1, 2, 1), "s"),
                               numpy_helper.from_array(shift.astype(np.float32).reshape(1, 2, 1), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_error_weighs_each_channel_of_a_rank_3_output_alike():
    """Box coordinates in pixels beside class scores under 1: a change of 10% in either channel
    costs the same, (0.1^2) / 2 channels, though the first holds nearly all of the energy."""
    rng = np.random.default_rng(1)
    scale = np.array([300.0, 0.5])
    feeds = [{"x": rng.uniform(0.5, 1.5, (4, 2, 5)).astype(np.float32)} for _ in range(3)]
    dense = [[(f["x"] * scale.reshape(1, 2, 1).astype(np.float32))] for f in feeds]
    probe = OutputProbe(feeds, dense)
    assert probe.error(_scaled_model(scale, np.zeros(2))) < 1e-12
    for k in range(2):
        changed = scale.copy()
        changed[k] *= 1.1
        np.testing.assert_allclose(probe.error(_scaled_model(changed, np.zeros(2))), 0.01 / 2, rtol=1e-4)


def test_a_channel_near_zero_is_measured_against_a_floor():
    """An always-zero channel that moves by 1e-3 counts against CHANNEL_FLOOR of the mean channel
    energy, not against its own zero energy."""
    from onnx_lobs import sensitivity
    scale = np.array([1.0, 0.0])
    feeds = [{"x": np.ones((2, 2, 5), np.float32)} for _ in range(3)]
    dense = [[(f["x"] * scale.reshape(1, 2, 1).astype(np.float32))] for f in feeds]
    probe = OutputProbe(feeds, dense)
    got = probe.error(_scaled_model(scale, np.array([0.0, 1e-3])))
    energy = 3 * 2 * 5 * 1.0  # channel 0's; the mean over the two channels is half of it
    want = (3 * 2 * 5 * 1e-6) / (2 * sensitivity.CHANNEL_FLOOR * energy / 2)
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_error_with_overridden_initializers_matches_a_written_model():
    """The probe's one session with the weights as inputs measures what a session of the changed
    model measures; names it was not opened for give None (the caller writes them instead)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((5, 6)).astype(np.float32)} for _ in range(3)]
    dense = [[f["x"] @ w, np.argmax(f["x"] @ w, axis=1)[:, None]] for f in feeds]
    probe = OutputProbe(feeds, dense)
    model = _model(w)
    assert probe.error_with(model, {"w": w}) is None  # not opened yet
    probe.overridable(model, {"w", "not-an-initializer"})
    w2 = w.copy()
    w2[1] = 0.0
    np.testing.assert_allclose(probe.error_with(model, {"w": w2}), probe.error(_model(w2)), rtol=1e-6)
    np.testing.assert_allclose(probe.error_with(model, {"w": w2}, feeds=1), probe.error(_model(w2), 1), rtol=1e-6)
    assert probe.error_with(model, {"w": w}) < 1e-12
    assert probe.error_with(model, {"other": w}) is None
    assert [i.name for i in model.graph.input] == ["x"]  # the caller's model is left alone



def test_a_batch_is_split_for_the_cheaper_probes_only_where_it_is_one():
    """A dynamic batch larger than the cheaper probes' values need is split in two (the parts run,
    not sliced); every probe on all feeds measures what it did. A fixed batch, or one that the
    values need whole, is left as it was."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((n, 6)).astype(np.float32)} for n in (12, 5)]
    dense = [[f["x"] @ w, np.argmax(f["x"] @ w, axis=1)[:, None]] for f in feeds]
    w2 = w.copy()
    w2[3] = 0.0
    whole = OutputProbe(list(feeds), list(dense)).error(_model(w2))
    probe = OutputProbe(list(feeds), list(dense))
    probe.overridable(_model(w), {"w"}, tail_feeds=2, values=12)  # 3 float values a sample: 4 samples
    assert probe.single == 1 and [f["x"].shape[0] for f in probe.feeds] == [4, 8, 5]
    x = feeds[0]["x"][:4].astype(np.float64)
    np.testing.assert_allclose(probe.error_with(_model(w), {"w": w2}, probe.single),
                               np.sum((x @ w2 - x @ w) ** 2) / np.sum((x @ w) ** 2), rtol=1e-5)
    np.testing.assert_allclose(probe.error_with(_model(w), {"w": w2}), whole, rtol=1e-5)
    np.testing.assert_allclose(probe.error(_model(w2)), whole, rtol=1e-5)
    for model, values in ((_model(w), 100), (_fixed(w, 12), 12)):
        kept = OutputProbe(list(feeds[:1]), list(dense[:1]))
        kept.overridable(model, {"w"}, tail_feeds=1, values=values)
        assert kept.single == 1 and [f["x"].shape[0] for f in kept.feeds] == [12]
    # feeds of one sample each: the first that hold the values, whole
    ones = [{"x": f["x"][i:i + 1]} for f in feeds[:1] for i in range(3)]
    for values, least, single in ((3, 1, 1), (3, 2, 2), (6, 1, 2), (100, 1, 3)):
        few = OutputProbe(list(ones), [[o["x"] @ w, np.argmax(o["x"] @ w, axis=1)[:, None]] for o in ones])
        few.overridable(_model(w), {"w"}, tail_feeds=3, values=values, least=least)
        assert few.single == single and len(few.feeds) == 3


def _fixed(w: np.ndarray, batch: int):
    """_model with a fixed batch."""
    model = _model(w)
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = batch
    return model

def _branchy(ws: dict):
    """x -> MatMul w1 -> Relu -> r; s = r + r @ w2; y = s @ w3 + x @ w4, with w3 a Constant node's
    output and an early output h (made before the later layers: no tail of theirs changes it)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["r2"]), helper.make_node("Add", ["r", "r2"], ["s"]),
             helper.make_node("Constant", [], ["w3"], value=numpy_helper.from_array(ws["w3"], "c")),
             helper.make_node("MatMul", ["s", "w3"], ["a"]), helper.make_node("MatMul", ["x", "w4"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    inits = [numpy_helper.from_array(ws[k], k) for k in ("w1", "w2", "w4")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 5]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_tails_measure_what_the_whole_changed_model_measures(monkeypatch):
    """Probes through tails (the graph from a layer's first reader on, fed the dense values it
    reads) and through the Constant node made an input agree with sessions of written models;
    an unchanged tail measures exactly 0, and the caller's model is left alone."""
    from onnx_lobs import sensitivity
    from onnx_lobs.runtime import make_session

    rng = np.random.default_rng(4)
    shapes = {"w1": (6, 5), "w2": (5, 5), "w3": (5, 3), "w4": (6, 3)}
    ws = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    model = _branchy(ws)
    feeds = [{"x": rng.standard_normal((4, 6)).astype(np.float32)} for _ in range(4)]
    sess = make_session(model)
    dense = [sess.run(["h", "y"], f) for f in feeds]
    probe = OutputProbe(feeds, dense)
    monkeypatch.setattr(sensitivity, "TAILS", 4)
    probe.overridable(model, set(shapes), tail_feeds=3)
    # the start, then the first readers of w2, w3, w4, counted without the Constant node (now an
    # initializer); each tail takes as inputs only the weights of the layers it serves
    assert [t.cut.start for t in probe._tails] == [0, 2, 4, 5]
    assert [t.names for t in probe._tails] == [{"w1"}, {"w2"}, {"w3"}, {"w4"}]
    assert len(model.graph.node) == 8 and [i.name for i in model.graph.input] == ["x"]
    for name, start in [("w1", 0), ("w2", 2), ("w3", 4), ("w4", 5)]:
        changed = ws[name].copy()
        changed[1] = 0.0
        tail = probe._tail_for({name: changed}, 3)
        assert (tail and tail.cut.start) == start
        unchanged = probe.error_with(model, {name: ws[name]}, feeds=3)
        assert unchanged == 0.0
        written = _branchy({**ws, name: changed})
        np.testing.assert_allclose(probe.error_with(model, {name: changed}, feeds=3), probe.error(written, 3),
                                   rtol=1e-5)
        np.testing.assert_allclose(probe.error_with(model, {name: changed}), probe.error(written), rtol=1e-5)
    both = {"w2": np.zeros_like(ws["w2"]), "w4": np.zeros_like(ws["w4"])}
    assert probe._tail_for(both, 3) is None  # the tail from 2 does not take w4: the whole session does
    np.testing.assert_allclose(probe.error_with(model, both, feeds=3),
                               probe.error(_branchy({**ws, **both}), 3), rtol=1e-5)


def test_tails_are_kept_latest_first_while_the_values_they_read_fit_the_budget(monkeypatch):
    from onnx_lobs import sensitivity

    rng = np.random.default_rng(6)
    ws = {k: rng.standard_normal(s).astype(np.float32) for k, s in
          {"w1": (6, 5), "w2": (5, 5), "w3": (5, 3), "w4": (6, 3)}.items()}
    model = _branchy(ws)
    feeds = [{"x": rng.standard_normal((4, 6)).astype(np.float32)} for _ in range(3)]
    session = sensitivity.make_session(model)
    probe = OutputProbe(feeds, [session.run(["h", "y"], f) for f in feeds])
    monkeypatch.setattr(sensitivity, "TAIL_VALUE_BYTES", 100)  # the reads of 3 feeds take more
    probe.overridable(model, set(ws), tail_feeds=3)
    # only the tail from the start, which reads the feeds alone, is kept: it serves every layer
    assert [(t.cut.start, t.names) for t in probe._tails] == [(0, set(ws))] and probe.can_feed({"w4"})
    changed = {"w4": np.zeros_like(ws["w4"])}
    np.testing.assert_allclose(probe.error_with(model, changed, 3), probe.error(_branchy({**ws, **changed}), 3),
                               rtol=1e-5)
    # 3 feeds of 4 rows in float32: the tail from 5 reads a (48 bytes a feed), from 4 also s (80),
    # from 2 also r (80): 400 bytes hold the latest two, and the one from the start, which then
    # serves w1 and w2
    monkeypatch.setattr(sensitivity, "TAIL_VALUE_BYTES", 400)
    probe.overridable(model, set(ws), tail_feeds=3)
    assert [(t.cut.start, t.names) for t in probe._tails] == [(0, {"w1", "w2"}), (4, {"w3"}), (5, {"w4"})]
    assert probe._tail_for({"w2": ws["w2"]}, 3).cut.start == 0
    for name in ("w1", "w2", "w4"):
        changed = {name: np.zeros_like(ws[name])}
        np.testing.assert_allclose(probe.error_with(model, changed, 3),
                                   probe.error(_branchy({**ws, **changed}), 3), rtol=1e-5)
