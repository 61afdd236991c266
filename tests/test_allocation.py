"""Allocation: default exclusions, explicit overrides and global allocation by normalised OBS cost."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_lobs import LobsError, PruneConfig, prune
from onnx_lobs.allocation import allocate, cheapest_choice, input_derived, removal_costs
from onnx_lobs.hessian import damped_inverse
from tests.builders import make_model, mlp, small_cnn, tensor, vi


def test_allocate_takes_the_globally_cheapest():
    costs = [np.array([0.1, 0.2, 0.9]), np.array([0.05, 0.3]), np.array([1.0])]
    assert allocate(costs, 3) == [2, 1, 0]
    assert allocate(costs, 0) == [0, 0, 0]
    assert allocate(costs, 99) == [3, 2, 1]
    # brute force: the counts minimise the summed cost over all splits of 4 removals
    best = min((sum(c[:k].sum() for c, k in zip(costs, ks)), ks)
               for ks in np.ndindex(4, 3, 2) if sum(ks) == 4)[1]
    assert allocate(costs, 4) == list(best)


@pytest.mark.parametrize("seed", range(6))
def test_cheapest_choice_is_the_brute_force_optimum(seed):
    """Against every combination: savings on a grid of the target's bins (so the rounding down
    loses nothing), costs random and not convex."""
    rng = np.random.default_rng(seed)
    options = [[(0.0, 0.0)] + [(float(s), float(c)) for s, c in zip(np.sort(rng.choice(np.arange(1, 9), 3, False)),
                                                                      np.cumsum(rng.random(3)))]
               for _ in range(4)]
    target = 12.0
    combos = [ks for ks in np.ndindex(*(len(o) for o in options))
              if sum(o[k][0] for o, k in zip(options, ks)) >= target]
    best = min(sum(o[k][1] for o, k in zip(options, ks)) for ks in combos)
    got = cheapest_choice(options, target, bins=120)
    assert sum(o[k][0] for o, k in zip(options, got)) >= target
    assert sum(o[k][1] for o, k in zip(options, got)) == pytest.approx(best)


def test_cheapest_choice_takes_small_steps_where_a_big_one_would_pass_the_target():
    # a greedy by cost per unit saved takes group 0's step (cost 5 for 10: 0.5 per unit), far past 3
    options = [[(0.0, 0.0), (10.0, 5.0)], [(0.0, 0.0), (2.0, 1.5), (4.0, 3.5)]]
    assert cheapest_choice(options, 3.0) == [0, 2]
    assert cheapest_choice(options, 0.0) == [0, 0]
    assert cheapest_choice(options, 99.0) == [1, 2]  # out of reach: everything


def test_cheapest_choice_reaches_a_target_that_only_every_largest_saving_meets():
    """--global 0.5 --pattern 2:4 asks for exactly what every layer's pattern removes: counted in
    bins rounded down (256 + 1024 + 2048 weights, 2000 bins) the sum falls a few bins short, and
    the choice must still be every layer's pattern, not none."""
    options = [[(0, 0.0), (256, 1e-4)], [(0, 0.0), (1024, 2e-3)], [(0, 0.0), (2048, 3e-3)]]
    assert cheapest_choice(options, 3328) == [1, 1, 1]
    assert cheapest_choice(options, 3000) == [0, 1, 1]


def test_removal_costs_are_obs_costs_over_output_energy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5))
    h = x.T @ x / 300
    w = rng.standard_normal((3, 5))
    hinv = damped_inverse(h, 0.01).hinv
    expected = np.sort((w ** 2 / (2 * np.diagonal(hinv))).ravel()) / (0.5 * np.sum((w @ h) * w))
    np.testing.assert_allclose(removal_costs(w, h, None), expected)
    protect = np.array([False] * 4 + [True])
    assert removal_costs(w, h, protect).size == 12


def test_first_layer_with_few_inputs_is_left_dense_by_default():
    rng = np.random.default_rng(1)
    model = small_cnn(rng)  # conv1 reads 2 channels straight from the input
    x = rng.standard_normal((100, 2, 8, 8)).astype(np.float32)
    recs = {r.name: r for r in prune(model, {"x": x}).report.layers}
    assert recs["conv1"].skipped.startswith("default exclusion: first layer with only 2 input channel")
    assert recs["dwconv"].skipped is None and recs["fc"].skipped is None
    recs = {r.name: r for r in prune(model, {"x": x}, PruneConfig(layer_sparsity={"conv1": 0.3})).report.layers}
    assert recs["conv1"].sparsity == pytest.approx(0.3, abs=0.01)
    recs = {r.name: r for r in prune(model, {"x": x}, PruneConfig(default_exclude=False)).report.layers}
    assert recs["conv1"].sparsity == pytest.approx(0.5, abs=0.01)


