"""Structured pruning end to end, against an independent reference: the original model with the
pruned model's weights written back at the kept positions and the removed channels' consumer
columns set to zero, run in onnxruntime. Removing channels must be exactly that."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from onnx_lobs.errors import LobsError
from onnx_lobs.pruning import PruneConfig, prune
from onnx_lobs.solvers.channels import STRUCTURED_METHODS
from tests import channel_graphs as cg
from tests.test_groups import _groups


def _config(**kw) -> PruneConfig:
    kw.setdefault("round_to", 1)  # the small test graphs have 8 or 12 channels per group
    return PruneConfig(structured=True, latency=False, **kw)


def _arrays(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _axes(node) -> tuple[int, int]:
    """(output axis, input axis) of a layer's weight."""
    if node.op_type == "Conv":
        return 0, 1
    trans = any(a.name == "transB" and a.i for a in node.attribute)
    return (0, 1) if node.op_type == "Gemm" and trans else (1, 0)


def _reference(original, pruned, report) -> onnx.ModelProto:
    """The dense-shaped equivalent, built from the original's protobuf with numpy only."""
    groups = {g.label: g for g in _groups(original)}
    outs, ins = {}, {}  # layer -> removed output units / removed input units, over every group
    for rec in report.groups:
        if rec.kept is None:
            continue
        g = groups[rec.label]
        for p in g.producers:
            outs.setdefault(p.layer.name, set()).update(p.port.units(rec.removed).tolist())
        for c in g.consumers:
            ins.setdefault(c.layer.name, set()).update(c.port.units(rec.removed).tolist())
    new, ref = _arrays(pruned), onnx.ModelProto()
    ref.CopyFrom(original)
    by_name = {t.name: t for t in ref.graph.initializer}
    for node in ref.graph.node:
        if node.name not in outs and node.name not in ins:
            continue
        oa, ia = _axes(node)
        w = numpy_helper.to_array(by_name[node.input[1]]).copy()
        o = np.setdiff1d(np.arange(w.shape[oa]), sorted(outs.get(node.name, ())))
        gone = np.array(sorted(ins.get(node.name, ())), dtype=np.int64)
        i = np.setdiff1d(np.arange(w.shape[ia]), gone)
        w = np.moveaxis(w, (oa, ia), (0, 1))
        w[:, gone] = 0
        w[np.ix_(o, i)] = np.moveaxis(new[node.input[1]], (oa, ia), (0, 1))
        by_name[node.input[1]].CopyFrom(numpy_helper.from_array(np.moveaxis(w, (0, 1), (oa, ia)), node.input[1]))
        if len(node.input) > 2:
            b = numpy_helper.to_array(by_name[node.input[2]]).copy()
            b[..., o] = new[node.input[2]]
            by_name[node.input[2]].CopyFrom(numpy_helper.from_array(b, node.input[2]))
        adds = [n for n in ref.graph.node if n.op_type == "Add" and node.output[0] in n.input]
        if node.op_type == "MatMul" and len(adds) == 1:  # a MatMul's bias: the Add of a constant after it
            name = next(i for i in adds[0].input if i in by_name)
            b = numpy_helper.to_array(by_name[name]).copy()
            b[..., o] = new[name]
            by_name[name].CopyFrom(numpy_helper.from_array(b, name))
    return ref


def _run(model, feed):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feed)


def _check(model, config, n=96):
    result = prune(model, cg.feed(model, n), config)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True, data_prop=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    feed = cg.feed(model, 7, seed=5)
    got, want = _run(out, feed), _run(_reference(model, out, result.report), feed)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))
    return result


@pytest.mark.parametrize("blocks,head", [
    (["conv_bn_act", "residual"], "gap_head"),
    (["inverted", "squeeze_excite"], "flatten_head"),
    (["nhwc", "scale", "pool", "residual"], "reshape_head"),
    (["attention", "conv_bn_act"], "gap_head"),
    (["attention_masked", "inverted"], "flatten_head"),
])
@pytest.mark.parametrize("method", STRUCTURED_METHODS)
def test_shrunk_models_equal_their_zeroed_equivalent(blocks, head, method):
    model = cg.build(blocks, head=head)
    result = _check(model, _config(sparsity=0.5, method=method, default_exclude=False))
    pruned = [g for g in result.report.groups if g.kept is not None]
    assert pruned and all(g.kept == g.channels - len(g.removed) for g in pruned)
    assert result.report.summary["params_after"] < result.report.summary["params_before"]


