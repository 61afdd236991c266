"""Calibration sources: every accepted form, and a one-line error for every misfit."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs import LobsError
from onnx_lobs.calibration import ArraySource, open_source
from tests.builders import mlp, single_layer, small_cnn


@pytest.fixture
def cnn():
    return small_cnn(np.random.default_rng(0))


def x_cnn(n=10, dtype=np.float32):
    return np.random.default_rng(1).standard_normal((n, 2, 8, 8)).astype(dtype)


@pytest.mark.parametrize("data, message", [
    ({"y": x_cnn()}, "model input 'x' is missing"),
    ({"x": x_cnn(), "extra": x_cnn()}, "'extra' is not an input of the model"),
    ({"x": x_cnn(dtype=np.float64)}, "tensor 'x' has dtype float64, the model expects float32"),
    ({"x": x_cnn()[:, :1]}, r"tensor 'x' has shape \[10, 1, 8, 8\], the model expects \[\?, 2, 8, 8\]"),
    ({"x": x_cnn()[0]}, "tensor 'x' has shape .* rank 4"),
    ({"x": np.where(np.arange(640).reshape(10, 1, 8, 8) % 2, np.nan, x_cnn())}, "tensor 'x' contains NaN or Inf"),
    ({"x": np.full((3, 2, 8, 8), np.inf, np.float32)}, "tensor 'x' contains NaN or Inf"),
    ({"x": x_cnn()[:0]}, "tensor 'x' has no samples"),
])
def test_misfits_are_named(cnn, data, message, tmp_path):
    with pytest.raises(LobsError, match=message):
        open_source(data, cnn)
    path = tmp_path / "d.npz"
    np.savez(path, **data)
    with pytest.raises(LobsError, match="d.npz: " + message):
        open_source(str(path), cnn)


def test_other_bad_sources(cnn, tmp_path):
    with pytest.raises(LobsError, match="no such file or folder"):
        open_source(str(tmp_path / "missing.npz"), cnn)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(LobsError, match="bad.npz: cannot read as .npz"):
        open_source(str(tmp_path / "bad.npz"), cnn)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LobsError, match="no .npz files"):
        open_source(str(empty), cnn)
    with pytest.raises(LobsError, match="cannot import"):
        open_source("no_such_module_xyz:reader", cnn)
    with pytest.raises(LobsError, match="different numbers of samples"):
        two = single_layer("MatMul", np.ones((3, 3)), (1, 3))
        two.graph.input.append(two.graph.input[0])
        two.graph.input[1].name = "x2"
        open_source({"x": np.ones((4, 3), np.float32), "x2": np.ones((5, 3), np.float32)}, two)


def test_holdout_split():
    src = ArraySource({"x": x_cnn(100)}, "t", __import__("onnx_lobs.calibration", fromlist=["x"]).input_specs(
        small_cnn(np.random.default_rng(0))))
    assert src.split(None) == (range(0, 90), range(90, 100))
    assert src.split(50) == (range(0, 50), range(50, 55))  # held out from the unused rest
    assert src.split(1) == (range(0, 1), range(0, 0))
    batches = list(src.batches(32))
    assert [(len(f["x"]), held) for f, held in batches] == [(32, False), (32, False), (26, False), (10, True)]


def test_folder_and_reader_factory(cnn, tmp_path, monkeypatch):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"part{i}.npz", x=x_cnn(20))
    src = open_source(str(folder), cnn)
    feeds = list(src.batches(4))
    assert sum(len(f["x"]) for f, _ in feeds) == 60
    assert any(held for _, held in feeds)
    (tmp_path / "my_reader.py").write_text(
        "import numpy as np\n"
        "class R:\n"
        "    def __init__(self): self.k = 0\n"
        "    def get_next(self):\n"
        "        self.k += 1\n"
        "        return None if self.k > 12 else {'x': np.zeros((2, 2, 8, 8), np.float32)}\n"
        "def make(): return R()\n")
    monkeypatch.chdir(tmp_path)
    src = open_source("my_reader:make", cnn)
    feeds = list(src.batches(8))
    assert len(feeds) == 12 and sum(held for _, held in feeds) == 1


def test_reader_feeds_are_checked(cnn):
    class Bad:
        def get_next(self):
            return {"x": np.zeros((2, 2, 8, 8), np.float64)}

    src = open_source(Bad(), cnn)
    with pytest.raises(LobsError, match="feed 0.*dtype float64"):
        next(iter(src.batches(8)))


def test_fixed_batch_inputs_are_fed_in_that_batch():
    model = mlp(np.random.default_rng(0))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    src = open_source({"x": np.ones((22, 12), np.float32)}, model)
    assert {len(f["x"]) for f, _ in src.batches(64)} == {4}
