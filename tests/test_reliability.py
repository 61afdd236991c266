"""What a deployment pipeline relies on: bad input fails cleanly, hard Hessians stay finite, output
files appear whole or not at all, and the same run gives the same bytes.

- Corrupted model files and calibration data that does not fit, through the command line: exit
  code 1, one line naming the file, tensor or layer, no traceback, nothing written, inputs intact.
- Rank-deficient and ill-conditioned Hessians (dead units, constant inputs, duplicate columns,
  fewer samples than columns, ...) never give NaN/Inf weights, for every method, and the report
  says when it had to raise the dampening.
- A run interrupted (SIGINT) or killed (SIGKILL) at chosen points -- calibrating, solving,
  writing, between the data file and the model -- leaves no partial output and no temporary file.
- Byte-identical output for identical inputs and seed, for every method, with --sequential, and
  across interpreter hash seeds; the JSON report too, apart from its timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lobs
from onnx_lobs import LobsError, PruneConfig, prune
from onnx_lobs.cli import main
from onnx_lobs.modelio import save_model
from onnx_lobs.solvers import METHODS
from tests.builders import make_model, mlp, single_layer, small_unet, tensor, vi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def snapshot(folder) -> dict:
    """name -> sha256 of every file in a folder (and '<dir>' for folders)."""
    out = {}
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        out[name] = "<dir>" if os.path.isdir(p) else hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def assert_clean_failure(code, err, before, folder, names):
    """Exit code 1, one line naming one of `names`, no traceback, and the folder unchanged."""
    lines = err.strip().splitlines()
    assert code == 1, (code, err)
    assert len(lines) == 1 and lines[0].startswith("onnx-lobs: error: "), err
    assert "Traceback" not in err
    assert any(n in lines[0] for n in names), (names, lines[0])
    assert snapshot(folder) == before  # no output, no temporary file, inputs untouched


# ----------------------------------------------------------------------------------------------
# corrupted model files


def corrupted_models(folder):
    """(file name, what the message must name) for every kind of broken model file."""
    rng = np.random.default_rng(0)
    good = mlp(rng)
    data = good.SerializeToString()
    cases = []

    def save(name, content, expect=None):
        path = os.path.join(folder, name)
        if isinstance(content, onnx.ModelProto):
            onnx.save(content, path)
        else:
            with open(path, "wb") as f:
                f.write(content)
        cases.append((name, expect or [name]))

    for cut in (0, 1, 7, 60, len(data) // 3, len(data) // 2, len(data) - 40):
        prefix = data[:cut]
        try:  # a cut that happens to leave a whole, valid model is not corrupt
            m = onnx.load_from_string(prefix)
            onnx.checker.check_model(m)
            continue
        except Exception:
            pass
        save(f"truncated{cut}.onnx", prefix)
    for seed, size in ((1, 1), (2, 64), (3, 4096)):
        save(f"random{seed}.onnx", np.random.default_rng(seed).bytes(size))
    save("text.onnx", b"this is not a model\n")
    m = mlp(rng)
    m.opset_import[0].version = 99
    save("opset99.onnx", m)
    m = mlp(rng)
    m.ir_version = 99
    save("ir99.onnx", m)
    m = mlp(rng)
    m.opset_import[0].version = 6  # onnxruntime has no Gemm-6 kernel: the message names the node
    save("opset6.onnx", m, ["opset6.onnx", "fc1"])
    m = mlp(rng)
    del m.graph.initializer[0]
    save("missing_initializer.onnx", m, ["missing_initializer.onnx: invalid ONNX model"])
    m = mlp(rng)
    m.graph.node[1].op_type = "NoSuchOp"
    save("unknown_op.onnx", m)
    m = single_layer("MatMul", rng.standard_normal((64, 32)), (1, 64))
    onnx.save_model(m, os.path.join(folder, "no_data.onnx"), save_as_external_data=True, location="gone.bin",
                    size_threshold=0)
    os.remove(os.path.join(folder, "gone.bin"))
    cases.append(("no_data.onnx", ["no_data.onnx: cannot read its external data"]))
    m = single_layer("MatMul", rng.standard_normal((64, 32)), (1, 64))  # (onnx externalised the last one in place)
    onnx.save_model(m, os.path.join(folder, "short_data.onnx"), save_as_external_data=True, location="short.bin",
                    size_threshold=0)
    with open(os.path.join(folder, "short.bin"), "r+b") as f:
        f.truncate(100)
    cases.append(("short_data.onnx", ["short_data.onnx: cannot read its external data"]))
    return cases


def test_corrupted_model_files_fail_cleanly(tmp_path, capsys):
    cases = corrupted_models(str(tmp_path))
    np.savez(tmp_path / "calib.npz", x=np.zeros((20, 12), np.float32))
    assert len(cases) >= 15
    for name, expect in cases:
        for command in (["prune", tmp_path / name, "-o", tmp_path / "out.onnx", "--calib", tmp_path / "calib.npz"],
                        ["inspect", tmp_path / name]):
            if command[0] == "inspect" and name == "opset6.onnx":
                continue  # inspect never runs the model: nothing wrong with it there
            before = snapshot(tmp_path)
            code = cli(*command)
            assert_clean_failure(code, capsys.readouterr().err, before, tmp_path, expect)


def test_a_folder_given_as_model_is_named():
    with pytest.raises(LobsError, match="is a folder, not a model file"):
        onnx_lobs.load_model(ROOT)


def test_a_folder_given_as_model_fails_with_one_line(tmp_path, capsys):
    (tmp_path / "m.onnx").mkdir()
    before = snapshot(tmp_path)
    code = cli("prune", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--calib", "random")
    assert_clean_failure(code, capsys.readouterr().err, before, tmp_path, ["m.onnx"])


def test_a_model_onnxruntime_refuses_is_named(tmp_path, capsys):
    m = mlp(np.random.default_rng(0))
    m.opset_import.add(domain="com.example.nosuch", version=1)
    m.graph.node[1].domain = "com.example.nosuch"
    onnx.save(m, tmp_path / "custom.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((20, 12), np.float32))
    before = snapshot(tmp_path)
    code = cli("prune", tmp_path / "custom.onnx", "-o", tmp_path / "out.onnx", "--calib", tmp_path / "calib.npz")
    assert_clean_failure(code, capsys.readouterr().err, before, tmp_path, ["custom.onnx"])


def test_non_finite_weights_are_skipped_with_the_reason():
    rng = np.random.default_rng(0)
    model = mlp(rng)
    w3 = numpy_helper.to_array(model.graph.initializer[3]).copy()
    w3[0, 0] = np.inf
    model.graph.initializer[3].CopyFrom(numpy_helper.from_array(w3, "W3"))
    result = prune(model, {"x": rng.standard_normal((40, 12)).astype(np.float32)}, PruneConfig(default_exclude=False))
    recs = {r.name: r for r in result.report.layers}
    assert recs["fc3"].skipped == "W3 contains NaN or Inf"
    assert recs["fc1"].sparsity == recs["fc2"].sparsity == 0.5


def test_non_finite_activations_name_the_layer(tmp_path, capsys):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Log", ["x"], ["lx"]), helper.make_node("MatMul", ["lx", "W"], ["y"], name="after_log")]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 6])], [vi("y", TensorProto.FLOAT, ["N", 3])],
                       [tensor("W", rng.standard_normal((6, 3)).astype(np.float32))])
    onnx.save(model, tmp_path / "log.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((30, 6)).astype(np.float32))  # log of negatives
    before = snapshot(tmp_path)
    code = cli("prune", tmp_path / "log.onnx", "-o", tmp_path / "out.onnx", "--calib", tmp_path / "calib.npz",
               "--no-default-exclude", "--quiet")
    assert_clean_failure(code, capsys.readouterr().err, before, tmp_path,
                         ["layer after_log: its input contains NaN or Inf"])


def test_errors_while_calibrating_are_one_line_with_progress_bars(tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((30, 12)).astype(np.float32))
    m = mlp(np.random.default_rng(0))
    m.graph.node[1].op_type = "Log"  # NaN activations on negative inputs: found while calibrating
    onnx.save(m, tmp_path / "log.onnx")
    before = snapshot(tmp_path)
    code = cli("prune", tmp_path / "log.onnx", "-o", tmp_path / "out.onnx", "--calib", tmp_path / "calib.npz")
    assert_clean_failure(code, capsys.readouterr().err, before, tmp_path, ["layer fc2"])


def test_inputs_too_large_for_a_hessian_name_the_layer():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2")]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 8])], [vi("y", TensorProto.FLOAT, ["N", 4])],
                       [tensor("W1", (1e25 * rng.standard_normal((8, 8))).astype(np.float32)),
                        tensor("W2", rng.standard_normal((8, 4)).astype(np.float32))])
    with pytest.raises(LobsError, match="fc2"):
        prune(model, {"x": rng.standard_normal((40, 8)).astype(np.float32)}, PruneConfig(default_exclude=False))


# ----------------------------------------------------------------------------------------------
# calibration data that does not fit


def bad_calibrations(folder):
    """(file, what the message must name) for calibration data mlp() cannot take."""
    x = np.random.default_rng(0).standard_normal((20, 12)).astype(np.float32)
    cases = []

    def npz(name, expect, **arrays):
        np.savez(os.path.join(folder, name), **arrays)
        cases.append((name, [expect]))

    npz("renamed.npz", "model input 'x' is missing", input=x)
    npz("extra.npz", "'y' is not an input of the model", x=x, y=x)
    npz("width.npz", "tensor 'x' has shape [20, 11]", x=x[:, :11])
    npz("rank.npz", "tensor 'x' has shape [20, 3, 4, 1]", x=x.reshape(20, 3, 4, 1))
    npz("float64.npz", "tensor 'x' has dtype float64, the model expects float32", x=x.astype(np.float64))
    npz("int.npz", "tensor 'x' has dtype int64", x=np.ones((20, 12), np.int64))
    npz("nan.npz", "tensor 'x' contains NaN or Inf", x=np.where(np.arange(240).reshape(20, 12) == 77, np.nan, x))
    npz("inf.npz", "tensor 'x' contains NaN or Inf", x=np.where(np.arange(240).reshape(20, 12) == 5, -np.inf, x))
    npz("empty.npz", "tensor 'x' has no samples", x=x[:0])
    npz("empty_rows.npz", "tensor 'x' has no samples", x=np.zeros((0, 20, 12), np.float32))
    npz("scalar.npz", "tensor 'x' has shape [], the model expects rank 2", x=np.float32(1.0))
    np.savez(os.path.join(folder, "pickled.npz"), x=np.array([{"a": 1}], dtype=object))
    cases.append(("pickled.npz", ["pickled.npz: cannot read as .npz"]))
    with open(os.path.join(folder, "junk.npz"), "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    cases.append(("junk.npz", ["junk.npz: cannot read as .npz"]))
    os.mkdir(os.path.join(folder, "nofiles"))
    cases.append(("nofiles", ["nofiles: folder has no .npz files"]))
    return cases


def test_calibration_misfits_fail_cleanly(tmp_path, capsys):
    onnx.save(mlp(np.random.default_rng(0)), tmp_path / "m.onnx")
    for name, expect in bad_calibrations(str(tmp_path)):
        before = snapshot(tmp_path)
        code = cli("prune", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--calib", tmp_path / name, "--quiet")
        err = capsys.readouterr().err
        assert_clean_failure(code, err, before, tmp_path, expect)
        assert name in err  # the file, besides the tensor
    before = snapshot(tmp_path)
    code = cli("eval", tmp_path / "m.onnx", "--data", tmp_path / "nan.npz")
    assert_clean_failure(code, capsys.readouterr().err, before, tmp_path, ["tensor 'x' contains NaN or Inf"])


# ----------------------------------------------------------------------------------------------
# ill-conditioned and rank-deficient Hessians

def hard_inputs(case, rng, n=60, f=16):
    x = rng.standard_normal((n, f))
    if case == "dead-units":
        x[:, :5] = 0
    elif case == "constant-inputs":  # collinear with the bias column
        x[:, 3], x[:, 7] = 3.0, -1.0
    elif case == "duplicate-columns":
        x[:, 1], x[:, 2] = x[:, 0], 2 * x[:, 0]
    elif case == "fewer-samples-than-columns":
        x = x[:6]  # 5 calibration samples (one is held out) for 17 columns
    elif case == "all-zero":
        x[:] = 0
    elif case == "badly-scaled":
        x *= np.logspace(-4, 4, f)
    elif case == "rank-one":
        x = np.outer(rng.standard_normal(n), rng.standard_normal(f))
    return x


HARD = ["dead-units", "constant-inputs", "duplicate-columns", "fewer-samples-than-columns", "all-zero",
        "badly-scaled", "rank-one"]
SINGULAR = ["constant-inputs", "fewer-samples-than-columns", "rank-one"]  # H singular, not by dead inputs




@pytest.mark.parametrize("case,dtype", [
    (c, d)
    for c in HARD for d in ([np.float32, np.float16] if c in ("constant-inputs", "duplicate-columns", "rank-one")
                            else [np.float32])])
def test_hard_hessians_give_finite_weights_for_every_method(case, dtype):
    """float16 weights too where the compensations are largest: they must not overflow when stored."""
    rng = np.random.default_rng(HARD.index(case))
    x = hard_inputs(case, rng).astype(dtype)
    model = single_layer("Gemm", rng.standard_normal((8, 16)), (1, 16), bias=rng.standard_normal(8),
                         attrs={"transB": 1}, dtype=dtype)
    for method in METHODS:
        for damp in (None, 0.0):
            result = prune(model, {"x": x}, PruneConfig(method=method, damp=damp, sparsity=0.5, default_exclude=False))
            rec = result.report.layers[0]
            w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in result.model.graph.initializer}
            assert all(np.isfinite(v).all() for v in w.values()), (method, damp)
            assert np.abs(w["W"]).max() < 1e3 and np.abs(w["B"]).max() < 1e3, (method, damp)  # no blow-up
            assert rec.sparsity == 0.5 and np.mean(w["W"] == 0) == 0.5, (method, damp)
            for v in (rec.error, rec.rel_error, rec.holdout_error, rec.predicted_error):
                assert v is not None and np.isfinite(v), (method, damp, rec)
            if rec.damp is not None and damp is not None and rec.damp > damp:
                assert f"dampening raised to {rec.damp:g}" in " ".join(rec.notes), (method, rec.notes)
            if method in ("lobs", "obc", "sparsegpt") and damp == 0.0 and case in SINGULAR:
                assert rec.damp > 0 and any("dampening raised" in n for n in rec.notes), (method, rec)
            fidelity = result.report.fidelity  # the pruned model, run on the held-out samples
            assert fidelity["rel_l2"] is None or np.isfinite(fidelity["rel_l2"]), (method, damp)


def test_hard_hessians_in_a_network_every_method_and_mode():
    """Dead ReLU units, duplicated and constant features, few samples, through a 3-layer net."""
    rng = np.random.default_rng(5)
    model = mlp(rng, sizes=(12, 16, 8, 4))
    b1 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    b1[:6] = -50.0  # six hidden units never fire
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(b1, "b1"))
    x = rng.standard_normal((9, 12)).astype(np.float32)
    x[:, 5] = x[:, 4]
    x[:, 9] = 1.0
    for method in METHODS:
        for extra in ({}, {"sequential": True}, {"pattern": (2, 4)}) + (({"global_sparsity": 0.6},) if method == "lobs"
                                                                       else ()):
            result = prune(model, {"x": x}, PruneConfig(method=method, default_exclude=False, **extra))
            for t in result.model.graph.initializer:
                assert np.isfinite(numpy_helper.to_array(t)).all(), (method, extra, t.name)
            for rec in result.report.layers:
                assert rec.skipped is None and 0 <= rec.sparsity < 1 and np.isfinite(rec.error), (method, extra, rec)


def test_sequential_keeps_weights_of_inputs_dead_on_the_calibration_data():
    rng = np.random.default_rng(5)
    model = mlp(rng, sizes=(12, 16, 8, 4))
    b1 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    b1[:6] = -50.0
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(b1, "b1"))
    x = rng.standard_normal((40, 12)).astype(np.float32)
    result = prune(model, {"x": x}, PruneConfig(default_exclude=False, sequential=True, sparsity=0.3))
    w2 = numpy_helper.to_array({t.name: t for t in result.model.graph.initializer}["W2"])
    np.testing.assert_array_equal(w2 == 0, result.masks["W2"])  # zero exactly where the mask says
    assert result.report.layers[1].sparsity == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_depthwise_layers_reach_the_layer_target(op):
    rng = np.random.default_rng(8)
    shape = (16, 1, 3, 3)  # 16 groups of 9 weights: 0.3 of 144 is 43 weights, 0.3 of 9 rounds to 3 (48)
    model = single_layer(op, rng.standard_normal(shape), (1, 16, 6, 6), attrs={"group": 16})
    result = prune(model, {"x": rng.standard_normal((30, 16, 6, 6)).astype(np.float32)},
                   PruneConfig(sparsity=0.3, default_exclude=False))
    assert int(result.masks["W"].sum()) == round(0.3 * 144)


# ----------------------------------------------------------------------------------------------
# atomic output


def test_save_writes_nothing_when_interrupted_or_failing(tmp_path, monkeypatch):
    import onnx_lobs.atomic as atomic
    import onnx_lobs.modelio as graph

    model = single_layer("MatMul", np.random.default_rng(0).standard_normal((64, 32)), (1, 64))
    out = tmp_path / "m.onnx"

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    for external in (False, True):
        for owner, attr in ((graph, "_externalize"), (atomic._Staged, "open"), (atomic._Staged, "commit")):
            if attr == "_externalize" and not external:
                continue
            with monkeypatch.context() as m:
                m.setattr(owner, attr, interrupt)
                with pytest.raises(KeyboardInterrupt):
                    save_model(model, str(out), external=external)
            assert os.listdir(tmp_path) == [], (external, attr)
    calls = []

    def fail_second(*a, **k):  # the data file went in, the model's rename fails
        calls.append(a)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied")
        return os.rename(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", fail_second)
        with pytest.raises(LobsError, match="m.onnx: cannot write there \\(Permission denied\\)"):
            save_model(model, str(out), external=True)
    assert os.listdir(tmp_path) == []  # the data file that went in is taken back


@pytest.mark.parametrize("route", ["named temporary file", "copied out of the anonymous file"])
def test_save_without_anonymous_files_or_proc(tmp_path, monkeypatch, route):
    """Where O_TMPFILE is missing (or /proc cannot link it), the fallbacks write the same files and
    clean up after an interruption."""
    import onnx_lobs.atomic as atomic

    def no_link(self):
        raise OSError(18, "Invalid cross-device link")

    if route == "named temporary file":
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    else:
        monkeypatch.setattr(atomic._Staged, "_link_hidden", no_link)
    model = single_layer("MatMul", np.random.default_rng(0).standard_normal((64, 32)), (1, 64))
    save_model(model, str(tmp_path / "m.onnx"), external=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert onnx_lobs.load_model(str(tmp_path / "m.onnx")).external == {"W"}

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic._Staged, "commit", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, str(tmp_path / "other.onnx"), external=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]


def test_save_replaces_an_existing_output_and_its_data_from_any_working_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.chdir(tmp_path)  # onnx.save_model refused to rewrite PATH.data relative to the cwd
    for k in range(3):
        model = single_layer("MatMul", rng.standard_normal((64, 32)), (1, 64))
        save_model(model, "m.onnx", external=True)
        assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
        again = onnx_lobs.load_model("m.onnx")
        assert again.external == {"W"}
        np.testing.assert_array_equal(numpy_helper.to_array(again.model.graph.initializer[0]),
                                      numpy_helper.to_array(model.graph.initializer[0]))
        save_model(model, "plain.onnx")
        assert onnx.load("plain.onnx") == model
        os.remove("plain.onnx")
    assert oct(os.stat("m.onnx").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


HOOK = textwrap.dedent("""
    import os, signal, sys, time
    point, sig, nth = sys.argv[1], getattr(signal, sys.argv[2]), int(sys.argv[3])
    from onnx_lobs import atomic, calibration, hessian
    owner, attr = {"calibrate": (calibration.ArraySource, "_slices"),
                   "solve": (hessian.HessianAccumulator, "hessian"),
                   "write": (atomic._Staged, "open"), "commit": (atomic._Staged, "commit")}[point]
    original, calls = getattr(owner, attr), []

    def hooked(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), sig)
            time.sleep(0.2)  # a blocked SIGINT stays pending; an unblocked one lands here
        return original(*args, **kwargs)

    setattr(owner, attr, hooked)
    from onnx_lobs.cli import main
    main(sys.argv[4:])
