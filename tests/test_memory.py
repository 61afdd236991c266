"""The memory budget: blocks of layers whose Hessian sums fit, the same result as one pass, and at
no time more sums alive than the budget allows."""

import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_lobs import PruneConfig, hessian, memory, prune, pruning
from onnx_lobs.activations import Collector
from onnx_lobs.errors import LobsError
from onnx_lobs.graph import find_layers
from onnx_lobs.modelio import as_loaded

from .builders import make_model, mlp, small_cnn, tensor, vi
from .subgraphs import if_model
from .test_activations import attention_like
from .test_cli import cli
from .test_segments import _feeds, _weights, residual_model


@pytest.mark.parametrize("text, size", [("6G", 6 << 30), ("512M", 512 << 20), ("1.5GB", 3 << 29), ("2e9", 2 * 10 ** 9),
                                        ("100k", 102400), ("4096", 4096), (" 2 GiB ", 2 << 30)])
def test_sizes_are_read_in_powers_of_1024(text, size):
    assert memory.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "1X", "G"])
def test_a_size_that_is_not_one_is_a_clear_error(text):
    with pytest.raises(LobsError, match="--memory-budget"):
        memory.parse_size(text)


def _collectors(model, joint=False):
    layers, _ = find_layers(as_loaded(model))
    return [Collector(layer, joint) for layer in layers]


def test_the_bytes_of_a_layers_sums_are_what_its_accumulators_hold_once_filled():
    for joint in (False, True):
        for c in _collectors(small_cnn(np.random.default_rng(0)), joint):
            calib = c.calib._xx.nbytes + c.calib._x.nbytes
            assert memory.sums_bytes(c) == 2 * calib and c.hold.limit == calib  # held-out: at most as much


def test_blocks_keep_layers_that_share_sums_together_and_stay_within_the_budget():
    cs = _collectors(attention_like(np.random.default_rng(0)))
    by = {c.layer.name: c for c in cs}
    qkv = memory.sums_bytes(by["q"])
    plan = memory.pack([cs], qkv + memory.sums_bytes(by["o"]) - 1, "m", across=True)
    names = [[c.layer.name for c in b] for b in plan.blocks]
    assert ["q", "k", "v"] in names and all(memory.sums_bytes(b[0]) <= plan.budget for b in plan.blocks)
    distinct = {c.input_key(): memory.sums_bytes(c) for c in cs}
    assert plan.total == sum(distinct.values()) and plan.peak <= plan.budget
    whole = memory.pack([cs], plan.total, "m", across=True)
    assert len(whole.blocks) == 1 and whole.peak == plan.total and plan.cut and not whole.cut


def test_a_stage_is_never_joined_to_the_next_when_blocks_may_not_cross_stages():
    cs = _collectors(mlp(np.random.default_rng(0)))
    plan = memory.pack([[c] for c in cs], 1 << 40, "m", across=False)
    assert [len(b) for b in plan.blocks] == [1] * len(cs) and not plan.cut
    assert len(memory.pack([[c] for c in cs], 1 << 40, "m", across=True).blocks) == 1


def test_a_budget_below_one_layers_sums_is_an_error_naming_the_layer():
    cs = _collectors(attention_like(np.random.default_rng(0)))
    with pytest.raises(LobsError, match=r"model.onnx: layer q, k, v needs .* of Hessian sums .* more than "
                                        r"--memory-budget 1.00 kB"):
        memory.pack([cs], 1024, "model.onnx", across=True)


class _Alive:
    """Every collector made, and the largest bytes its sums (distinct ones, filled) ever held at
    once; a solve's own matrices, made and dropped inside it, are not sums kept."""

    def __init__(self, monkeypatch):
        self.refs, self.peak = [], 0
        made = Collector.__post_init__

        def init(c):
            made(c)
            self.refs.append(weakref.ref(c))

        monkeypatch.setattr(Collector, "__post_init__", init)
        for kind in (hessian.HessianAccumulator, hessian.HeldOut):
            self._watch(monkeypatch, kind)

    def held(self) -> int:
        accs = {}
        for r in self.refs:
            c = r()
            if c is not None:
                accs.update({id(a): a for a in (c.calib, c.hold) if a.n})
        return sum(_bytes(a) for a in accs.values())

    def _watch(self, monkeypatch, kind):
        add = kind.add

        def added(acc, x):
            add(acc, x)
            self.peak = max(self.peak, self.held())

        monkeypatch.setattr(kind, "add", added)


def _bytes(acc) -> int:
    if isinstance(acc, hessian.HeldOut):
        return sum(c.nbytes for c in acc.cols) + (_bytes(acc.sums) if acc.sums is not None else 0)
    return acc._xx.nbytes + acc._x.nbytes


def two_inputs(rng, d=16):
    """Two layers on two model inputs: one stage of two sums, each as large as any in the model."""
    w = [tensor(n, (rng.standard_normal((d, 8)) / 4).astype(np.float32)) for n in ("Wa", "Wb")]
    nodes = [helper.make_node("MatMul", ["a", "Wa"], ["ya"], name="left"),
             helper.make_node("MatMul", ["b", "Wb"], ["yb"], name="right"),
             helper.make_node("Add", ["ya", "yb"], ["y"])]
    return make_model(nodes, [vi("a", TensorProto.FLOAT, ["N", d]), vi("b", TensorProto.FLOAT, ["N", d])],
                      [vi("y", TensorProto.FLOAT, ["N", 8])], w)


