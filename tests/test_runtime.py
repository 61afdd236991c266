"""onnxruntime sessions: a model over the protobuf limit is handed over without a disk copy."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs import modelio, runtime


def test_large_initializers_go_to_onnxruntime_from_memory(monkeypatch):
    rng = np.random.default_rng(0)
    table, w = rng.standard_normal((70_000, 8)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"]),
                               helper.make_node("MatMul", ["e", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", 1 << 20)  # the 2.2 MB table is "over the limit"
    session = runtime.make_session(model)
    assert [a.shape for a in session.lobs_arrays] == [(70_000, 8)]  # handed over, not written to disk
    ids = np.array([0, 69_999, 5])
    np.testing.assert_allclose(session.run(None, {"ids": ids})[0], table[ids] @ w, rtol=1e-5)
    assert len(model.graph.initializer[0].raw_data) == table.nbytes  # the caller's model is untouched