""")


def default_sigint():
    """In the child: SIGINT back to its default. A test run started in the background by a
    non-interactive shell (as some CI runners do) inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt, so the interrupts these tests send would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def anonymous_files_supported(folder) -> bool:
    """O_TMPFILE linked through /proc: what makes a write cut by SIGKILL leave nothing behind."""
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        return False
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{fd}", ".probe", src_dir_fd=dfd, dst_dir_fd=dfd)
        os.unlink(".probe", dir_fd=dfd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.close(dfd)


def check_output_state(folder, inputs: dict, out="out.onnx") -> str:
    """'none' or 'complete'; fails on anything partial, stray or modified."""
    names = set(os.listdir(folder))
    assert {k: v for k, v in snapshot(folder).items() if k in inputs} == inputs  # inputs untouched
    extra = names - set(inputs)
    assert extra <= {out, out + ".data"}, f"stray files: {sorted(extra - {out, out + '.data'})}"
    if not extra:
        return "none"
    assert out in extra, "a data file without its model"
    model = onnx.load(os.path.join(folder, out))  # with its external data, when it has some
    onnx.checker.check_model(model)
    return "complete"


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    """A model kept in external data (so the output has a data file too) and its calibration data."""
    folder = tmp_path_factory.mktemp("kill")
    rng = np.random.default_rng(0)
    onnx.save_model(small_unet(rng), folder / "unet.onnx", save_as_external_data=True, location="unet.onnx.data",
                    size_threshold=0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((80, 3, 8, 8)).astype(np.float32))
    (folder / "hook.py").write_text(HOOK)
    return folder


# (point, signal, nth call, the state it must leave, the exit code)
KILLS = [
    ("calibrate", "SIGINT", 2, "none", 130),
    ("calibrate", "SIGKILL", 2, "none", -9),
    ("solve", "SIGINT", 2, "none", 130),
    ("solve", "SIGKILL", 1, "none", -9),
    ("write", "SIGINT", 1, "none", 130),  # the data file half-written
    ("write", "SIGKILL", 2, "none", -9),  # the data file written, the model half-written
    ("commit", "SIGKILL", 1, "none", -9),  # both written, nothing renamed yet
    ("commit", "SIGINT", 1, "complete", 130),  # held back until both are in place
    ("commit", "SIGINT", 2, "complete", 130),  # ... the same, between the data file and the model
]


@pytest.mark.parametrize("point,sig,nth,state,code", KILLS, ids=[f"{k[0]}{k[2]}-{k[1]}" for k in KILLS])
def test_interrupted_or_killed_runs_leave_no_partial_output(kill_setup, tmp_path, point, sig, nth, state, code):
    if sig == "SIGKILL" and point in ("write", "commit") and not anonymous_files_supported(str(tmp_path)):
        pytest.skip("no O_TMPFILE here: a SIGKILL while writing leaves the hidden temporary file")
    for name in ("unet.onnx", "unet.onnx.data", "calib.npz"):
        shutil.copy(kill_setup / name, tmp_path / name)  # (onnx refuses hard-linked external data)
    inputs = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, str(kill_setup / "hook.py"), point, sig, str(nth),
                           "prune", "unet.onnx", "-o", "out.onnx", "--calib", "calib.npz", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=default_sigint)
    assert proc.returncode == code, proc.stderr
    if sig == "SIGINT":
        assert proc.stderr.strip().splitlines()[-1] == "onnx-lobs: interrupted" and "Traceback" not in proc.stderr
    assert check_output_state(str(tmp_path), inputs) == state


