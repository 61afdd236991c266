"""--global by the outputs (output_allocation): the target met, the levels' solves kept as they
are, the layer-wise choice never beaten by a worse one, N:M choosing layers, sequential mode."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs import PruneConfig, prune
from onnx_lobs.output_allocation import Curve, levels_for
from onnx_lobs.graph import find_layers
from onnx_lobs.modelio import as_loaded
from tests.builders import mlp


def _data(rng, n=600, width=24):
    # low-rank inputs make fc1 far more redundant than the rest
    return (rng.standard_normal((n, 4)) @ rng.standard_normal((4, width))
            + 0.05 * rng.standard_normal((n, width))).astype(np.float32)


def _weights(model):
    return {layer.name: layer.read() for layer in find_layers(as_loaded(model))[0]}


def test_levels_surround_the_target():
    assert levels_for(0.5, False) == [0.0, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]
    assert levels_for(0.5, True) == [0.0, 0.5]


def test_predicted_interpolates_the_gain_between_measured_levels():
    c = Curve(None, None, [0, 0.25, 0.5, 0.75], [0, 10, 20, 30], [0.0, 1.0, 2.0, 4.0], 1.0, [None] * 4)
    c.measured = {1: 0.5, 3: 8.0}  # gains 0.5 and 2
    assert c.predicted() == pytest.approx([0.0, 0.5, 2.0 * 1.25, 8.0])
    c.measured = {2: 1.0}  # one gain, 0.5, everywhere
    assert c.predicted() == pytest.approx([0.0, 0.5, 1.0, 2.0])


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_output_allocation_meets_the_target_and_keeps_its_solves(target):
    rng = np.random.default_rng(2)
    model = mlp(rng, sizes=(24, 64, 16, 8))
    x = _data(rng)
    cfg = dict(global_sparsity=target, default_exclude=False, method="sparsegpt", damp=0.01)
    out = prune(model, {"x": x}, PruneConfig(**cfg))
    rep = out.report
    assert rep.allocation["by"] == "output" and rep.allocation["probes"] >= 3
    assert rep.sparsity == pytest.approx(target, abs=2e-3)
    layers = [r for r in rep.layers if r.params]
    assert all(r.curve and sum(p["chosen"] for p in r.curve) == 1 for r in layers)
    # every choice made, and the uniform one last, measured on the whole model; the best kept
    conf = rep.allocation["confirmed"]
    assert list(conf)[0] == "round 1" and list(conf)[-1] == "uniform" and len(conf) >= 2
    assert rep.allocation["picked"] == min(conf, key=conf.get)
    assert (len({round(r.target_sparsity, 6) for r in layers}) > 1) == (rep.allocation["picked"] != "uniform")
    # single-layer output errors add up to the whole model's
    assert rep.allocation["measured_rel_l2"] == pytest.approx(rep.allocation["predicted_rel_l2"], rel=0.5)
    # the stored weights are the levels' own solves: solving each layer afresh at its chosen
    # sparsity (same dampening) gives the same weights
    again = prune(model, {"x": x}, PruneConfig(method="sparsegpt", damp=0.01, default_exclude=False,
                                               layer_sparsity={r.name: r.target_sparsity for r in layers}))
    for name, w in _weights(out.model).items():
        np.testing.assert_allclose(w, _weights(again.model)[name], rtol=1e-5, atol=1e-6)


def test_levels_of_a_layer_of_many_rows_are_estimated_and_solved_in_full_once_chosen():
    """fc1's 256 rows are over twice ESTIMATE_ROWS: its levels other than the uniform one are
    estimated from a sample of rows (near the exact error: random rows differ more than a trained
    layer's, whose estimates were within 5-10%), and the levels a round chose (and the one it ends
    at) are solved in full, as a fresh solve at that sparsity gives."""
    from onnx_lobs import output_allocation as oa

    rng = np.random.default_rng(8)  # a seed whose rounds choose an estimated level of fc1
    model = mlp(rng, sizes=(24, 256, 16, 8))
    x = _data(rng)
    base = dict(default_exclude=False, method="sparsegpt", damp=0.01)
    out = prune(model, {"x": x}, PruneConfig(global_sparsity=0.5, **base))
    by_name = {r.name: r for r in out.report.layers if r.params}
    wide = next(r for r in by_name.values() if r.rows == 256)
    estimated = [p for p in wide.curve if p["estimated"]]
    assert estimated and not any(p["chosen"] and p["estimated"] for p in wide.curve)
    # the level fc1 ends at, or one a round chose, was estimated first: 7 levels, 6 solved or estimated
    assert len(estimated) < len(wide.curve) - 2 and len(wide.curve) == len(oa.levels_for(0.5, False))
    assert not any(p["estimated"] for r in by_name.values() if r is not wide for p in r.curve)
    for p in estimated[:3]:  # the estimate against the exact error at that level
        exact = prune(model, {"x": x}, PruneConfig(layer_sparsity={wide.name: p["sparsity"]}, **base))
        got = next(r for r in exact.report.layers if r.name == wide.name).rel_error
        assert 0.5 < p["layer_rel_error"] / got < 2  # 1.07 to 1.5 here; unscaled, 2.7 times too small
    again = prune(model, {"x": x}, PruneConfig(layer_sparsity={r.name: r.target_sparsity for r in by_name.values()},
                                               **base))
    for name, w in _weights(out.model).items():
        np.testing.assert_allclose(w, _weights(again.model)[name], rtol=1e-5, atol=1e-6)


def test_settling_with_kept_problems_matches_solving_afresh(monkeypatch):
    """Estimated levels solved in full from the problem and factorisation kept (SETTLE_BYTES) give
    what preparing the layer again gives."""
    from onnx_lobs import output_allocation as oa

    rng = np.random.default_rng(8)
    model, x = mlp(rng, sizes=(24, 256, 16, 8)), _data(rng)
    cfg = PruneConfig(global_sparsity=0.5, default_exclude=False, method="sparsegpt", damp=0.01)
    settled, settle = [], oa._settle

    def counted(curve, j, config):
        settled.append(curve.estimated(j) and curve.kept is not None)
        settle(curve, j, config)
    monkeypatch.setattr(oa, "_settle", counted)
    kept = prune(model, {"x": x}, cfg)
    assert any(settled)  # a level was solved in full from what was kept
    monkeypatch.setattr(oa, "SETTLE_BYTES", 0)
    settled.clear()
    afresh = prune(model, {"x": x}, cfg)
    assert not any(settled)
    assert [r.curve for r in kept.report.layers] == [r.curve for r in afresh.report.layers]
    for a, b in zip(kept.report.layers, afresh.report.layers):  # the kept problems measured the result
        assert (a.error, a.rel_error, a.holdout_error) == (b.error, b.rel_error, b.holdout_error)
    for name, w in _weights(kept.model).items():
        np.testing.assert_array_equal(w, _weights(afresh.model)[name])


def test_the_widest_layers_keep_their_problems(monkeypatch):
    from types import SimpleNamespace

    from onnx_lobs import output_allocation as oa

    def kept(cols):  # a problem of 8 rows: its weights and their copy, H and a float32 cast of it
        h = np.zeros((1, cols, cols))
        objective = SimpleNamespace(w_old=np.zeros((8, cols)), hp=h[0].astype(np.float32))
        return SimpleNamespace(old=np.zeros((1, 8, cols)), hessians=(h,), objectives=[objective]), []
    monkeypatch.setattr(oa, "SETTLE_BYTES", oa._bytes(*kept(40)) + oa._bytes(*kept(30)))
    curves = [Curve(None, None, [], [], [], 1.0, []) for _ in range(4)]
    for c, cols in zip(curves, (30, 20, 40, 10)):
        oa._keep_within(curves, c, kept(cols))
    # 30 kept, then 20; 40 gives 20 up (not 30: the two fit), and 10 finds no room
    assert [c.kept is not None for c in curves] == [True, False, True, False]


def test_the_uniform_candidate_is_measured_as_the_uniformly_pruned_model():
    """The whole-model confirmation measures what a uniform prune at the target gives (the probe
    runs on the 32 held-out samples here, as the report's fidelity does)."""
    rng = np.random.default_rng(3)
    model = mlp(rng, sizes=(24, 64, 16, 8))
    x = _data(rng, n=320)
    base = dict(default_exclude=False, method="sparsegpt", damp=0.01)
    rep = prune(model, {"x": x}, PruneConfig(global_sparsity=0.6, **base)).report
    uniform = prune(model, {"x": x}, PruneConfig(sparsity=0.6, **base)).report
    assert rep.samples["held_out"] == 32
    assert rep.allocation["confirmed"]["uniform"] == pytest.approx(uniform.fidelity["rel_l2"], rel=1e-4)
    assert rep.fidelity["rel_l2"] <= uniform.fidelity["rel_l2"] * 1.01


def test_layer_allocation_stays_behind_its_flag():
    rng = np.random.default_rng(2)
    model = mlp(rng, sizes=(24, 64, 16, 8))
    rep = prune(model, {"x": _data(rng)}, PruneConfig(global_sparsity=0.6, default_exclude=False,
                                                      method="sparsegpt", allocation="layer")).report
    assert rep.allocation["by"] == "layer" and all(r.curve is None for r in rep.layers)
    assert rep.sparsity == pytest.approx(0.6, abs=1e-3)


def test_nm_global_chooses_which_layers_take_the_pattern():
    rng = np.random.default_rng(4)
    model = mlp(rng, sizes=(24, 64, 16, 8))
    out = prune(model, {"x": _data(rng)}, PruneConfig(pattern=(2, 4), global_sparsity=0.3, method="sparsegpt",
                                             default_exclude=False))
    layers = [r for r in out.report.layers if r.params and r.skipped is None]
    taken = [r for r in layers if r.target_sparsity]
    assert 0 < len(taken) < len(layers)
    assert out.report.sparsity >= 0.3 - 1e-3
    for layer in find_layers(as_loaded(out.model))[0]:
        w = layer.read()
        rec = next(r for r in layers if r.name == layer.name)
        assert (np.mean(w == 0) >= 0.5 - 1e-9) == bool(rec.target_sparsity)


def test_sequential_output_allocation_meets_the_target():
    rng = np.random.default_rng(2)
    model = mlp(rng, sizes=(24, 64, 16, 8))
    rep = prune(model, {"x": _data(rng)}, PruneConfig(global_sparsity=0.6, default_exclude=False,
                                                      method="sparsegpt", sequential=True)).report
    assert rep.allocation["by"] == "output"
    assert rep.sparsity == pytest.approx(0.6, abs=2e-3)
    assert all(r.corrected_error is not None for r in rep.layers if r.params and r.target_sparsity)
