"""prune() end to end: reported errors equal measured ones, weights land where they live, inputs untouched."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lobs
from onnx_lobs import LobsError, PruneConfig, prune
from onnx_lobs.calibration import HOLDOUT_FRACTION
from onnx_lobs.report import format_table
from tests import subgraphs
from tests.builders import make_model, mlp, single_layer, small_cnn, tensor, vi


def run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def split(n):
    h = max(n // HOLDOUT_FRACTION, 1)
    return slice(0, n - h), slice(n - h, n)


class Reader:
    """A CalibrationDataReader over x in feeds of the given size: it can be read once."""

    def __init__(self, x, size):
        self.feeds = [{"x": x[i:i + size]} for i in range(0, len(x), size)]

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("case", ["gemm", "gemm_t", "matmul3d", "conv", "conv_groups", "conv1d"])
@pytest.mark.parametrize("method", ["lobs", "magnitude"])
def test_reported_error_equals_the_measured_change_of_the_linear_output(case, method):
    rng = np.random.default_rng(1)
    if case == "gemm":
        model = single_layer("Gemm", rng.standard_normal((6, 10)), (1, 10), bias=rng.standard_normal(6),
                             attrs={"transB": 1, "alpha": 0.7, "beta": 1.5})
        x = rng.standard_normal((200, 10))
    elif case == "gemm_t":
        model = single_layer("Gemm", rng.standard_normal((10, 6)), (1, 10), bias=rng.standard_normal((1, 6)))
        x = rng.standard_normal((200, 10))
    elif case == "matmul3d":
        model = single_layer("MatMul", rng.standard_normal((10, 6)), (1, 3, 10))
        x = rng.standard_normal((100, 3, 10))
    elif case == "conv":
        model = single_layer("Conv", rng.standard_normal((4, 3, 3, 3)), (1, 3, 7, 7), bias=rng.standard_normal(4),
                             attrs={"strides": [2, 1], "pads": [1, 0, 1, 2]})
        x = rng.standard_normal((60, 3, 7, 7))
    elif case == "conv_groups":
        model = single_layer("Conv", rng.standard_normal((6, 2, 3, 3)), (1, 4, 6, 6), bias=rng.standard_normal(6),
                             attrs={"group": 2, "strides": [2, 2], "auto_pad": "SAME_LOWER"})
        x = rng.standard_normal((60, 4, 6, 6))
    else:
        model = single_layer("Conv", rng.standard_normal((4, 2, 5)), (1, 2, 20),
                             attrs={"strides": [3], "dilations": [2], "pads": [2, 1]})
        x = rng.standard_normal((80, 2, 20))
    x = x.astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.6, method=method))
    rec = result.report.layers[0]
    calib, hold = split(len(x))
    for part, reported in ((calib, rec.error), (hold, rec.holdout_error)):
        y0 = run(model, {"x": x[part]})[0].astype(np.float64)
        y1 = run(result.model, {"x": x[part]})[0].astype(np.float64)
        # rows of the linear map: samples (x positions); the output units sit on axis 1 for Conv
        d = np.moveaxis(y1 - y0, 1, -1) if case.startswith("conv") else (y1 - y0)
        d = d.reshape(-1, d.shape[-1])
        measured = 0.5 * np.mean(np.sum(d ** 2, axis=1))
        assert reported == pytest.approx(measured, rel=1e-4)
    assert rec.sparsity == pytest.approx(0.6, abs=0.02)


def test_lobs_beats_magnitude_and_updates_the_bias():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((500, 3))
    x = (base @ rng.standard_normal((3, 12)) + 0.1 * rng.standard_normal((500, 12)) + 1.0).astype(np.float32)
    model = single_layer("Gemm", rng.standard_normal((8, 12)), (1, 12), bias=rng.standard_normal(8),
                         attrs={"transB": 1})
    lobs = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.75))
    mag = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.75, method="magnitude"))
    assert lobs.report.layers[0].error < 0.5 * mag.report.layers[0].error
    w0, w1 = weights(model), weights(lobs.model)
    assert not np.allclose(w0["B"], w1["B"])  # the bias took part in the compensation
    np.testing.assert_array_equal(weights(mag.model)["B"], w0["B"])
    mask = lobs.masks["W"]
    assert mask.shape == w0["W"].shape and mask.sum() == 72
    assert np.all(w1["W"][mask] == 0) and np.all(w1["W"][~mask] != 0)


def test_input_model_file_and_object_are_not_modified(tmp_path):
    rng = np.random.default_rng(3)
    model = mlp(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    before = model.SerializeToString()
    x = rng.standard_normal((100, 12)).astype(np.float32)
    prune(str(path), {"x": x}, PruneConfig(default_exclude=False, sparsity=0.5))
    prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.5))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert model.SerializeToString() == before


def test_layer_sparsity_overrides_exclusions_and_metadata():
    rng = np.random.default_rng(4)
    model = mlp(rng)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    cfg = PruneConfig(default_exclude=False, sparsity=0.5, layer_sparsity={"fc*": 0.25, "fc2": 0.75}, exclude=["fc3"])
    result = prune(model, {"x": x}, cfg)
    recs = {r.name: r for r in result.report.layers}
    assert recs["fc1"].sparsity == pytest.approx(0.25)
    assert recs["fc2"].sparsity == pytest.approx(0.75)
    assert recs["fc3"].skipped.startswith("excluded")
    np.testing.assert_array_equal(weights(result.model)["W3"], weights(model)["W3"])
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert "onnx_lobs" in meta and '"method": "auto"' in meta["onnx_lobs"]
    total = sum(r.params for r in result.report.layers)
    zeros = sum(int(np.sum(w == 0)) for k, w in weights(result.model).items() if k.startswith("W"))
    assert result.report.sparsity == pytest.approx(zeros / total)


def test_max_error_keeps_each_layer_within_the_bound():
    rng = np.random.default_rng(5)
    model = small_cnn(rng)
    x = rng.standard_normal((200, 2, 8, 8)).astype(np.float32)
    for method in ("lobs", "magnitude"):
        result = prune(model, {"x": x}, PruneConfig(default_exclude=False, max_error=0.05, method=method))
        for rec in result.report.layers:
            assert rec.rel_error <= 0.05 + 1e-9
            assert rec.sparsity > 0.1


def test_chain_bound_holds_and_is_reported():
    rng = np.random.default_rng(6)
    for model, shape in ((mlp(rng), (12,)), (small_cnn(rng), (2, 8, 8))):
        x = rng.standard_normal((300,) + shape).astype(np.float32)
        report = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.7)).report
        b = report.bound
        assert b["measured_rms"] > 0
        assert b["measured_rms"] <= b["bound_spectral"] * (1 + 1e-6)
        assert b["bound_spectral"] <= b["bound_frobenius"] * (1 + 1e-9)
        assert report.fidelity["samples"] == 30


def test_shared_weight_is_pruned_once_with_the_summed_hessian():
    rng = np.random.default_rng(7)
    model = subgraphs.shared_model(rng)
    x = rng.standard_normal((400, 4)).astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.5))
    recs = {r.name: r for r in result.report.layers}
    assert "weight is also used by" in recs["mm_v"].skipped
    dw = (weights(result.model)["W"] - weights(model)["W"]).astype(np.float64)
    xc = x[split(400)[0]].astype(np.float64)
    both = np.concatenate([xc, np.maximum(xc, 0)])  # the inputs of mm_a and of mm_b
    expected = 0.5 * np.mean(np.sum((both @ dw) ** 2, axis=1))
    assert recs["mm_a"].error == pytest.approx(expected, rel=1e-6)


def test_weights_inside_if_branches_and_constant_nodes_are_written_back():
    rng = np.random.default_rng(8)
    model = subgraphs.if_model(rng)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    x[::2] = np.abs(x[::2])
    x[1::2] = -np.abs(x[1::2])
    feed = {"x": x}
    result = prune(model, feed, PruneConfig(default_exclude=False, sparsity=0.5, batch_size=8))
    recs = {r.name: r for r in result.report.layers}
    assert recs["then_mm"].sparsity == 0.5 and recs["else_gemm"].sparsity == 0.5
    else_branch = next(a.g for a in result.model.graph.node[2].attribute if a.name == "else_branch")
    w = numpy_helper.to_array(else_branch.node[0].attribute[0].t)
    assert np.mean(w == 0) == 0.5
    for sign in (1, -1):
        out = run(result.model, {"x": sign * np.abs(x[:5])})[0]
        assert np.all(np.isfinite(out))


def test_loop_body_layer_is_calibrated_on_every_iteration():
    rng = np.random.default_rng(9)
    model = subgraphs.loop_model(rng)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.4))
    rec = result.report.layers[0]
    w0 = weights(model)["W"].astype(np.float64)
    dw = weights(result.model)["W"].astype(np.float64) - w0
    h = x[split(300)[0]].astype(np.float64)
    inputs = []
    for _ in range(3):
        inputs.append(h)
        h = np.maximum(h @ w0, 0)
    xs = np.concatenate(inputs)
    assert rec.error == pytest.approx(0.5 * np.mean(np.sum((xs @ dw) ** 2, axis=1)), rel=1e-4)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_low_precision_weights_are_written_in_their_own_dtype(dtype):
    import ml_dtypes

    rng = np.random.default_rng(10)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    w = rng.standard_normal((8, 4)).astype(np_dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))
    # stored low precision, cast up for compute (how mixed-precision exports keep weights)
    nodes = [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "Wf"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 8])], [vi("y", TensorProto.FLOAT, ["N", 4])],
                       [tensor("W", w)])
    x = rng.standard_normal((200, 8)).astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.5))
    t = result.model.graph.initializer[0]
    assert t.data_type == elem
    assert np.mean(numpy_helper.to_array(t).astype(np.float32) == 0) == 0.5
    assert "through Cast" in result.report.layers[0].storage
    assert result.report.layers[0].dtype == ("bfloat16" if dtype == "bfloat16" else "float16")


def test_fp16_model_end_to_end():
    rng = np.random.default_rng(11)
    model = mlp(rng, dtype=np.float16)
    x = rng.standard_normal((300, 12)).astype(np.float16)
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.5))
    for t in result.model.graph.initializer:
        assert t.data_type == TensorProto.FLOAT16
    assert result.report.fidelity["cosine"] > 0.5


def test_random_calibration_must_be_asked_for_and_warns():
    rng = np.random.default_rng(12)
    model = small_cnn(rng)
    with pytest.raises(LobsError, match="no calibration data"):
        prune(model, None)
    with pytest.warns(UserWarning, match="random"):
        result = prune(model, "random", PruneConfig(default_exclude=False, samples=64))
    assert result.report.samples["calibration"] + result.report.samples["held_out"] == 64


def test_calibration_reader_protocol():
    rng = np.random.default_rng(13)
    model = mlp(rng)

    class Reader:
        def __init__(self):
            self.batches = iter([{"x": rng.standard_normal((16, 12)).astype(np.float32)} for _ in range(20)])

        def get_next(self):
            return next(self.batches, None)

    result = prune(model, Reader(), PruneConfig(default_exclude=False, sparsity=0.5))
    assert result.report.samples == {"calibration": 288, "held_out": 32}


def test_bad_config_is_a_user_error():
    model = mlp(np.random.default_rng(0))
    for cfg in (PruneConfig(default_exclude=False, sparsity=1.0), PruneConfig(default_exclude=False, method="nope"), PruneConfig(default_exclude=False, max_error=-1),
                PruneConfig(default_exclude=False, layer_sparsity={"fc1": 1.5}), PruneConfig(default_exclude=False, batch_size=0)):
        with pytest.raises(LobsError):
            prune(model, "random", cfg)


def test_public_api_exports():
    assert callable(onnx_lobs.prune) and callable(onnx_lobs.evaluate) and callable(onnx_lobs.save_model)


@pytest.mark.parametrize("opset, ir", [(7, 3), (9, 4), (11, 6), (17, 8), (21, 10)])
def test_old_and_new_opsets(opset, ir):
    """Opset 7 (IR 3: initializers also listed as graph inputs) up to recent ones."""
    rng = np.random.default_rng(14)
    inits = [tensor("W1", rng.standard_normal((16, 12)).astype(np.float32)),
             tensor("b1", rng.standard_normal(16).astype(np.float32)),
             tensor("Wc", rng.standard_normal((3, 1, 3, 3)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["img", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["x"]),
             helper.make_node("Gemm", ["x", "W1", "b1"], ["y"], name="fc", transB=1)]
    inputs = [vi("img", TensorProto.FLOAT, ["N", 1, 2, 2])]
    if ir < 4:
        inputs += [vi(t.name, t.data_type, list(t.dims)) for t in inits]
    model = make_model(nodes, inputs, [vi("y", TensorProto.FLOAT, ["N", 16])], inits, opset=opset, ir=ir)
    img = rng.standard_normal((200, 1, 2, 2)).astype(np.float32)
    result = prune(model, {"img": img}, PruneConfig(default_exclude=False, sparsity=0.5))
    assert [r.sparsity for r in result.report.layers] == [pytest.approx(0.5, abs=0.02)] * 2
    assert result.model.opset_import[0].version == opset and result.model.ir_version == ir
    assert np.isfinite(run(result.model, {"img": img[:3]})[0]).all()


def test_scan_body_layer_sees_every_slice():
    rng = np.random.default_rng(15)
    model = subgraphs.scan_model(rng)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.5))
    rec = result.report.layers[0]
    dw = weights(result.model)["W"].astype(np.float64) - weights(model)["W"].astype(np.float64)
    xs = x[split(300)[0]].astype(np.float64)
    assert rec.error == pytest.approx(0.5 * np.mean(np.sum((xs @ dw) ** 2, axis=1)), rel=1e-5)
    assert rec.sparsity == 0.5


def test_fp64_model_end_to_end():
    rng = np.random.default_rng(16)
    model = mlp(rng, dtype=np.float64)
    x = rng.standard_normal((200, 12))
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.5))
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.DOUBLE}
    assert np.isfinite(run(result.model, {"x": x[:4]})[0]).all()


def _layer_inputs(model, layer_names, x):
    """Each named layer's input on x, by running the model with those inputs exposed."""
    from onnx_lobs.graph import find_layers
    from onnx_lobs.modelio import LoadedModel
    from onnx_lobs.activations import expose

    layers = {l.name: l for l in find_layers(LoadedModel(model, "m"))[0]}
    names = [layers[n].uses[0].x for n in layer_names]
    aug, _ = expose(model, [(name, (), np.float32) for name in names])
    sess = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    return {n: x if name == "x" else sess.run([name], {"x": x})[0] for n, name in zip(layer_names, names)}


