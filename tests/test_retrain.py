"""Retraining through onnx2torch on tiny models built here: zeros held exactly, the interface kept,
onnxruntime agreeing with torch, the loss going down; and the clear message without the extra."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnx_lobs
from onnx_lobs import LobsError
from onnx_lobs.cli import main
from onnx_lobs.graph import find_layers
from onnx_lobs.modelio import LoadedModel, model_inputs
from tests.builders import make_model, mlp, tensor, vi


@pytest.fixture(scope="module")
def torch_extra():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx2torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention on a busy machine
    yield
    torch.set_num_threads(threads)


def conv_matmul(rng) -> onnx.ModelProto:
    """Grouped Conv -> Relu -> MaxPool -> depthwise Conv -> Relu -> Flatten -> MatMul + Add."""
    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = [tensor("Wg", w(8, 2, 3, 3)), tensor("bg", rng.standard_normal(8).astype(np.float32) * 0.1),
             tensor("Wd", w(8, 1, 3, 3)), tensor("Wm", w(72, 5)),
             tensor("bm", rng.standard_normal(5).astype(np.float32) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "Wg", "bg"], ["c1"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "Wd"], ["c2"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("MatMul", ["f", "Wm"], ["m"], name="head"),
             helper.make_node("Add", ["m", "bm"], ["y"])]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 4, 6, 6])], [vi("y", TensorProto.FLOAT, ["N", 5])],
                      inits)


def labelled(model, x) -> dict:
    """Labels the dense model gets right by construction: pruning loses some, retraining wins them back."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    return {"x": x, "labels": y.argmax(1).astype(np.int64)}


def cases():
    rng = np.random.default_rng(0)
    dense_mlp = mlp(rng)
    dense_cnn = conv_matmul(rng)
    return [("mlp", dense_mlp, 0.3 * rng.standard_normal((400, 12)).astype(np.float32)),  # its weights are large
            ("conv", dense_cnn, rng.standard_normal((400, 4, 6, 6)).astype(np.float32))]


def pruned(dense, x, sparsity=0.6):
    config = onnx_lobs.PruneConfig(sparsity=sparsity, default_exclude=False)
    return onnx_lobs.prune(dense, {"x": x}, config)


def matrices(layer):
    return layer.adapter.to_matrices(layer.uses[0].node, layer.read())


def assert_retrained(before: onnx.ModelProto, after: onnx.ModelProto):
    """The same interface and opset, every layer's zeros exactly where they were, the rest trained."""
    assert [i.name for i in model_inputs(after)] == [i.name for i in model_inputs(before)]
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    assert after.opset_import[0].version == before.opset_import[0].version
    for vi_ in list(model_inputs(after)) + list(after.graph.output):
        assert not vi_.type.tensor_type.shape.dim[0].HasField("dim_value")  # batch stays dynamic
    ours, _ = find_layers(LoadedModel(before, "<pruned>"))
    theirs, _ = find_layers(LoadedModel(after, "<retrained>"))
    assert [l.op == "Conv" for l in ours] == [l.op == "Conv" for l in theirs]
    for a, b in zip(ours, theirs):
        wa, wb = matrices(a), matrices(b)
        assert wa.shape == wb.shape
        assert (wa == 0).sum() > 0
        np.testing.assert_array_equal(wa == 0, wb == 0)
        assert not np.allclose(wa[wa != 0], wb[wb != 0])  # trained, MatMul weights included


@pytest.mark.parametrize("index", [0, 1])
def test_labels_and_teacher(index, torch_extra):
    from onnx_lobs.retrain import retrain

    name, dense, x = cases()[index]
    result = pruned(dense, x)
    data = labelled(dense, x)
    for kwargs in ({"labels": "labels"}, {"teacher": dense}):
        out = retrain(result, data, iterations=60, batch_size=32, lr=2e-2, progress=False, **kwargs)
        r = out.report
        assert r.loss == ("cross-entropy" if "labels" in kwargs else "distillation")
        assert_retrained(result.model, out.model)
        assert r.checks["onnxruntime_vs_torch"] <= 1e-4 and r.checks["new_zeros"] == 0
        assert r.checks["zeros_kept"] == sum(int(np.sum(m)) for m in result.masks.values())
        assert r.after["loss"] < r.before["loss"], (name, kwargs, r.before, r.after)
        assert r.loss_curve[-1][1] < r.loss_curve[0][1]
        assert r.samples == {"train": 360, "held_out": 40} and r.iterations == 60
        json.loads(r.to_json())
        meta = {p.key: p.value for p in out.model.metadata_props}
        assert "onnx_lobs" in meta and json.loads(meta["onnx_lobs.retrain"])["iterations"] == 60


