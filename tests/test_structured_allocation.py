"""The model-wide channel allocation: layer-wise costs rescaled to measured output errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs.pruning import PruneConfig, prune
from onnx_lobs.structured_allocation import Trial, choose_counts


def _config(share: float):
    return SimpleNamespace(flops=None, global_sparsity=share, round_to=1, progress=False)


def _trials(costs: list[list[float]]) -> list[Trial]:
    return [Trial(SimpleNamespace(channels=len(c) + 1, width=1, products={}), list(range(len(c))), c) for c in costs]


def test_without_a_measure_the_layer_wise_costs_decide():
    trials = _trials([[1.0, 2.0, 3.0], [1.5, 2.5, 3.5]])
    a = choose_counts(trials, _config(0.5), None, [])
    assert a.by == "layer" and a.counts == [2, 2]  # 1, 1.5, 2, 2.5


def test_measured_output_errors_move_the_removals_to_the_group_the_outputs_do_not_feel():
    costs = [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]] * 2
    gains = [100.0, 1.0]  # the same layer-wise costs; group 0's error reaches the outputs 100x more
    calls = []

    def measure(g, n):
        calls.append((g, n))
        return gains[g] * sum(costs[g][:n])
    a = choose_counts(_trials(costs), _config(0.5), None, [], measure)
    assert a.by == "output"
    assert a.counts == [1, 7]  # 8 of 16 channels: group 1 gives all it may, group 0 its cheapest
    np.testing.assert_allclose(a.output_errors, [100.0, 28.0])
    assert len(calls) == len(set(calls)) == a.probes  # each (group, count) measured once
    np.testing.assert_allclose(a.summary()["predicted_rel_l2"], np.sqrt(128.0))
    # the first choice tried is the layer-wise one (4 and 4: 100 * 10 + 10); the best measured is kept
    np.testing.assert_allclose(a.tried[0], np.sqrt(1010.0))
    assert min(a.tried) == a.summary()["predicted_rel_l2"]


def _branches(seed=0):
    """y = relu(x A) B + 0.01 relu(x C) D: two hidden groups alike layer by layer, but the second
    reaches the output 100 times smaller."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, a):
        inits.append(numpy_helper.from_array(a.astype(np.float32), name))
        return name
    for k, scale in (("a", 1.0), ("c", 0.01)):
        nodes += [helper.make_node("MatMul", ["x", const(f"{k}.w", rng.standard_normal((10, 16)))], [f"{k}.m"],
                                   name=f"{k}.up"),
                  helper.make_node("Add", [f"{k}.m", const(f"{k}.b", 0.1 * rng.standard_normal(16))], [f"{k}.h"]),
                  helper.make_node("Relu", [f"{k}.h"], [f"{k}.r"]),
                  helper.make_node("MatMul", [f"{k}.r", const(f"{k}.w2", scale * rng.standard_normal((16, 4)))],
                                   [f"{k}.y"])]
    nodes.append(helper.make_node("Add", ["a.y", "c.y"], ["y"]))
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_output_allocation_prunes_where_the_outputs_do_not_feel_it():
    model = _branches()
    x = np.random.default_rng(1).standard_normal((400, 10)).astype(np.float32)
    runs = {}
    for allocation in ("layer", "output"):
        config = PruneConfig(structured=True, global_sparsity=0.5, round_to=1, latency=False, allocation=allocation)
        runs[allocation] = prune(model, {"x": x}, config).report
    kept = {al: {g.producers[0]: g.kept for g in r.groups if g.kept is not None} for al, r in runs.items()}
    assert kept["output"]["c.up"] < kept["layer"]["c.up"] and kept["output"]["a.up"] > kept["layer"]["a.up"]
    assert runs["output"].fidelity["rel_l2"] < 0.5 * runs["layer"].fidelity["rel_l2"]
    out = runs["output"]
    assert out.summary["allocation"]["by"] == "output" and runs["layer"].summary["allocation"]["by"] == "layer"
    # the groups' single errors add up to the whole model's, on the same held-out samples
    np.testing.assert_allclose(out.summary["allocation"]["predicted_rel_l2"], out.fidelity["rel_l2"], rtol=0.3)
