"""The command line on small generated models of every op kind, and its behaviour on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx_lobs.cli import CALIBRATION_KEY, main
from tests import subgraphs
from tests.builders import mlp, single_layer, small_cnn


def cli(*args):
    """Run in-process; returns (exit code, stdout, stderr) via capsys by the caller."""
    try:
        main(list(args))
    except SystemExit as e:
        return e.code
    return 0


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def models(rng):
    """(name, model, calibration input) for every op kind and storage place."""
    return [
        ("mlp", mlp(rng), rng.standard_normal((120, 12))),
        ("cnn", small_cnn(rng), rng.standard_normal((60, 2, 8, 8))),
        ("conv1d", single_layer("Conv", rng.standard_normal((4, 3, 3)), (1, 3, 16), bias=rng.standard_normal(4),
                                attrs={"strides": [2], "auto_pad": "SAME_UPPER"}), rng.standard_normal((60, 3, 16))),
        ("conv3d", single_layer("Conv", rng.standard_normal((4, 2, 2, 3, 3)), (1, 2, 4, 6, 6),
                                attrs={"pads": [0, 1, 1, 0, 1, 1]}), rng.standard_normal((40, 2, 4, 6, 6))),
        ("depthwise", single_layer("Conv", rng.standard_normal((6, 1, 3, 3)), (1, 3, 6, 6),
                                   attrs={"group": 3, "auto_pad": "VALID"}), rng.standard_normal((40, 3, 6, 6))),
        ("matmul3d", single_layer("MatMul", rng.standard_normal((8, 5)), (1, 4, 8)), rng.standard_normal((60, 4, 8))),
        ("if", subgraphs.if_model(rng), rng.standard_normal((120, 6))),
        ("loop", subgraphs.loop_model(rng), rng.standard_normal((120, 5))),
        ("constant", subgraphs.constant_identity_model(rng), rng.standard_normal((120, 8))),
    ]


@pytest.mark.parametrize("index", range(9))
def test_prune_inspect_eval_on_every_kind(index, tmp_path, capsys):
    rng = np.random.default_rng(index)
    name, model, x = models(rng)[index]
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    before = digest(src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x.astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"

    assert cli("inspect", str(src)) == 0
    text = capsys.readouterr().out
    assert "prunable layers" in text

    code = cli("prune", str(src), "-o", str(out), "--calib", str(calib), "--sparsity", "0.5",
               "--report", str(report), "--quiet", "--no-default-exclude")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "overall sparsity" in captured.out and captured.err == ""
    assert digest(src) == before
    onnx.checker.check_model(onnx.load(out))
    data = json.loads(report.read_text())
    assert {"layers", "sparsity", "config", "versions", "timings"} <= set(data)
    assert data["sparsity"] > 0.3
    assert all({"name", "op", "rows", "cols", "sparsity", "error", "seconds"} <= set(r) for r in data["layers"]
               if not r["skipped"])

    assert cli("eval", str(out), "--data", str(calib), "--reference", str(src), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"accuracy", "top1_agreement", "rel_l2", "cosine"}
    assert result["accuracy"] is None and 0 < result["rel_l2"] < 1


def test_inspect_json_lists_layers_and_skips(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(subgraphs.shared_model(np.random.default_rng(0)), path)
    assert cli("inspect", str(path), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"][0]["uses"] == 2
    assert data["layers"][0]["storage"] == "initializer"
    assert {"name", "op", "weight", "shape", "rows", "cols", "groups", "sparsity"} <= set(data["layers"][0])
    assert "also used by" in data["skipped"][0]["reason"]


def test_eval_accuracy_with_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "m.onnx"
    onnx.save(mlp(rng), path)
    x = rng.standard_normal((50, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=np.zeros(50, np.int64))
    assert cli("eval", str(path), "--data", str(tmp_path / "d.npz")) == 0
    assert "accuracy:" in capsys.readouterr().out
    assert cli("eval", str(path), "--data", str(tmp_path / "d.npz"), "--labels", "nope") == 1
    assert "no labels under key 'nope'" in capsys.readouterr().err


def test_bundled_calibration_from_metadata(tmp_path, capsys):
    rng = np.random.default_rng(0)
    model = mlp(rng)
    model.metadata_props.add(key=CALIBRATION_KEY, value="calib.npz")
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((40, 12)).astype(np.float32))
    assert cli("prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--quiet") == 0
    assert "wrote" in capsys.readouterr().out


def bad_cases(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.onnx"
    onnx.save(mlp(rng), good)
    (tmp_path / "junk.onnx").write_bytes(os.urandom(500))
    (tmp_path / "text.onnx").write_text("not a model")
    np.savez(tmp_path / "names.npz", input=np.zeros((8, 12), np.float32))
    np.savez(tmp_path / "shape.npz", x=np.zeros((8, 11), np.float32))
    np.savez(tmp_path / "dtype.npz", x=np.zeros((8, 12), np.int32))
    nan = np.zeros((8, 12), np.float32)
    nan[3, 4] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan)
    ok = tmp_path / "ok.npz"
    np.savez(ok, x=np.zeros((8, 12), np.float32))
    out = str(tmp_path / "out.onnx")
    return [
        (["prune", str(tmp_path / "junk.onnx"), "-o", out, "--calib", str(ok)], "junk.onnx"),
        (["prune", str(tmp_path / "text.onnx"), "-o", out, "--calib", str(ok)], "text.onnx"),
        (["prune", str(tmp_path / "missing.onnx"), "-o", out, "--calib", str(ok)], "missing.onnx: no such file"),
        (["prune", str(good), "-o", out, "--calib", str(tmp_path / "names.npz")], "model input 'x' is missing"),
        (["prune", str(good), "-o", out, "--calib", str(tmp_path / "shape.npz")], "tensor 'x' has shape"),
        (["prune", str(good), "-o", out, "--calib", str(tmp_path / "dtype.npz")], "tensor 'x' has dtype int32"),
        (["prune", str(good), "-o", out, "--calib", str(tmp_path / "nan.npz")], "tensor 'x' contains NaN"),
        (["prune", str(good), "-o", out], "no calibration data"),
        (["prune", str(good), "-o", str(tmp_path / "nodir" / "o.onnx"), "--calib", str(ok)], "does not exist"),
        (["prune", str(good), "-o", str(good), "--calib", str(ok)], "refusing to overwrite the input"),
        (["prune", str(good), "-o", out, "--calib", str(ok), "--sparsity", "1.5"], "sparsity must be in"),
        (["prune", str(good), "-o", out, "--calib", str(ok), "--method", "nope"], "unknown method 'nope'"),
        (["prune", str(good), "-o", out, "--calib", str(ok), "--layer-sparsity", "fc1"], "expected GLOB=S"),
        (["eval", str(good), "--data", str(tmp_path / "shape.npz")], "tensor 'x' has shape"),
        (["inspect", str(tmp_path / "junk.onnx")], "junk.onnx"),
    ]


def test_bad_inputs_give_one_line_errors_and_no_output(tmp_path, capsys):
    for args, message in bad_cases(tmp_path):
        before = {p: digest(tmp_path / p) for p in os.listdir(tmp_path) if os.path.isfile(tmp_path / p)}
        code = cli(*args)
        err = capsys.readouterr().err
        assert code != 0, args
        assert message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "out.onnx").exists()
        after = {p: digest(tmp_path / p) for p in os.listdir(tmp_path) if os.path.isfile(tmp_path / p)}
        assert after == before  # inputs untouched, nothing half-written


def test_unwritable_output(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    onnx.save(mlp(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 12), np.float32))
    (tmp_path / "afile").write_text("")
    args = ["prune", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "--quiet"]
    assert cli(*args, "-o", str(tmp_path / "afile" / "o.onnx")) == 1
    assert "output folder does not exist" in capsys.readouterr().err
    assert cli(*args, "-o", str(tmp_path)) == 2  # click's usage error
    assert "is a directory" in capsys.readouterr().err

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)  # the final rename fails, as on a read-only mount
    assert cli(*args, "-o", str(tmp_path / "o.onnx")) == 1
    assert "o.onnx: cannot write there (Permission denied)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["afile", "c.npz", "m.onnx"]


def test_subprocess_entry_points(tmp_path):
    """The console script and python -m behave the same, with real exit codes and no traceback."""
    rng = np.random.default_rng(0)
    onnx.save(mlp(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((40, 12)).astype(np.float32))
    ok = subprocess.run([sys.executable, "-m", "onnx_lobs", "prune", "m.onnx", "-o", "o.onnx", "--calib", "c.npz"],
                        cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "fc1" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "onnx_lobs", "prune", "nope.onnx", "-o", "x.onnx", "--calib", "c.npz"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "onnx-lobs: error: nope.onnx: no such file"
    usage = subprocess.run([sys.executable, "-m", "onnx_lobs", "prune"], cwd=tmp_path, capture_output=True, text=True)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_structured_prune_and_inspect(tmp_path, capsys):
    from tests import channel_graphs as cg

    model, layers = cg.built(["residual", "lrn"])
    src, out, calib, rep = (str(tmp_path / n) for n in ("m.onnx", "o.onnx", "c.npz", "r.json"))
    onnx.save(model, src)
    np.savez(calib, **cg.feed(model, 64))
    before = digest(src)
    assert cli("inspect", src, "--structured", "--json") == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert groups[0]["producers"][0] == layers[0] and "LRN" in groups[0]["blocked"]  # the stream meets it
    assert groups[1]["blocked"] is None
    assert any("LRN" in (g["blocked"] or "") for g in groups)
    assert cli("prune", src, "-o", out, "--structured", "--sparsity", "0.5", "--round-to", "2", "--calib", calib,
               "--no-default-exclude", "--report", rep, "--quiet") == 0
    text = capsys.readouterr().out
    assert "8 -> 4" in text and "kept whole:" in text and "LRN" in text
    report = json.load(open(rep))
    assert report["summary"]["params_after"] < report["summary"]["params_before"]
    speed = report["summary"]["latency"]
    assert speed["threads"] >= 1 and speed["batch_1"]["before_ms"] > 0 and speed["batch_1"]["runs"] >= 5
    assert any(g["kept"] == 4 for g in report["groups"])
    assert digest(src) == before
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert "onnx_lobs.structured" in meta and "onnx_lobs" in meta
    # the two-step use: N:M on the shrunk model
    assert cli("prune", out, "-o", str(tmp_path / "nm.onnx"), "--pattern", "2:4", "--calib", calib, "--quiet") == 0
    assert "2:4" in capsys.readouterr().out
    assert cli("prune", src, "-o", str(tmp_path / "x.onnx"), "--structured", "--method", "obc",
               "--calib", calib) == 1
    assert "--structured works with --method" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.onnx")
    # the allocation: measured at the outputs by default, refused where it decides nothing
    assert cli("prune", src, "-o", out, "--structured", "--flops", "0.7", "--round-to", "2", "--calib", calib,
               "--no-latency", "--no-default-exclude", "--report", rep, "--quiet") == 0
    assert "allocation by output:" in capsys.readouterr().out
    report = json.load(open(rep))
    assert report["summary"]["allocation"]["by"] == "output" and report["config"]["allocation"] is None
    assert all(g["output_error"] is not None for g in report["groups"] if g["kept"] is not None)
    for args, message in ((["--structured", "--allocation", "layer"], "give it with --flops or --global"),
                          (["--allocation", "uniform", "--global", "0.5"], "not with --global"),
                          (["--sparsity", "0.5", "--global", "0.5"], "give one")):
        assert cli("prune", src, "-o", str(tmp_path / "x.onnx"), "--calib", calib, *args) == 1
        assert message in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "x.onnx")


def test_the_mode_flags_and_the_default_under_a_pattern(tmp_path, capsys):
    rng = np.random.default_rng(2)
    src, out, calib, rep = (str(tmp_path / n) for n in ("m.onnx", "o.onnx", "c.npz", "r.json"))
    onnx.save(mlp(rng), src)
    np.savez(calib, x=rng.standard_normal((120, 12)).astype(np.float32))
    common = ["-o", out, "--calib", calib, "--no-default-exclude", "--report", rep, "--quiet"]
    assert cli("prune", src, "--pattern", "2:4", *common) == 0
    text, report = capsys.readouterr().out, json.load(open(rep))
    kept = report["mode"]["kept"]
    assert f"{kept} mode kept: held-out rel L2" in text
    assert report["config"]["sequential"] == (kept == "sequential")
    assert set(report["mode"]["rel_l2"]) == {"independent", "sequential"}
    for flag, sequential in (("--independent", False), ("--sequential", True)):
        assert cli("prune", src, "--pattern", "2:4", flag, *common) == 0
        report = json.load(open(rep))
        assert report["mode"] is None and report["config"]["sequential"] is sequential
        assert "mode kept" not in capsys.readouterr().out
    assert cli("prune", src, *common) == 0  # no pattern: independent, one run
    report = json.load(open(rep))
    assert report["mode"] is None and report["config"]["sequential"] is False
