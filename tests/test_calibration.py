"""Calibration sources: every accepted form, and a one-line error for every misfit."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lobs import LobsError, PruneConfig, prune
from onnx_lobs.calibration import BATCHED, PER_SAMPLE, ArraySource, open_source
from tests.builders import mlp, single_layer, small_cnn, streaming_model


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


# ----------------------------------------------------------------------------------------------
# layouts by rank: batch on axis 0, or one feed per sample


def stream_data(n=30, seed=0, **override):
    rng = np.random.default_rng(seed)
    data = {"state": rng.standard_normal((n, 2, 1, 8)).astype(np.float32),  # one feed per sample
            "x": rng.standard_normal((n, 16)).astype(np.float32),  # batch on axis 0
            "sr": rng.choice([8000, 16000], n).astype(np.int64)}  # a scalar per sample
    data.update(override)
    return data


def test_layout_is_decided_per_input_by_rank():
    model = streaming_model(np.random.default_rng(0))
    data = stream_data()
    src = open_source(data, model)
    assert src.layout == {"state": PER_SAMPLE, "x": BATCHED, "sr": PER_SAMPLE}
    feeds = list(src.batches(8))
    assert len(feeds) == 30 and [held for _, held in feeds] == [False] * 27 + [True] * 3
    for i, (feed, _) in enumerate(feeds):
        assert feed["state"].shape == (2, 1, 8) and feed["x"].shape == (1, 16) and feed["sr"].shape == ()
        assert isinstance(feed["sr"], np.ndarray) and feed["sr"] == data["sr"][i]
        np.testing.assert_array_equal(feed["state"], data["state"][i])
        assert src.count(feed) == 1
    # x given per sample as well ([n, 1, 16]): the same feeds
    again = list(open_source(stream_data(x=data["x"][:, None]), model).batches(8))
    assert all(np.array_equal(a["x"], b["x"]) for (a, _), (b, _) in zip(feeds, again))


def test_batched_inputs_are_chunked_and_counted():
    model = mlp(np.random.default_rng(0))
    src = open_source({"x": np.ones((50, 12), np.float32)}, model)
    assert src.layout == {"x": BATCHED}
    assert [src.count(f) for f, _ in src.batches(16)] == [16, 16, 13, 5]
    per_sample = open_source({"x": np.ones((50, 3, 12), np.float32)}, model)  # [n, 3, 12]: 3 rows a feed
    assert per_sample.layout == {"x": PER_SAMPLE}
    assert {f["x"].shape for f, _ in per_sample.batches(16)} == {(3, 12)}
    assert sum(per_sample.count(f) for f, _ in per_sample.batches(16)) == 50


def test_fixed_leading_axes_that_are_not_a_batch_do_not_set_the_batch():
    """The state's fixed axis 0 (2) must not become the batch of the other inputs."""
    model = streaming_model(np.random.default_rng(0), x_batch=1)
    src = open_source(stream_data(), model)
    assert src.fixed_batch == 1 and {f["x"].shape for f, _ in src.batches(64)} == {(1, 16)}
    # all inputs batched, the state's axis 0 then really is the batch: fed in batches of exactly 2
    m2 = streaming_model(np.random.default_rng(0), x_batch=2)
    data = {"state": np.ones((6, 1, 8), np.float32), "x": np.ones((6, 16), np.float32)}
    m2.graph.input.pop()  # no sample rate
    m2.graph.node[4].op_type = "Identity"  # Cast(sr) -> unused below
    m2.graph.node[4].input[0] = "ref_rate"
    del m2.graph.node[4].attribute[:]
    src = open_source(data, m2)
    assert src.layout == {"state": BATCHED, "x": BATCHED} and {f["x"].shape[0] for f, _ in src.batches(64)} == {2}