def test_kills_at_random_moments_leave_whole_outputs_or_none(kill_setup, tmp_path):
    for name in ("unet.onnx", "unet.onnx.data", "calib.npz"):
        shutil.copy(kill_setup / name, tmp_path / name)  # (onnx refuses hard-linked external data)
    inputs = snapshot(tmp_path)
    seen = set()
    for delay, sig in ((1.0, signal.SIGKILL), (2.0, signal.SIGINT), (3.0, signal.SIGKILL)):
        proc = subprocess.Popen([sys.executable, "-m", "onnx_lobs", "prune", "unet.onnx", "-o", "out.onnx",
                                 "--calib", "calib.npz", "--quiet", "--method", "obc"],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=default_sigint)
        time.sleep(delay)
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        # killed, interrupted (130; -SIGINT when the signal lands while Python is still importing,
        # as on a loaded machine) or done
        assert proc.returncode in (0, 130, -signal.SIGINT, -signal.SIGKILL), proc.returncode
        seen.add(check_output_state(str(tmp_path), inputs))
        for name in ("out.onnx", "out.onnx.data"):
            if os.path.exists(tmp_path / name):
                os.remove(tmp_path / name)
    assert seen <= {"none", "complete"}


# ----------------------------------------------------------------------------------------------
# reproducibility


