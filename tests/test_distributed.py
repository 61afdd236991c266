"""--executor ray, on a local 2-CPU cluster this module starts: the local executor's masks, and
Hessians within 1e-9 (shards are summed in another order)."""

import sys

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_lobs import PruneConfig, distributed, prune, solve
from onnx_lobs.errors import LobsError

from .builders import mlp, small_cnn
from .test_activations import attention_like
from .test_memory import _budget_for
from .test_segments import _feeds, residual_model

ray = pytest.importorskip("ray", reason="the 'distributed' extra is not installed")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _hessians(monkeypatch, module):
    """Every solve's calibration Hessian (H_p), by layer, as finish() receives its problem."""
    seen = {}
    through = module.finish

    def recorded(c, problem, solved, record, seconds):
        seen[c.layer.name] = problem.hessians[0].copy()
        return through(c, problem, solved, record, seconds)

    monkeypatch.setattr(module, "finish", recorded)
    return seen


@pytest.mark.parametrize("build, config", [
    (small_cnn, dict(sparsity=0.6)), (residual_model, dict(sparsity=0.5, sequential=True)),
    (attention_like, dict(pattern=(2, 4), sequential=False)),
    (attention_like, dict(method="obc", sparsity=0.5, sequential=True, shards=3)),
    (mlp, dict(sparsity=0.7, budget=True))])
def test_ray_gives_the_local_masks_with_the_sums_within_1e_9(cluster, build, config, monkeypatch):
    rng = np.random.default_rng(21)
    model = build(rng)
    data = _feeds(model, rng, 240)
    if config.pop("budget", False):
        config["memory_budget"] = _budget_for(model, 1, False)
    cfg = dict(default_exclude=False, batch_size=32, **config)
    shards = cfg.pop("shards", None)
    with monkeypatch.context() as m:
        local_h = _hessians(m, solve)
        local = prune(model, data, PruneConfig(**cfg))
    with monkeypatch.context() as m:
        ray_h = _hessians(m, solve)  # settle() calls solve.finish for Ray results too
        remote = prune(model, data, PruneConfig(executor="ray", shards=shards, **cfg))
    assert ray_h.keys() == local_h.keys() and len(ray_h) > 1
    for name, h in local_h.items():
        assert np.linalg.norm(ray_h[name] - h) <= 1e-9 * np.linalg.norm(h), name
    assert remote.masks.keys() == local.masks.keys()
    for k in local.masks:
        np.testing.assert_array_equal(remote.masks[k], local.masks[k], err_msg=k)
    for a, b in zip(remote.model.graph.initializer, local.model.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-5, atol=1e-7)
    assert remote.report.samples == local.report.samples
    assert remote.report.fidelity["rel_l2"] == pytest.approx(local.report.fidelity["rel_l2"], rel=1e-4)


def test_without_ray_the_executor_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    with pytest.raises(LobsError, match=r"--executor ray needs Ray: pip install 'onnx-lobs\[distributed\]'"):
        distributed.require_ray()


@pytest.mark.parametrize("extra, message", [(dict(global_sparsity=0.5), "--allocation uniform"),
                                            (dict(structured=True), "--structured"),
                                            (dict(executor="spark"), "--executor must be local or ray")])
def test_what_the_ray_executor_does_not_take_is_said(extra, message):
    cfg = {"executor": "ray", **extra}
    with pytest.raises(LobsError, match=message):
        PruneConfig(**cfg).check()


def test_the_cli_runs_on_ray(cluster, tmp_path, capsys):
    import onnx
    from .test_cli import cli
    rng = np.random.default_rng(22)
    model = residual_model(rng)
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save_model(model, str(path))
    np.savez(tmp_path / "c.npz", **_feeds(model, rng, 200))
    assert cli("prune", str(path), "-o", str(out), "--calib", str(tmp_path / "c.npz"), "--quiet", "--pattern", "2:4",
               "--independent", "--executor", "ray", "--shards", "2", "--no-default-exclude") == 0
    assert out.exists() and "overall sparsity" in capsys.readouterr().out
    assert cli("prune", str(path), "-o", str(out), "--calib", str(tmp_path / "c.npz"), "--executor", "ray") == 1
    assert "--allocation uniform" in capsys.readouterr().err