def test_mlp_neurons():
    model = cg.mlp()
    result = _check(model, _config(sparsity=0.5, default_exclude=False))
    assert [(g.channels, g.kept) for g in result.report.groups if g.kept] == [(16, 8), (12, 6)]


def test_compensation_beats_plain_removal():
    model = cg.build(["residual", "inverted"])
    errs = {m: prune(model, cg.feed(model, 256), _config(sparsity=0.5, method=m,
                                                             default_exclude=False)).report.fidelity["rel_l2"]
            for m in STRUCTURED_METHODS}
    assert errs["lobs"] < errs["wanda"] and errs["lobs"] < errs["magnitude"]


@pytest.mark.parametrize("norm,shapes", [("post", "constant"), ("pre", "constant"), ("post", "computed")])
@pytest.mark.parametrize("method", STRUCTURED_METHODS)
def test_encoder_heads_and_ffn_neurons(norm, shapes, method):
    model = cg.encoder(norm=norm, shapes=shapes)
    result = _check(model, _config(sparsity=0.5, method=method, default_exclude=False))
    pruned = {(g.channels, g.width, g.kept) for g in result.report.groups if g.kept is not None}
    assert pruned == {(4, 4, 2), (32, 1, 16)}  # 4 heads of 4 -> 2, FFN 32 -> 16, in both layers
    # the residual stream: from the graph input, behind LayerNorm
    assert all("LayerNormalization" in g.blocked or "graph input 'x'" in g.blocked
               for g in result.report.groups if g.kept is None)


def test_heads_round_to_whole_heads_and_a_flops_target_counts_attention():
    model = cg.encoder(hidden=32, heads=4, ffn=64, seq=16)  # heads of 8 units
    result = _check(model, _config(sparsity=0.5, round_to=16, default_exclude=False))
    kept = {(g.width, g.kept) for g in result.report.groups if g.kept is not None}
    assert kept == {(8, 2), (1, 32)}  # 2 heads = 16 units; 32 neurons
    for allocation in ("layer", "output"):
        result = _check(model, _config(flops=0.6, default_exclude=False, allocation=allocation))
        s = result.report.summary
        # a head is an eighth of the attention's FLOPs: the last removal may pass the target by one
        assert 0.5 * s["flops_before"] < s["flops_after"] <= 0.6 * s["flops_before"]
        assert s["allocation"]["by"] == allocation


@pytest.mark.parametrize("seed", [0, 1])
def test_sequential_fits_each_consumer_to_the_dense_output_from_the_pruned_inputs(seed):
    """The last layer of an MLP after both hidden layers lost half their neurons: with
    --sequential its kept weights and the bias of its Add are the least-squares fit, from the
    pruned model's hidden activations, of the dense model's output."""
    model = cg.mlp(seed=seed, sizes=(10, 16, 12, 4))
    x = np.random.default_rng(3).standard_normal((400, 10)).astype(np.float32)
    calib = x[:300].astype(np.float64)  # samples=300: the first 300 calibrate, the next 30 are held out

    def forward(m):
        w1, b1, w2, b2, w3, b3 = (_arrays(m)[n.input[1]].astype(np.float64) for n in m.graph.node
                                  if len(n.input) > 1)
        hidden = np.maximum(np.maximum(calib @ w1 + b1, 0) @ w2 + b2, 0)
        return np.c_[hidden, np.ones(len(hidden))], np.r_[w3, b3[None]]

    target = np.matmul(*forward(model))
    fits = {}
    for sequential in (False, True):
        out = prune(model, {"x": x}, _config(sequential=sequential, sparsity=0.5, samples=300, damp=1e-8,
                                             default_exclude=False)).model
        hidden, w3 = forward(out)
        refit = np.linalg.lstsq(hidden, target, rcond=None)[0]
        fits[sequential] = np.linalg.norm(w3 - refit) / np.linalg.norm(refit)
    assert fits[True] < 1e-4 < 0.05 < fits[False], fits


def test_sequential_runs_stage_by_stage_with_every_kind_of_group():
    model = cg.build(["conv_bn_act", "residual", "inverted", "attention", "c2f"], head="flatten_head")
    result = _check(model, _config(sequential=True, flops=0.6, default_exclude=False))
    assert result.report.summary["flops_after"] <= 0.6 * result.report.summary["flops_before"]