def _report_without_timings(path):
    data = json.loads(open(path).read())
    data.pop("timings")
    for rec in data["layers"]:
        rec.pop("seconds")
        rec.pop("solve_seconds")
    return data


@pytest.fixture(scope="module")
def repro_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("repro")
    rng = np.random.default_rng(1)
    onnx.save(small_unet(rng), folder / "unet.onnx")
    np.savez(folder / "calib.npz", x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32))
    onnx.save(mlp(rng), folder / "mlp.onnx")
    np.savez(folder / "mlp.npz", x=rng.standard_normal((200, 12)).astype(np.float32))
    return folder


@pytest.mark.parametrize("sequential", [False, True], ids=["independent", "sequential"])
@pytest.mark.parametrize("method", METHODS)
def test_same_inputs_and_seed_give_identical_bytes(repro_setup, tmp_path, method, sequential, capsys):
    args = ["prune", repro_setup / "unet.onnx", "--calib", repro_setup / "calib.npz", "--method", method, "--quiet",
            "--no-default-exclude", "--seed", "7"] + (["--sequential"] if sequential else [])
    for k in range(2):
        assert cli(*args, "-o", tmp_path / f"out{k}.onnx", "--report", tmp_path / f"r{k}.json") == 0
    capsys.readouterr()
    assert (tmp_path / "out0.onnx").read_bytes() == (tmp_path / "out1.onnx").read_bytes()
    assert _report_without_timings(tmp_path / "r0.json") == _report_without_timings(tmp_path / "r1.json")