def test_sequential_error_is_measured_against_the_dense_output():
    rng = np.random.default_rng(17)
    model = mlp(rng, sizes=(12, 24, 16, 6))
    x = (rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))).astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.7, sequential=True))
    calib = x[split(400)[0]]
    dense_in = _layer_inputs(model, ["fc1", "fc2", "fc3"], calib)
    pruned_in = _layer_inputs(result.model, ["fc1", "fc2", "fc3"], calib)
    w0, w1 = weights(model), weights(result.model)
    recs = {r.name: r for r in result.report.layers}
    for name, wn, bn, mm in (("fc1", "W1", "b1", lambda a, w: a @ w.T), ("fc2", "W2", None, lambda a, w: a @ w),
                             ("fc3", "W3", "b3", lambda a, w: 0.5 * a @ w)):
        xd, xp = dense_in[name].astype(np.float64), pruned_in[name].astype(np.float64)
        yd = mm(xd, w0[wn].astype(np.float64))
        yp = mm(xp, w1[wn].astype(np.float64))
        if bn:
            scale = 2.0 if name == "fc3" else 1.0
            yd, yp = yd + scale * w0[bn], yp + scale * w1[bn]
        measured = 0.5 * np.mean(np.sum((yp - yd) ** 2, axis=1))
        assert recs[name].error == pytest.approx(measured, rel=1e-4), name
        if name != "fc1":
            assert recs[name].propagated_error > recs[name].corrected_error