def shared_weight(op: str, rng) -> onnx.ModelProto:
    """One weight used by two nodes: pruned once, and must stay one tensor after retraining."""
    attrs = {"transB": 1} if op == "Gemm" else {}
    nodes = [helper.make_node(op, ["x", "W"], ["h"], name="first", **attrs), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node(op, ["r", "W"], ["y"], name="second", **attrs)]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 8])], [vi("y", TensorProto.FLOAT, ["N", 8])],
                      [tensor("W", 0.3 * rng.standard_normal((8, 8)).astype(np.float32))])


@pytest.mark.parametrize("kind", ["constant", "MatMul", "Gemm"])
def test_constant_node_and_shared_weights(kind, torch_extra):
    from onnx_lobs.retrain import retrain
    from tests.subgraphs import constant_identity_model

    rng = np.random.default_rng(2)
    dense = constant_identity_model(rng) if kind == "constant" else shared_weight(kind, rng)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    result = pruned(dense, x, sparsity=0.5)
    out = retrain(result, {"x": x}, teacher=dense, iterations=30, batch_size=32, lr=1e-2, progress=False)
    assert_retrained(result.model, out.model)
    assert out.report.checks["layers"] == 1 and len(out.model.graph.initializer) == 1


def test_default_is_one_epoch_and_seeded(torch_extra):
    from onnx_lobs.retrain import retrain

    _, dense, x = cases()[0]
    result = pruned(dense, x)
    data = labelled(dense, x)
    a = retrain(result.model, data, labels="labels", batch_size=64, progress=False)
    b = retrain(result.model, data, labels="labels", batch_size=64, progress=False)
    assert a.report.iterations == 6 and a.report.epochs == pytest.approx(384 / 360)  # ceil(360 / 64)
    assert [t.raw_data for t in a.model.graph.initializer] == [t.raw_data for t in b.model.graph.initializer]


def test_unsupported_ops_are_listed(torch_extra):
    from onnx_lobs.retrain import retrain

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="fc", transB=1),
             helper.make_node("Hardmax", ["h"], ["s"]),
             helper.make_node("LpNormalization", ["s"], ["y"])]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 6])], [vi("y", TensorProto.FLOAT, ["N", 3])],
                       [tensor("W", rng.standard_normal((3, 6)).astype(np.float32))])
    x = rng.standard_normal((40, 6)).astype(np.float32)
    with pytest.raises(LobsError, match="onnx2torch cannot convert these ops: Hardmax, LpNormalization"):
        retrain(model, {"x": x, "labels": np.zeros(40, np.int64)}, labels="labels", progress=False)


# ----------------------------------------------------------------------------- without the extra

def without(monkeypatch, module, error):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise error
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def cli(*args):
    try:
        main(list(args))
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("module, error", [("torch", ImportError("No module named 'torch'")),
                                           ("onnx2torch", RuntimeError("operator torchvision::nms does not exist"))])
def test_missing_extra_says_how_to_install(module, error, monkeypatch, tmp_path, capsys):
    from onnx_lobs.retrain import retrain

    if module != "torch":
        pytest.importorskip("torch")  # else torch's own absence is what gets reported
    onnx.save(mlp(np.random.default_rng(0)), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 12), np.float32), labels=np.zeros(10, np.int64))
    without(monkeypatch, module, error)
    with pytest.raises(LobsError, match=r"pip install 'onnx-lobs\[retrain\]'"):
        retrain(str(tmp_path / "m.onnx"), str(tmp_path / "d.npz"), labels="labels")
    code = cli("retrain", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.onnx"), "--data",
               str(tmp_path / "d.npz"))
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "pip install 'onnx-lobs[retrain]'" in err and str(error) in err
    assert not (tmp_path / "out.onnx").exists()


