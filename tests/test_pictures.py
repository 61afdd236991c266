"""--plot: the report drawn as a PNG (pictures.py), its panels as the report has them, and a
clear error before any work when matplotlib is missing."""

from __future__ import annotations

import struct
import sys

import numpy as np
import onnx
import pytest

pytest.importorskip("matplotlib")  # the test extra installs it; a bare install has no --plot

from onnx_lobs import PruneConfig, prune, pictures  # noqa: E402
from tests.builders import mlp  # noqa: E402
from tests.test_cli import cli, digest  # noqa: E402


def _png_size(path) -> tuple[int, int]:
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _data(rng, n=400):
    return (rng.standard_normal((n, 4)) @ rng.standard_normal((4, 24))).astype(np.float32)


def test_panels_follow_the_report(tmp_path):
    rng = np.random.default_rng(0)
    model, x = mlp(rng, sizes=(24, 64, 16, 8)), _data(rng)
    base = dict(default_exclude=False, method="sparsegpt", damp=0.01)
    uniform = prune(model, {"x": x}, PruneConfig(sparsity=0.5, **base)).report
    allocated = prune(model, {"x": x}, PruneConfig(global_sparsity=0.5, **base)).report
    assert pictures._layers_panel(uniform) and pictures._curves_panel(uniform) is None
    assert pictures._groups_panel(uniform) is None
    assert pictures._curves_panel(allocated) is not None
    sizes = {}
    for name, rep in (("uniform", uniform), ("allocated", allocated)):
        path = tmp_path / f"{name}.png"
        pictures.draw(rep, str(path))
        sizes[name] = _png_size(path)
        assert sizes[name][0] == 1100  # 11 inches at 100 dpi
    assert sizes["allocated"][1] > sizes["uniform"][1]  # the curves' panel added below
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-lobs-")]  # nothing staged left


def test_a_report_with_nothing_pruned_still_draws(tmp_path):
    rng = np.random.default_rng(2)
    model, x = mlp(rng, sizes=(24, 64, 16, 8)), _data(rng)
    rep = prune(model, {"x": x}, PruneConfig(sparsity=0.5, exclude=["*"], default_exclude=False)).report
    assert pictures._layers_panel(rep) is None and pictures._curves_panel(rep) is None
    pictures.draw(rep, str(tmp_path / "none.png"))
    assert _png_size(tmp_path / "none.png") == (1100, 140)  # one text panel: (1 + 0.4) inches at 100 dpi


def test_structured_reports_draw_the_channels_kept(tmp_path):
    from tests import channel_graphs as cg

    model, _ = cg.built(["residual"])
    rep = prune(model, cg.feed(model, 64), PruneConfig(structured=True, sparsity=0.5, round_to=2,
                                                          default_exclude=False, latency=False)).report
    assert pictures._groups_panel(rep) is not None and pictures._layers_panel(rep) is None
    pictures.draw(rep, str(tmp_path / "s.png"))
    assert _png_size(tmp_path / "s.png")[0] == 1100


def test_cli_plot_and_missing_matplotlib(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    src, out, calib, png = (str(tmp_path / n) for n in ("m.onnx", "o.onnx", "c.npz", "p.png"))
    onnx.save(mlp(rng, sizes=(24, 64, 16, 8)), src)
    np.savez(calib, x=_data(rng))
    before = digest(src)
    assert cli("prune", src, "-o", out, "--global", "0.5", "--calib", calib, "--no-default-exclude",
               "--plot", png, "--quiet") == 0
    assert _png_size(png)[0] == 1100
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out2, png2 = str(tmp_path / "o2.onnx"), str(tmp_path / "p2.png")
    assert cli("prune", src, "-o", out2, "--sparsity", "0.5", "--calib", calib, "--plot", png2, "--quiet") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["onnx-lobs: error: --plot needs matplotlib: pip install 'onnx-lobs[plot]'"]
    assert not (tmp_path / "o2.onnx").exists() and not (tmp_path / "p2.png").exists()
    monkeypatch.delitem(sys.modules, "matplotlib")
    assert cli("prune", src, "-o", out2, "--calib", calib, "--plot", out2, "--quiet") != 0
    assert "--plot must name a file of its own" in capsys.readouterr().err
    assert not (tmp_path / "o2.onnx").exists()
    assert digest(src) == before