@pytest.mark.parametrize("override, message", [
    (dict(state=np.zeros((30, 3, 1, 8), np.float32)),
     r"tensor 'state' has shape \[30, 3, 1, 8\]: one sample's feed is \[3, 1, 8\], the model expects \[2, 1, 8\]"),
    (dict(state=np.zeros((30, 2, 8), np.float32)),
     r"tensor 'state' has shape \[30, 2, 8\], the model expects \[2, 1, 8\]"),
    (dict(state=np.zeros((30, 1, 2, 1, 8), np.float32)),
     r"tensor 'state' has shape \[30, 1, 2, 1, 8\], the model expects rank 3 \[2, 1, 8\] \(batch on axis 0\) "
     r"or rank 4 \(one feed per sample\)"),
    (dict(sr=np.array(16000, np.int64)), "tensor 'sr' is a single scalar; give one value per sample, shape \\[n\\]"),
    (dict(sr=np.full((30, 1), 16000, np.int64)), r"tensor 'sr' has shape \[30, 1\], the model expects rank 0"),
    (dict(sr=np.full(29, 16000, np.int64)), r"inputs have different numbers of samples \('state': 30 \(per sample\), "
                                             r"'x': 30 \(batched\), 'sr': 29 \(per sample\)\)"),
    (dict(sr=np.full(30, 16000, np.int32)), "tensor 'sr' has dtype int32, the model expects int64"),
    (dict(x=np.zeros((30, 0), np.float32)), r"tensor 'x' is empty \(shape \[30, 0\]\)"),
    (dict(state=np.zeros((0, 2, 1, 8), np.float32)), "tensor 'state' has no samples"),
    (dict(state=np.full((30, 2, 1, 8), np.inf, np.float32)), "tensor 'state' contains NaN or Inf"),
])
def test_layout_misfits_are_named(override, message, tmp_path):
    model = streaming_model(np.random.default_rng(0))
    with pytest.raises(LobsError, match=message):
        open_source(stream_data(**override), model)
    path = tmp_path / "s.npz"
    np.savez(path, **stream_data(**override))
    with pytest.raises(LobsError, match="s.npz: " + message):
        open_source(str(path), model)


def test_a_fixed_batch_cannot_mix_with_per_sample_feeds():
    model = streaming_model(np.random.default_rng(0), x_batch=4)
    with pytest.raises(LobsError, match="tensor 'x' has its batch on axis 0 with a fixed batch of 4, but 'state' "
                                        r"gives one feed per sample: give 'x' one feed per sample too \(shape \[n, 4"):
        open_source(stream_data(), model)
    src = open_source(stream_data(x=np.zeros((30, 4, 16), np.float32)), model)
    assert {f["x"].shape for f, _ in src.batches(8)} == {(4, 16)}
    fixed = mlp(np.random.default_rng(0))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    with pytest.raises(LobsError, match="3 samples, fewer than the model's fixed batch of 4"):
        open_source({"x": np.ones((3, 12), np.float32)}, fixed)


def test_folder_files_must_share_their_layout(tmp_path):
    model = streaming_model(np.random.default_rng(0))
    folder = tmp_path / "parts"
    folder.mkdir()
    np.savez(folder / "a.npz", **stream_data(10))
    data = stream_data(10)
    data["x"] = data["x"][:, None]  # per sample in this file only
    np.savez(folder / "b.npz", **data)
    src = open_source(str(folder), model)
    with pytest.raises(LobsError, match=r"b.npz: tensor 'x' is given per sample, but a.npz gives it batched"):
        list(src.batches(4))
    np.savez(folder / "b.npz", **stream_data(10, seed=1))
    feeds = list(open_source(str(folder), model).batches(4))
    assert len(feeds) == 20 and sum(held for _, held in feeds) == 2


