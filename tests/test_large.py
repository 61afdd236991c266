"""A model over the 2 GB protobuf limit, stored with external data, end to end through the CLI."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs.modelio import PROTOBUF_LIMIT
from tests.builders import tensor, vi
from tests.test_cli import cli, digest

pytestmark = pytest.mark.slow


@pytest.fixture
def big_dir(tmp_path):
    yield tmp_path
    for name in os.listdir(tmp_path):  # 6 GB of files: do not leave them to pytest's retention
        os.remove(tmp_path / name)


def test_model_over_2gb_with_external_data(big_dir, capsys):
    tmp_path = big_dir
    rng = np.random.default_rng(0)
    dim, vocab = 64, PROTOBUF_LIMIT // (4 * 64) + 50_000  # a 2.06 GB embedding table
    table = np.empty((vocab, dim), np.float32)
    table[:] = rng.standard_normal(dim).astype(np.float32)
    table *= (np.arange(vocab, dtype=np.float32) % 97 / 97.0)[:, None]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["h"], name="proj"),
             helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "big", [vi("ids", TensorProto.INT64, ["N"])],
                              [vi("y", TensorProto.FLOAT, ["N", 16])],
                              [numpy_helper.from_array(table, "table"),
                               tensor("W", rng.standard_normal((dim, 16)).astype(np.float32))])
    del table
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    src = tmp_path / "big.onnx"
    onnx.save_model(model, src, save_as_external_data=True, location="big.onnx.data")
    del model, graph
    before = (digest(src), os.path.getsize(tmp_path / "big.onnx.data"))
    np.savez(tmp_path / "ids.npz", ids=rng.integers(0, vocab, 300).astype(np.int64))
    out = tmp_path / "out.onnx"
    code = cli("prune", str(src), "-o", str(out), "--calib", str(tmp_path / "ids.npz"), "--sparsity", "0.5",
               "--quiet")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "proj" in captured.out and "external data" not in captured.err
    assert (tmp_path / "out.onnx.data").stat().st_size > PROTOBUF_LIMIT
    assert (digest(src), os.path.getsize(tmp_path / "big.onnx.data")) == before
    assert sorted(p for p in os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data", "ids.npz", "out.onnx",
                                                       "out.onnx.data"]
    assert cli("eval", str(out), "--data", str(tmp_path / "ids.npz"), "--reference", str(src), "--json") == 0
    assert '"rel_l2"' in capsys.readouterr().out