def test_sequential_is_closer_to_the_dense_model_than_independent():
    rng = np.random.default_rng(18)
    model = mlp(rng, sizes=(12, 32, 32, 6))
    x = (rng.standard_normal((600, 12)) @ rng.standard_normal((12, 12))).astype(np.float32)
    ind = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.8)).report.fidelity["rel_l2"]
    seq = prune(model, {"x": x}, PruneConfig(default_exclude=False, sparsity=0.8, sequential=True)).report.fidelity["rel_l2"]
    assert seq < ind


@pytest.mark.parametrize("seed", [0, 8])  # independent kept, sequential kept
def test_a_pattern_without_a_mode_runs_both_and_keeps_the_closer_outputs(seed):
    """The kept run is, mask for mask, the explicit run of the mode whose held-out rel L2 is lower."""
    rng = np.random.default_rng(seed)
    model = mlp(rng, sizes=(16, 24, 24, 8))
    data = {"x": rng.standard_normal((120, 16)).astype(np.float32)}
    base = PruneConfig(default_exclude=False, pattern=(2, 4))
    both = prune(model, data, base)
    explicit = {k: prune(model, data, replace(base, sequential=s))
                for k, s in (("independent", False), ("sequential", True))}
    errors = {k: r.report.fidelity["rel_l2"] for k, r in explicit.items()}
    kept = min(errors, key=lambda k: (errors[k], k != "independent"))
    m = both.report.mode
    assert m["kept"] == kept and m["rel_l2"] == pytest.approx(errors, rel=1e-12)
    assert both.report.config["sequential"] == (kept == "sequential")
    assert both.report.timings["total"] == pytest.approx(sum(m["seconds"].values()))
    for name, mask in explicit[kept].masks.items():
        np.testing.assert_array_equal(both.masks[name], mask)
    for name, w in weights(explicit[kept].model).items():
        np.testing.assert_array_equal(w, weights(both.model)[name])
    assert f"{kept} mode kept" in format_table(both.report)