def test_reader_feeds_must_fit_exactly():
    model = streaming_model(np.random.default_rng(0))

    class Reader:
        def __init__(self, feeds):
            self.feeds = list(feeds)

        def get_next(self):
            return self.feeds.pop(0) if self.feeds else None

    good = {"state": np.zeros((2, 1, 8), np.float32), "x": np.zeros((3, 16), np.float32), "sr": np.array(8000)}
    src = open_source(Reader([good] * 10), model)
    assert [src.count(f) for f, _ in src.batches(1)] == [2] * 10  # axis 0 of the first input with axes
    bad = dict(good, state=np.zeros((3, 1, 8), np.float32))
    with pytest.raises(LobsError,
                       match=r"feed 1\): tensor 'state' has shape \[3, 1, 8\], the model expects \[2, 1, 8\]"):
        list(open_source(Reader([good, bad]), model).batches(1))
    with pytest.raises(LobsError, match=r"feed 0\): not a dict of arrays"):
        list(open_source(Reader([[1, 2]]), model).batches(1))


def test_a_reader_is_read_once_and_its_feeds_replayed_by_later_passes():
    """A CalibrationDataReader cannot be rewound: a second pass (sequential mode's stages, the
    dense pass of an allocation) sees the feeds the first one read, then the rest of the reader,
    whichever pass stopped early."""
    model = streaming_model(np.random.default_rng(0))
    calls = []

    class Reader:
        def __init__(self, n):
            self.k, self.n = 0, n

        def get_next(self):
            calls.append(self.k)
            if self.k == self.n:
                return None
            self.k += 1
            return {"state": np.full((2, 1, 8), self.k, np.float32), "x": np.zeros((3, 16), np.float32),
                    "sr": np.array(8000)}

    src = open_source(Reader(12), model)
    first = [f["state"][0, 0, 0] for f, _ in src.batches(1, samples=8)]  # stops early
    whole = [(f["state"][0, 0, 0], held) for f, held in src.batches(1)]
    again = [(f["state"][0, 0, 0], held) for f, held in src.batches(1)]
    assert first == [1, 2, 3, 4] and [v for v, _ in whole] == list(range(1, 13)) and again == whole
    assert calls == list(range(13))  # each feed asked for once, and the end once


def test_random_data_follows_the_layouts():
    model = streaming_model(np.random.default_rng(0))
    with pytest.warns(UserWarning, match="random data"):
        src = open_source("random", model, samples=20)
    assert src.layout == {"state": PER_SAMPLE, "x": BATCHED, "sr": PER_SAMPLE} and src.n == 20


def test_prune_streaming_model_with_per_sample_inputs(tmp_path):
    model = streaming_model(np.random.default_rng(0))
    path = tmp_path / "calib.npz"
    np.savez(path, **stream_data(40))
    result = prune(model, str(path), PruneConfig(default_exclude=False))
    assert [(r.name, r.sparsity) for r in result.report.layers] == [
        ("in_proj", 0.5), ("state_proj", 0.5), ("out_proj", 0.5)]
    assert result.report.fidelity["samples"] == 4


def test_report_counts_per_sample_feeds_as_one_sample_each(tmp_path):
    model = streaming_model(np.random.default_rng(0))
    result = prune(model, stream_data(40), PruneConfig(default_exclude=False))
    assert result.report.samples == {"calibration": 36, "held_out": 4}


def test_evaluate_counts_per_sample_feeds_for_labels():
    from onnx_lobs import evaluate

    model = streaming_model(np.random.default_rng(0))
    data = stream_data(30)
    data["labels"] = np.zeros(30, np.int64)
    result = evaluate(model, data, reference=model)
    assert result["samples"] == 30 and 0 <= result["accuracy"] <= 1 and result["rel_l2"] == 0


def test_negative_dims_are_dynamic():
    """paddle2onnx writes -1 for a dynamic axis: not a fixed batch of -1."""
    model = mlp(np.random.default_rng(0))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    src = open_source({"x": np.ones((30, 12), np.float32)}, model)
    assert src.fixed_batch is None and [len(f["x"]) for f, _ in src.batches(16)] == [16, 11, 3]