def _budget_for(model, blocks_of, sequential):
    """A budget that holds the largest layer's sums (of either mode) but not much more."""
    return max(memory.sums_bytes(c) for c in _collectors(model, sequential)) * blocks_of


CASES = [(residual_model, dict(sparsity=0.5)), (attention_like, dict(sparsity=0.5)),
         (attention_like, dict(pattern=(2, 4))), (small_cnn, dict(method="obc", sparsity=0.6)),
         (mlp, dict(method="lobs", max_error=0.05)), (two_inputs, dict(sparsity=0.5))]


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("build, config", CASES)
def test_blocks_under_a_budget_give_the_result_of_one_pass_within_the_budget(build, config, sequential, monkeypatch):
    rng = np.random.default_rng(4)
    model = build(rng)
    data = _feeds(model, rng, 240)
    cfg = dict(default_exclude=False, batch_size=48, sequential=sequential, **config)
    whole = prune(model, data, PruneConfig(**cfg))
    budget = _budget_for(model, 1, sequential)
    with monkeypatch.context() as m:
        alive = _Alive(m)
        blocked = prune(model, data, PruneConfig(memory_budget=budget, **cfg))
    assert alive.peak <= budget
    mem = blocked.report.memory
    assert mem["block_bytes"] <= budget and mem["budget"] == budget and not whole.report.memory["cut"]
    # independent mode: always cut here; sequential: where a stage holds layers of more than one input
    assert mem["cut"] == (not sequential or build is two_inputs)
    assert mem["blocks"] > whole.report.memory["blocks"] or not mem["cut"]
    assert sequential or whole.report.memory["blocks"] == 1
    # In a segment onnxruntime may fuse differently than in the whole graph (Conv+Add), so the
    # float32 activations can differ in the last bits, and the solves amplify that a little.
    wa, wb = _weights(blocked.model), _weights(whole.model)
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=0, atol=2e-3 * max(1.0, np.abs(wb[name]).max()))
        assert np.mean((wa[name] == 0) == (wb[name] == 0)) > 0.99
    for ra, rb in zip(blocked.report.layers, whole.report.layers):
        assert (ra.name, ra.skipped) == (rb.name, rb.skipped)
        if rb.error is not None:
            assert ra.error == pytest.approx(rb.error, rel=1e-3, abs=1e-9)
            assert ra.holdout_error == pytest.approx(rb.holdout_error, rel=1e-3, abs=1e-9)
    assert blocked.report.samples == whole.report.samples
    assert blocked.report.fidelity["rel_l2"] == pytest.approx(whole.report.fidelity["rel_l2"], rel=1e-3)


@pytest.mark.parametrize("sequential", [False, True])
def test_without_a_budget_every_layer_sums_are_dropped_once_it_is_solved(sequential, monkeypatch):
    rng = np.random.default_rng(5)
    model = residual_model(rng)
    data = _feeds(model, rng, 200)
    with monkeypatch.context() as m:
        alive = _Alive(m)
        prune(model, data, PruneConfig(default_exclude=False, sequential=sequential))
    assert alive.refs and alive.held() == 0


def test_layers_inside_a_subgraph_are_blocked_by_whole_passes(monkeypatch):
    rng = np.random.default_rng(6)
    model = if_model(rng)
    data = _feeds(model, rng, 200)
    cfg = dict(default_exclude=False, sparsity=0.5)
    whole = prune(model, data, PruneConfig(**cfg))
    blocked = prune(model, data, PruneConfig(memory_budget=_budget_for(model, 1, False), **cfg))
    assert blocked.report.memory["cut"] and blocked.report.memory["blocks"] > 1
    wa, wb = _weights(blocked.model), _weights(whole.model)
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name])


def test_global_over_an_explicit_budget_is_an_error_and_over_the_default_a_warning(monkeypatch):
    rng = np.random.default_rng(7)
    model = residual_model(rng)
    data = _feeds(model, rng, 200)
    budget = _budget_for(model, 1, False)
    with pytest.raises(LobsError, match="--global needs every layer's Hessian sums at once"):
        prune(model, data, PruneConfig(default_exclude=False, global_sparsity=0.5, memory_budget=budget))
    monkeypatch.setattr(pruning, "default_budget", lambda: budget)
    with pytest.warns(UserWarning, match="going over it"):
        result = prune(model, data, PruneConfig(default_exclude=False, global_sparsity=0.5))
    assert result.report.sparsity > 0.4


def test_the_cli_takes_a_budget_and_says_in_one_line_what_is_wrong(tmp_path, capsys):
    rng = np.random.default_rng(8)
    model = residual_model(rng)
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save_model(model, str(path))
    np.savez(tmp_path / "calib.npz", **_feeds(model, rng, 200))
    base = ["prune", str(path), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--quiet",
            "--no-default-exclude", "--allocation", "uniform"]  # by output needs all sums at once
    assert cli(*base, "--memory-budget", "1.01M") == 0  # fc's sums alone: 1.004 MB
    assert "memory: Hessian sums" in capsys.readouterr().out and out.exists()
    out.unlink()
    for size, message in (("1M", f"{path}: layer fc needs 1.00 MB of Hessian sums"), ("lots", "'lots' is not a size")):
        assert cli(*base, "--memory-budget", size) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not out.exists()