def test_a_matmul_s_add_takes_the_removed_neurons_mean():
    """MatMul + Add as exporters write a Linear: the Add's vector is the bias in the solve, so the
    output error has zero mean on the calibration samples (it is orthogonal to the 1 column)."""
    model = cg.mlp(sizes=(10, 16, 4))
    x = np.random.default_rng(3).standard_normal((400, 10)).astype(np.float32)
    out = prune(model, {"x": x}, _config(sparsity=0.5, samples=300, damp=1e-8, default_exclude=False)).model
    dense, pruned = (_run(m, {"x": x[:300]})[0].astype(np.float64) for m in (model, out))
    bias = [t for t in out.graph.initializer if list(t.dims) == [4]][0]
    assert not np.allclose(numpy_helper.to_array(bias), _arrays(model)[bias.name])  # it moved
    assert np.abs((pruned - dense).mean(0)).max() < 1e-4 * np.abs(pruned - dense).mean()


def test_round_to_and_exclude():
    model, layers = cg.built(["residual"], channels=12)
    result = prune(model, cg.feed(model, 64), _config(sparsity=0.3, round_to=4,
                                                         exclude=[layers[1]], default_exclude=False))
    by = {g.label: g for g in result.report.groups}
    assert by[layers[0]].kept == 8  # 12 - round(3.6) = 8, a multiple of 4
    assert "excluded by" in by[layers[1]].blocked


@pytest.mark.parametrize("flag", [dict(pattern=(2, 4)), dict(layer_sparsity={"*": 0.5}),
                                  dict(method="sparsegpt"), dict(flops=0.5, global_sparsity=0.5), dict(flops=0)])
def test_what_structured_does_not_do_yet_is_refused(flag):
    with pytest.raises(LobsError, match="structured"):
        prune(cg.mlp(), cg.feed(cg.mlp(), 8), _config(**flag))


@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_a_flops_target_is_met_and_spent_where_it_costs_least(target):
    model = cg.build(["conv_bn_act", "residual", "inverted", "c2f"], head="flatten_head")
    result = _check(model, _config(flops=target, default_exclude=False))
    s = result.report.summary
    assert s["flops_after"] <= target * s["flops_before"]
    assert s["flops_after"] > (target - 0.15) * s["flops_before"]  # not far beyond it either
    kept = [g.kept / g.channels for g in result.report.groups if g.kept is not None]
    assert len(set(np.round(kept, 3))) > 1  # not uniform: allocated


def test_global_removes_a_fraction_of_all_channels():
    model = cg.build(["residual", "inverted"], channels=12)
    result = _check(model, _config(global_sparsity=0.4, default_exclude=False))
    groups = [g for g in result.report.groups if g.blocked is None or g.kept is not None]
    prunable = [g for g in groups if g.kept is not None]
    removed = sum(g.channels - g.kept for g in prunable)
    total = sum(g.channels for g in _groups(model) if g.blocked is None)
    assert removed == pytest.approx(0.4 * total, abs=1)


def test_a_model_with_nothing_to_prune_says_why():
    g = cg.Graph()
    g.channel_softmax()
    f = g.op("Flatten", [g.op("GlobalAveragePool", [g.x])])
    model = g.model(f, g.c)  # the stem's channels go through a softmax over them, then out
    with pytest.raises(LobsError, match="no channel group can be pruned.*channel axis"):
        prune(model, cg.feed(model, 8), _config(default_exclude=False))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(st.sampled_from(cg.BLOCKS + cg.BLOCKING), min_size=1, max_size=4),
       head=st.sampled_from(cg.HEADS), acts=st.lists(st.sampled_from(cg.ACTS), max_size=4),
       seed=st.integers(0, 2 ** 16), sparsity=st.sampled_from([0.25, 0.5, 0.75]),
       method=st.sampled_from(STRUCTURED_METHODS))
def test_generated_graphs(blocks, head, acts, seed, sparsity, method):
    model = cg.build(blocks, head=head, seed=seed, acts=acts)
    try:
        result = _check(model, _config(sparsity=sparsity, method=method,
                                           default_exclude=False))
    except LobsError as e:
        assert "no channel group can be pruned" in str(e) and set(blocks) & set(cg.BLOCKING)
        return
    for g in result.report.groups:
        assert (g.kept is None) == (g.blocked is not None)
        if not set(blocks) & set(cg.BLOCKING):  # everything understood: only the logits stay
            assert g.blocked is None or "graph output 'add" in g.blocked or "nothing to remove" in g.blocked, \
                g.blocked  # nothing to remove: 2 heads at 25%


def test_kept_counts_are_multiples_of_eight_by_default():
    model = cg.build(["residual", "inverted"], channels=32)
    result = prune(model, cg.feed(model, 64), PruneConfig(structured=True, sparsity=0.3, latency=False,
                                                         default_exclude=False))
    kept = [g.kept for g in result.report.groups if g.kept is not None]
    assert kept and all(k % 8 == 0 for k in kept)