def test_without_a_pattern_the_default_mode_is_independent():
    rng = np.random.default_rng(4)
    model = mlp(rng, sizes=(16, 24, 24, 8))
    data = {"x": rng.standard_normal((100, 16)).astype(np.float32)}
    result = prune(model, data, PruneConfig(default_exclude=False, sparsity=0.5, global_sparsity=None))
    assert result.report.mode is None and result.report.config["sequential"] is False


def test_a_pattern_with_nothing_held_out_keeps_independent_mode_and_says_so():
    """A reader of fewer than ten feeds holds nothing out: it is read once, by the independent run."""
    rng = np.random.default_rng(5)
    model = mlp(rng, sizes=(16, 24, 24, 8))
    x = rng.standard_normal((40, 16)).astype(np.float32)
    with pytest.warns(UserWarning, match="nothing held out to compare the modes on"):
        result = prune(model, Reader(x, 8), PruneConfig(default_exclude=False, pattern=(2, 4)))
    assert result.report.mode is None and result.report.config["sequential"] is False
    assert result.report.samples == {"calibration": 40, "held_out": 0}


def test_a_reader_serves_the_passes_of_sequential_mode_with_an_allocation():
    """--sequential --global reads the data twice (the allocation's dense pass, then the stages):
    a CalibrationDataReader, which can be read once, gives the same result as its feeds in a list."""
    from onnx_lobs.calibration import ReaderSource, input_specs

    rng = np.random.default_rng(21)
    model = mlp(rng, sizes=(12, 32, 32, 6))
    x = rng.standard_normal((200, 12)).astype(np.float32)
    config = PruneConfig(default_exclude=False, global_sparsity=0.5, sequential=True)
    by_reader = prune(model, Reader(x, 10), config)
    listed = ReaderSource(Reader(x, 10), "listed", input_specs(model))
    list(listed.batches(1))  # read whole first: the passes replay it
    by_list = prune(model, listed, config)
    assert by_reader.report.samples == {"calibration": 180, "held_out": 20}
    for name, w in weights(by_reader.model).items():
        np.testing.assert_array_equal(w, weights(by_list.model)[name])