def test_identical_bytes_across_processes_and_hash_seeds(repro_setup, tmp_path):
    outputs = []
    for k, hash_seed in enumerate(("1", "2")):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        proc = subprocess.run([sys.executable, "-m", "onnx_lobs", "prune", str(repro_setup / "mlp.onnx"),
                               "-o", f"out{k}.onnx", "--calib", str(repro_setup / "mlp.npz"), "--quiet",
                               "--sequential", "--global", "0.6", "--report", f"r{k}.json"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs.append((tmp_path / f"out{k}.onnx").read_bytes())
    assert outputs[0] == outputs[1]
    assert _report_without_timings(tmp_path / "r0.json") == _report_without_timings(tmp_path / "r1.json")


def test_the_seed_only_matters_for_random_calibration():
    """With real data two seeds give the same weights (the seed is recorded); random data is
    drawn from the seed, so the same seed gives the same model."""
    rng = np.random.default_rng(2)
    model = mlp(rng)
    x = {"x": rng.standard_normal((40, 12)).astype(np.float32)}
    a = prune(model, x, PruneConfig(seed=1, default_exclude=False)).model
    b = prune(model, x, PruneConfig(seed=2, default_exclude=False)).model
    assert [i.SerializeToString() for i in a.graph.initializer] == [i.SerializeToString() for i in b.graph.initializer]
    assert '"seed": 1' in next(p.value for p in a.metadata_props if p.key == "onnx_lobs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r1 = prune(model, "random", PruneConfig(seed=1, default_exclude=False)).model
        r2 = prune(model, "random", PruneConfig(seed=1, default_exclude=False)).model
    assert r1.SerializeToString() == r2.SerializeToString()
