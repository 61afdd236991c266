"""Finding layers wherever their weights live, writing weights back, loading and saving models."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs import LobsError
from onnx_lobs.graph import find_layers, write_tensor
from onnx_lobs.modelio import LoadedModel, load_model, save_model
from tests import subgraphs
from tests.builders import make_model, mlp, single_layer, small_cnn, tensor, vi


def layers_of(model):
    return find_layers(LoadedModel(model, "m.onnx"))


def test_every_dense_form_is_found_with_its_matrix_view():
    layers, skipped = layers_of(mlp(np.random.default_rng(0)))
    assert [(l.name, l.op, l.weight_name) for l in layers] == [
        ("fc1", "Gemm", "W1"), ("fc2", "MatMul", "W2"), ("fc3", "Gemm", "W3")]
    assert [(l.geometry.rows, l.geometry.cols) for l in layers] == [(16, 12), (8, 16), (4, 8)]
    assert [l.bias is not None for l in layers] == [True, False, True]
    assert skipped == []


def test_conv_groups_and_storage():
    layers, _ = layers_of(small_cnn(np.random.default_rng(0)))
    conv1, dw, fc = layers
    assert (conv1.geometry.groups, conv1.geometry.rows, conv1.geometry.cols) == (1, 6, 18)
    assert (dw.geometry.groups, dw.geometry.rows, dw.geometry.cols) == (6, 1, 9)
    assert conv1.storage == "initializer" and dw.bias is None


def test_subgraph_and_constant_weights_resolve_lexically():
    rng = np.random.default_rng(0)
    layers, _ = layers_of(subgraphs.if_model(rng))
    by = {l.name: l for l in layers}
    assert by["then_mm"].weight_name == "Wo" and by["then_mm"].storage == "initializer"
    assert by["else_gemm"].weight_name == "Wc" and "Constant node" in by["else_gemm"].storage
    assert [a for _, a in by["then_mm"].uses[0].x_scope] == ["then_branch"]
    assert by["else_gemm"].uses[0].x_scope == ()  # x comes from the outer graph
    layers, _ = layers_of(subgraphs.constant_identity_model(rng))
    assert layers[0].storage == "Constant node"


def test_skip_reasons():
    rng = np.random.default_rng(0)
    # activation @ activation (attention-like), constant first operand, integer and batched weights
    nodes = [helper.make_node("MatMul", ["x", "xt"], ["a"], name="act_act"),
             helper.make_node("MatMul", ["C", "x"], ["b"], name="const_first"),
             helper.make_node("MatMul", ["x", "B3"], ["c"], name="batched"),
             helper.make_node("MatMulInteger", ["xi", "Wi"], ["d"], name="quant")]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, [4, 4]), vi("xt", TensorProto.FLOAT, [4, 4]),
                               vi("xi", TensorProto.UINT8, [4, 4])],
                       [vi("a", TensorProto.FLOAT, [4, 4]), vi("b", TensorProto.FLOAT, [4, 4]),
                        vi("c", TensorProto.FLOAT, [2, 4, 4]), vi("d", TensorProto.INT32, [4, 4])],
                       [tensor("C", rng.standard_normal((4, 4)).astype(np.float32)),
                        tensor("B3", rng.standard_normal((2, 4, 4)).astype(np.float32)),
                        tensor("Wi", np.ones((4, 4), np.uint8))])
    layers, skipped = layers_of(model)
    assert layers == []
    reasons = {s.name: s.reason for s in skipped}
    assert "computed at run time" in reasons["act_act"]
    assert "first operand" in reasons["const_first"]
    assert "rank 3" in reasons["batched"]
    assert "quantized" in reasons["quant"]


def test_recurrent_and_einsum_weights_are_listed_as_skipped():
    rng = np.random.default_rng(0)
    h, d = 3, 4
    nodes = [helper.make_node("LSTM", ["x", "Wl", "Rl"], ["y"], name="lstm", hidden_size=h),
             helper.make_node("GRU", ["x", "Wg", "Rg"], ["g"], name="gru", hidden_size=h),
             helper.make_node("Einsum", ["x2", "We"], ["e"], name="proj", equation="ij,jk->ik"),
             helper.make_node("Einsum", ["x2", "x2"], ["f"], name="gram", equation="ij,kj->ik")]
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, [2, 1, d]), vi("x2", TensorProto.FLOAT, [2, d])],
                       [vi("y", TensorProto.FLOAT, [2, 1, 1, h]), vi("g", TensorProto.FLOAT, [2, 1, 1, h]),
                        vi("e", TensorProto.FLOAT, [2, 5]), vi("f", TensorProto.FLOAT, [2, 2])],
                       [tensor("Wl", f32(1, 4 * h, d)), tensor("Rl", f32(1, 4 * h, h)),
                        tensor("Wg", f32(1, 3 * h, d)), tensor("Rg", f32(1, 3 * h, h)), tensor("We", f32(d, 5))])
    onnx.checker.check_model(model)
    layers, skipped = layers_of(model)
    assert layers == []
    got = {s.name: (s.op, s.weight, s.reason) for s in skipped}
    assert set(got) == {"lstm", "gru", "proj"}  # an Einsum of two activations holds no weight
    assert got["lstm"][:2] == ("LSTM", "Wl") and "LSTM" in got["lstm"][2]
    assert got["gru"][:2] == ("GRU", "Wg") and "not supported" in got["gru"][2]
    assert got["proj"][:2] == ("Einsum", "We") and "MatMul" in got["proj"][2]


def test_shared_weights():
    layers, skipped = layers_of(subgraphs.shared_model(np.random.default_rng(0)))
    assert len(layers) == 1 and len(layers[0].uses) == 2
    assert skipped[0].name == "mm_v" and "also used by" in skipped[0].reason


def test_weight_that_is_a_graph_output_is_skipped():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), helper.make_node("Identity", ["W"], ["w_out"])]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 3])],
                       [vi("y", TensorProto.FLOAT, ["N", 3]), vi("w_out", TensorProto.FLOAT, [3, 3])],
                       [tensor("W", rng.standard_normal((3, 3)).astype(np.float32))])
    layers, skipped = layers_of(model)
    assert layers == [] and "graph output" in skipped[0].reason


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
@pytest.mark.parametrize("place", ["initializer", "constant"])
def test_write_back_round_trips_dtype_and_place(dtype, place):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((5, 3)).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if place == "initializer":
        nodes, inits = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [tensor("W", values)]
    else:
        nodes = [helper.make_node("Constant", [], ["W"], value=tensor("v", values)),
                 helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
        inits = []
    model = make_model(nodes, [vi("x", elem, ["N", 5])], [vi("y", elem, ["N", 3])], inits)
    layer = layers_of(model)[0][0]
    np.testing.assert_array_equal(layer.read(), values)
    new = values.astype(np.float64) * 2
    new[0] = 0
    write_tensor(layer.weight, new)
    back = layers_of(model)[0][0].read()
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, new.astype(dtype))
    assert layers_of(model)[0][0].weight.dtype == elem


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(LobsError, match="nope.onnx: no such file"):
        load_model(str(missing))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(LobsError, match="junk.onnx"):
        load_model(str(junk))
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a model")
    with pytest.raises(LobsError, match="text.onnx"):
        load_model(str(text))
    model = mlp(np.random.default_rng(0))
    model.graph.node[2].input[1] = "does_not_exist"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    with pytest.raises(LobsError, match="broken.onnx: invalid ONNX model"):
        load_model(str(broken))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(mlp(np.random.default_rng(0)).SerializeToString()[:200])
    with pytest.raises(LobsError, match="truncated.onnx"):
        load_model(str(truncated))


def test_external_data_is_loaded_and_kept_external(tmp_path):
    model = single_layer("MatMul", np.random.default_rng(0).standard_normal((64, 32)), (1, 64))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    loaded = load_model(str(path))
    layer = find_layers(loaded)[0][0]
    assert "external data" in layer.storage
    out = tmp_path / "out.onnx"
    save_model(loaded.model, str(out), external=True)
    assert (tmp_path / "out.onnx.data").exists()
    again = load_model(str(out))
    np.testing.assert_array_equal(find_layers(again)[0][0].read(), layer.read())


def test_save_is_atomic_and_reports_bad_paths(tmp_path):
    model = mlp(np.random.default_rng(0))
    with pytest.raises(LobsError, match="does not exist"):
        save_model(model, str(tmp_path / "no" / "m.onnx"))
    out = tmp_path / "m.onnx"
    save_model(model, str(out))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary left behind
    assert onnx.load(out) == model


def test_quantized_weights_are_skipped_as_quantized():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "scale", "zp"], ["Wd"], name="dq"),
             helper.make_node("MatMul", ["x", "Wd"], ["a"], name="direct"),
             helper.make_node("Transpose", ["Wd"], ["Wt"], perm=[1, 0]),
             helper.make_node("Gemm", ["a", "Wt"], ["y"], name="behind_transpose", transB=1)]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 4])], [vi("y", TensorProto.FLOAT, ["N", 4])],
                       [tensor("Wq", rng.integers(-8, 8, (4, 4)).astype(np.int8)),
                        tensor("scale", np.array(0.1, np.float32)), tensor("zp", np.array(0, np.int8))])
    layers, skipped = layers_of(model)
    assert layers == []
    assert {s.name: s.reason for s in skipped} == {"direct": "quantized weight (DequantizeLinear)",
                                                   "behind_transpose": "quantized weight (DequantizeLinear)"}


def test_constants_whose_bytes_do_not_fit_are_named(tmp_path):
    model = mlp(np.random.default_rng(0))
    model.graph.initializer[0].dims[0] -= 1  # 15 x 12 floats declared, 16 x 12 stored (too few: the checker's)
    onnx.save(model, tmp_path / "dims.onnx")
    with pytest.raises(LobsError, match=r"dims.onnx: tensor 'W1' holds 768 bytes, but \[15, 12\] of float takes 720"):
        load_model(str(tmp_path / "dims.onnx"))
    model = mlp(np.random.default_rng(0))
    model.graph.initializer[0].data_type = 99
    onnx.save(model, tmp_path / "type.onnx")
    with pytest.raises(LobsError, match="type.onnx"):
        load_model(str(tmp_path / "type.onnx"))


def test_load_names_folders_and_opsets_it_cannot_know(tmp_path):
    with pytest.raises(LobsError, match="is a folder, not a model file"):
        load_model(str(tmp_path))
    model = mlp(np.random.default_rng(0))
    model.opset_import[0].version = 999
    onnx.save(model, tmp_path / "future.onnx")
    with pytest.raises(LobsError, match=r"future.onnx: opset 999 is newer than the newest this onnx knows"):
        load_model(str(tmp_path / "future.onnx"))


def test_non_finite_weights_and_biases_are_skipped():
    rng = np.random.default_rng(0)
    model = mlp(rng)
    b1 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    b1[2] = np.nan
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(b1, "b1"))
    w2 = numpy_helper.to_array(model.graph.initializer[2]).copy()
    w2[0, 1] = -np.inf
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2, "W2"))
    layers, skipped = layers_of(model)
    assert [l.name for l in layers] == ["fc3"]
    assert {s.name: s.reason for s in skipped} == {"fc1": "b1 contains NaN or Inf", "fc2": "W2 contains NaN or Inf"}


def test_write_atomic_and_save_leave_only_their_files(tmp_path):
    from onnx_lobs.atomic import write_atomic

    write_atomic(str(tmp_path / "r.json"), b"{}\n")
    write_atomic(str(tmp_path / "r.json"), b"[]\n")  # replaces
    assert (tmp_path / "r.json").read_bytes() == b"[]\n"
    save_model(mlp(np.random.default_rng(0)), str(tmp_path / "m.onnx"), external=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data", "r.json"]
    with pytest.raises(LobsError, match="output folder does not exist"):
        write_atomic(str(tmp_path / "no" / "r.json"), b"")


def test_external_data_save_runs_in_onnxruntime_with_subgraph_initializers(tmp_path):
    """Every initializer of 1 KiB or more, in the main graph and in If branches, goes to PATH.data;
    onnxruntime runs the saved model from its file and gives the same outputs."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model = subgraphs.if_model(rng)
    branch = model.graph.node[2].attribute[0].g
    branch.initializer.append(tensor("Wb", rng.standard_normal((6, 64)).astype(np.float32)))
    branch.node.append(helper.make_node("MatMul", ["x", "Wb"], ["unused"]))
    model.graph.initializer.append(tensor("big", rng.standard_normal((300,)).astype(np.float32)))
    onnx.checker.check_model(model)
    before = model.SerializeToString()
    save_model(model, str(tmp_path / "m.onnx"), external=True)
    assert model.SerializeToString() == before  # the caller's model keeps its weights
    saved = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    externals = sorted(t.name for g in [saved.graph, saved.graph.node[2].attribute[0].g] for t in g.initializer
                       if t.data_location == TensorProto.EXTERNAL)
    assert externals == ["Wb", "big"]  # Wo (72 bytes) and the scalar stay inline
    x = rng.standard_normal((5, 6)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = ort.InferenceSession(before, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])
    again = load_model(str(tmp_path / "m.onnx"))
    assert again.external == {"Wb", "big"}
    np.testing.assert_array_equal(numpy_helper.to_array(again.model.graph.initializer[-1]),
                                  numpy_helper.to_array(model.graph.initializer[-1]))


def _lm(tied: bool):
    """Token ids -> embedding (Gather) -> MatMul -> lm_head, tied (Transpose of the table) or not."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((20, 8)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1], np.int64), "idx"),
             numpy_helper.from_array(rng.standard_normal((8, 20)).astype(np.float32), "head")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["h"], name="mlp"),
             helper.make_node("Shape", ["h"], ["s"]), helper.make_node("Gather", ["s", "idx"], ["s1"], name="dims"),
             helper.make_node("Transpose", ["emb"], ["embT"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "embT" if tied else "head"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("s1", TensorProto.INT64, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("tied", [False, True])
def test_an_embedding_is_reported_and_a_tied_head_left_dense_with_the_reason(tied):
    layers, skipped = find_layers(LoadedModel(_lm(tied), "lm.onnx"))
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["embed"].startswith("embedding lookup") and "dims" not in reasons  # a shape Gather is no layer
    assert [l.name for l in layers] == (["mlp"] if tied else ["mlp", "lm_head"])
    if tied:
        assert "emb transposed at run time" in reasons["lm_head"] and "tied embeddings" in reasons["lm_head"]