def test_stem_behind_layout_and_normalisation_ops_is_still_a_first_layer():
    """Keras/TF exports put Transpose (NHWC->NCHW), Sub/Div normalisation and Pad before the stem."""
    rng = np.random.default_rng(2)
    model = small_cnn(rng)
    g = model.graph
    g.input[0].CopyFrom(vi("x_nhwc", TensorProto.FLOAT, ["N", 8, 8, 2]))
    g.initializer.extend([tensor("mean", np.float32(0.5)), tensor("std", np.float32(0.25))])
    pre = [helper.make_node("Transpose", ["x_nhwc"], ["t"], perm=[0, 3, 1, 2]),
           helper.make_node("Sub", ["t", "mean"], ["centred"]),
           helper.make_node("Div", ["centred", "std"], ["x"])]
    for i, node in enumerate(pre):
        g.node.insert(i, node)
    onnx.checker.check_model(model)
    assert {"x_nhwc", "t", "centred", "x"} <= input_derived(model)
    # a dynamic flatten (Shape -> Gather -> Concat -> Reshape) keeps the raw input; a Conv's output does not
    flat = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["xf"]), helper.make_node("Reshape", ["c1", "shape"], ["cf"])]
    probe = make_model(list(g.node) + flat, [g.input[0]], [vi("xf", shape=["N", 128]), vi("cf", shape=["N", 384])],
                       list(g.initializer) + [tensor("zero", np.int64(0)), tensor("zero1", np.array([0], np.int64)),
                                              tensor("minus1", np.array([-1], np.int64))])
    seen = input_derived(probe)
    assert "xf" in seen and "cf" not in seen and "shape" not in seen
    x = rng.standard_normal((60, 8, 8, 2)).astype(np.float32)
    recs = {r.name: r for r in prune(model, {"x_nhwc": x}).report.layers}
    assert recs["conv1"].skipped.startswith("default exclusion: first layer with only 2 input channel")
    assert recs["dwconv"].skipped is None  # reads a Conv's output, not a preprocessed input


def test_global_reaches_the_overall_sparsity():
    rng = np.random.default_rng(2)
    model = mlp(rng, sizes=(24, 64, 16, 8))
    # low-rank inputs make fc1 far more redundant than the rest
    x = (rng.standard_normal((800, 4)) @ rng.standard_normal((4, 24))
         + 0.05 * rng.standard_normal((800, 24))).astype(np.float32)
    glob = prune(model, {"x": x}, PruneConfig(global_sparsity=0.7, default_exclude=False)).report
    assert glob.sparsity == pytest.approx(0.7, abs=1e-3)
    assert len({round(r.sparsity, 3) for r in glob.layers}) > 1
    seq = prune(model, {"x": x}, PruneConfig(global_sparsity=0.7, default_exclude=False, sequential=True)).report
    assert seq.sparsity == pytest.approx(0.7, abs=1e-3)


def test_global_counts_explicit_layers_and_not_excluded_ones():
    rng = np.random.default_rng(3)
    model = mlp(rng)
    x = rng.standard_normal((200, 12)).astype(np.float32)
    cfg = PruneConfig(global_sparsity=0.4, layer_sparsity={"fc3": 0.1}, exclude=["fc2"], default_exclude=False)
    report = prune(model, {"x": x}, cfg).report
    recs = {r.name: r for r in report.layers}
    assert recs["fc3"].sparsity == pytest.approx(0.1, abs=0.02) and recs["fc2"].skipped
    pruned = [r for r in report.layers if r.params and not r.skipped]
    assert sum(r.sparsity * r.params for r in pruned) == pytest.approx(0.4 * sum(r.params for r in pruned), rel=1e-2)


def test_global_conflicts_are_user_errors():
    model = mlp(np.random.default_rng(0))
    with pytest.raises(LobsError, match="--global cannot be combined"):
        prune(model, "random", PruneConfig(global_sparsity=0.5, max_error=0.1))
    with pytest.raises(LobsError, match="needs --allocation output"):
        prune(model, "random", PruneConfig(global_sparsity=0.5, pattern=(2, 4), allocation="layer"))
    with pytest.raises(LobsError, match="decides between layers"):
        prune(model, "random", PruneConfig(allocation="output"))