@pytest.mark.parametrize("method", ["lobs", "obc", "sparsegpt", "wanda", "magnitude"])
def test_two_four_pattern_along_the_reduction_axis(method):
    rng = np.random.default_rng(19)
    w_conv = rng.standard_normal((6, 8, 3, 3))
    model = single_layer("Conv", w_conv, (1, 8, 6, 6), bias=rng.standard_normal(6), attrs={"pads": [1, 1, 1, 1]})
    x = rng.standard_normal((60, 8, 6, 6)).astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, method=method, pattern=(2, 4)))
    w = weights(result.model)["W"]
    groups = (w.reshape(6, 2, 4, 3, 3) != 0).sum(axis=2)  # input channels in fours, at each kernel position
    assert groups.max() <= 2 and groups.min() == 2
    assert result.report.layers[0].sparsity == 0.5
    # a reduction axis that does not divide by M is skipped with the reason
    model = single_layer("MatMul", rng.standard_normal((6, 4)), (1, 6))
    rec = prune(model, {"x": rng.standard_normal((40, 6)).astype(np.float32)},
                PruneConfig(default_exclude=False, method=method, pattern=(2, 4))).report.layers[0]
    assert rec.skipped == "no 2:4 pattern: reduction size 6 does not divide into groups of 4"