def test_package_never_imports_torch():
    code = ("import sys, onnx_lobs, onnx_lobs.cli, onnx_lobs.retrain; "
            "assert 'torch' not in sys.modules and 'onnx2torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def files(tmp_path_factory, torch_extra):
    d = tmp_path_factory.mktemp("retrain")
    _, dense, x = cases()[0]
    onnx.save(dense, d / "dense.onnx")
    onnx_lobs.save_model(pruned(dense, x).model, str(d / "pruned.onnx"))
    np.savez(d / "train.npz", **labelled(dense, x))
    np.savez(d / "inputs.npz", x=x)
    other = mlp(np.random.default_rng(3))
    other.graph.input[0].name = "z"
    other.graph.node[0].input[0] = "z"
    onnx.save(other, d / "other.onnx")
    return d


def test_cli_retrains_and_reports(files, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli("retrain", str(files / "pruned.onnx"), "-o", str(out), "--data", str(files / "inputs.npz"),
               "--teacher", str(files / "dense.onnx"), "--iterations", "20", "--batch-size", "32",
               "--report", str(report), "--quiet")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == "" and "zeros held exactly" in captured.out and f"wrote {out}" in captured.out
    assert_retrained(onnx.load(files / "pruned.onnx"), onnx.load(out))
    data = json.loads(report.read_text())
    assert data["iterations"] == 20 and data["loss"] == "distillation" and len(data["loss_curve"]) == 20


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.npz"], "missing.npz: no such file"),
    (["--data", "inputs.npz"], "has no labels under key 'labels'"),
    (["--data", "train.npz", "--labels", "y"], "has no labels under key 'y'"),
    (["--data", "train.npz", "--labels", "labels", "--teacher", "dense.onnx"], "exclude each other"),
    (["--data", "train.npz", "--iterations", "0"], "must be positive"),
    (["--data", "train.npz", "--iterations", "3", "--epochs", "1"], "not both"),
    (["--data", "train.npz", "--lr", "nan"], "learning rate"),
    (["--data", "inputs.npz", "--teacher", "other.onnx"], "teacher inputs ['z'] differ"),
    (["--data", "inputs.npz", "--teacher", "missing.onnx"], "missing.onnx: no such file"),
    (["--data", "train.npz", "-o", "nowhere/out.onnx"], "output folder does not exist"),
])
def test_cli_bad_input(args, message, files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    output = [] if "-o" in args else ["-o", "out.onnx"]
    code = cli("retrain", "pruned.onnx", *output, *args, "--quiet")
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("onnx-lobs: error:") and message in err, err
    assert not (files / "out.onnx").exists()


def test_a_structurally_pruned_model_retrains_against_its_dense_teacher(tmp_path, torch_extra, capsys):
    from tests import channel_graphs as cg

    dense = cg.build(["residual", "inverted"])
    x = cg.feed(dense, 96)
    small = onnx_lobs.prune(dense, x, onnx_lobs.PruneConfig(structured=True, sparsity=0.5, round_to=1,
                                                           latency=False, default_exclude=False)).model
    src, teacher, out = tmp_path / "small.onnx", tmp_path / "dense.onnx", tmp_path / "out.onnx"
    onnx.save(small, src)
    onnx.save(dense, teacher)
    np.savez(tmp_path / "x.npz", **x)
    code = cli("retrain", str(src), "-o", str(out), "--data", str(tmp_path / "x.npz"), "--teacher", str(teacher),
               "--iterations", "10", "--batch-size", "32", "--quiet")
    assert code == 0, capsys.readouterr().err
    def weights(m):  # the retrained model's tensors are renamed by the round trip through torch
        return sorted(list(t.dims) for t in m.graph.initializer if len(t.dims) == 4)

    assert weights(onnx.load(out)) == weights(small) != weights(dense)  # still the small model
