"""Fidelity and accuracy figures against hand-computed values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_lobs import evaluate
from onnx_lobs.evaluate import Fidelity
from tests.builders import mlp


def test_fidelity_matches_direct_formulas():
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((30, 5)) for _ in range(3)]
    out = [r + 0.3 * rng.standard_normal(r.shape) for r in ref]
    fid = Fidelity()
    for r, o in zip(ref, out):
        fid.add([r], [o])
    got = fid.result()
    r, o = np.concatenate(ref), np.concatenate(out)
    assert got["rel_l2"] == pytest.approx(np.linalg.norm(r - o) / np.linalg.norm(r))
    assert got["cosine"] == pytest.approx(np.sum(r * o) / np.linalg.norm(r) / np.linalg.norm(o))
    assert got["top1_agreement"] == pytest.approx(np.mean(r.argmax(1) == o.argmax(1)))
    assert got["rms"] == pytest.approx(np.sqrt(np.mean(np.sum((r - o) ** 2, axis=1))))
    assert got["samples"] == 90


def test_evaluate_accuracy_and_self_reference(tmp_path):
    rng = np.random.default_rng(1)
    model = mlp(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((70, 12)).astype(np.float32)
    import onnxruntime as ort

    pred = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].argmax(1)
    labels = pred.copy()
    labels[:7] = (labels[:7] + 1) % 4
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    result = evaluate(str(path), str(tmp_path / "d.npz"), reference=str(path), batch_size=16)
    assert result["accuracy"] == pytest.approx(0.9)
    assert result["top1_agreement"] == 1.0 and result["rel_l2"] == 0.0
    assert result["cosine"] == pytest.approx(1.0)