@pytest.mark.parametrize("sequential", [False, True])
def test_a_sparse_initializer_is_skipped_and_the_rest_is_pruned(sequential):
    """onnx-ir drops sparse initializers; the calibration models must still carry them."""
    rng = np.random.default_rng(11)
    values = numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "S")
    indices = numpy_helper.from_array(np.array([0, 5, 9, 14, 20, 23], np.int64), "S_idx")
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="dense", transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "S"], ["y"], name="sparse_mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "W"),
                               numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")],
                              sparse_initializer=[helper.make_sparse_tensor(values, indices, [6, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(sparsity=0.5, sequential=sequential, default_exclude=False))
    recs = {r.name: r for r in result.report.layers}
    assert recs["sparse_mm"].skipped == "weight is a sparse initializer"
    assert recs["dense"].skipped is None and recs["dense"].sparsity == pytest.approx(0.5, abs=0.02)
    assert len(result.model.graph.sparse_initializer) == 1
    assert result.report.fidelity["rel_l2"] is not None


@pytest.mark.parametrize("make", [subgraphs.if_model, subgraphs.loop_model])
def test_sequential_mode_prunes_layers_inside_bodies(make):
    """A layer input inside an If/Loop body: sequential mode runs whole passes and exposes it in
    a copy of the model (before the graph index, the copy's bodies were not found: KeyError)."""
    rng = np.random.default_rng(12)
    model = make(rng)
    x = rng.standard_normal((80, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value))
    x = (x * (1 if make is subgraphs.loop_model else np.sign(rng.standard_normal((80, 1))))).astype(np.float32)
    seq = prune(model, {"x": x}, PruneConfig(sparsity=0.5, sequential=True, default_exclude=False))
    ind = prune(model, {"x": x}, PruneConfig(sparsity=0.5, default_exclude=False))
    pruned = [r for r in seq.report.layers if r.skipped is None]
    assert pruned and all(r.sparsity == pytest.approx(0.5, abs=0.05) for r in pruned)
    assert all(r.propagated_error is not None for r in pruned)
    assert seq.report.fidelity["rel_l2"] <= ind.report.fidelity["rel_l2"] * 1.5
