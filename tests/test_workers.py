"""Parallel solves: the output of --workers 2 is that of one process, bit for bit, and the pool
never runs more BLAS threads than there are cores."""

from concurrent.futures import Future

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_lobs import PruneConfig, prune, workers
from onnx_lobs.errors import LobsError
from onnx_lobs.solve import Problem, Task

from .builders import mlp, small_cnn
from .test_activations import attention_like
from .test_memory import _budget_for
from .test_segments import _feeds, residual_model


def _same(a, b):
    for x, y in zip(a.model.graph.initializer, b.model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y), err_msg=x.name)
    assert a.masks.keys() == b.masks.keys()
    for k in a.masks:
        np.testing.assert_array_equal(a.masks[k], b.masks[k])
    for ra, rb in zip(a.report.layers, b.report.layers):
        assert (ra.name, ra.sparsity, ra.error, ra.holdout_error, ra.damp, ra.notes, ra.skipped) == \
               (rb.name, rb.sparsity, rb.error, rb.holdout_error, rb.damp, rb.notes, rb.skipped)
    assert a.report.fidelity == b.report.fidelity


def _pooled(monkeypatch) -> list:
    """The names of the layers the pool solves, as they come back."""
    names = []
    through = workers.Pool.solve

    def counted(pool, jobs, config):
        for got in through(pool, jobs, config):
            names.append(got[0].layer.name)
            yield got

    monkeypatch.setattr(workers.Pool, "solve", counted)
    return names


@pytest.mark.parametrize("build, config", [
    (small_cnn, dict(sparsity=0.6)), (residual_model, dict(sparsity=0.5, sequential=True)),
    (attention_like, dict(pattern=(2, 4), sequential=False)), (mlp, dict(global_sparsity=0.6)),
    (attention_like, dict(method="obc", sparsity=0.5, sequential=True, budget=True))])
def test_two_workers_give_the_output_of_one_bit_for_bit(build, config, monkeypatch):
    rng = np.random.default_rng(11)
    model = build(rng)
    data = _feeds(model, rng, 240)
    if config.pop("budget", False):
        config["memory_budget"] = _budget_for(model, 1, config.get("sequential", False))
    cfg = dict(default_exclude=False, batch_size=48, **config)
    one = prune(model, data, PruneConfig(**cfg))
    solved = _pooled(monkeypatch)
    two = prune(model, data, PruneConfig(workers=2, **cfg))
    _same(one, two)
    pruned = {r.name for r in one.report.layers if r.sparsity}
    if "global_sparsity" in config:  # the allocation's own solves are not solved again
        assert set(solved) <= pruned
    else:
        assert set(solved) == pruned and len(solved) == len(pruned) > 1
    assert any(r.sparsity for r in two.report.layers)


class _Inline:
    """An executor that runs each job when submitted, counting the BLAS threads in flight."""

    def __init__(self):
        self.busy = self.peak = 0

    def submit(self, fn, t, config, threads):
        f = Future()
        self.busy += threads
        self.peak = max(self.peak, self.busy)
        f.set_result((t.name, threads))
        return f


def _task(name, rows, cols):
    old = np.zeros((1, rows, cols))
    h = np.eye(cols)[None]
    return Task(Problem(old, None, (h, h, h), False), 0.5, None, name)


def test_the_pool_keeps_the_jobs_order_and_never_more_threads_than_cores(monkeypatch):
    pool = workers.Pool(3)
    pool.cores = 2
    fake = _Inline()
    monkeypatch.setattr(pool, "_pool", lambda: fake)
    real_result = Future.result

    def result(f, *a, **k):  # a job ends when its result is taken
        got = real_result(f, *a, **k)
        fake.busy -= got[1]
        return got

    monkeypatch.setattr(Future, "result", result)
    sizes = {"a": (8, 16), "b": (8, 16), "big": (64, 5000), "c": (8, 16), "d": (8, 16)}
    jobs = [(n, lambda n=n: _task(n, *sizes[n])) for n in sizes]
    out = list(pool.solve(jobs, PruneConfig()))
    assert [k for k, _, _ in out] == list(sizes)
    assert [r[1] for _, _, r in out] == [1, 1, 2, 1, 1]  # the wide layer takes both cores
    assert fake.peak <= 2 and fake.busy == 0


def test_a_solve_that_fails_in_a_worker_is_the_same_clear_error():
    h = np.full((1, 4, 4), np.inf)
    bad = Task(Problem(np.ones((1, 2, 4)), None, (h, h, h), False), 0.5, None, "layer7")
    pool = workers.Pool(2)
    try:
        with pytest.raises(LobsError, match="layer layer7: its Hessian could not be regularised"):
            list(pool.solve([("k", lambda: bad)], PruneConfig(method="sparsegpt", damp=0.01)))
    finally:
        pool.close()


def test_workers_must_be_at_least_one():
    with pytest.raises(LobsError, match="--workers must be at least 1"):
        prune(mlp(np.random.default_rng(0)), None, PruneConfig(workers=0))


def test_a_layer_that_takes_every_core_is_solved_here_and_the_rest_in_the_pool(monkeypatch):
    rng = np.random.default_rng(12)
    model = attention_like(rng)  # columns: 16 (q/k/v, gate/up, side 4) and 32 (o, down)
    data = _feeds(model, rng, 240)
    cfg = dict(default_exclude=False, batch_size=48, sparsity=0.5)
    one = prune(model, data, PruneConfig(**cfg))
    monkeypatch.setattr(workers, "SINGLE_THREAD_COLS", 20)  # "wide" from 21 columns, for the pool only
    pooled = _pooled(monkeypatch)
    two = prune(model, data, PruneConfig(workers=2, **cfg))
    _same(one, two)
    assert set(pooled) == {"q", "k", "v", "gate", "up", "side"}  # o and down (32 columns) solved here
