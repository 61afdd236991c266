"""The checks a structurally pruned model passes before it is returned, and what is measured on it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from onnx_lobs import structured
from onnx_lobs.errors import LobsError
from onnx_lobs.pruning import PruneConfig, prune
from onnx_lobs.rewrite.shrink import SetInput
from onnx_lobs.structured_checks import latency_feed
from tests import channel_graphs as cg


def test_a_shrunk_model_that_computes_something_else_is_refused_and_names_a_group(monkeypatch):
    model, layers = cg.built(["residual"])
    victim = next(i for i, n in enumerate(model.graph.node) if n.name == layers[2])  # the block's second conv
    real = structured.shrink_edits

    def off_by_a_little(*args):  # a rewrite bug: one compensated weight written 1% too large
        return [dataclasses.replace(e, array=e.array * 1.01) if isinstance(e, SetInput) and e.node == victim else e
                for e in real(*args)]

    monkeypatch.setattr(structured, "shrink_edits", off_by_a_little)
    # the compensated weights are written whatever group is cut, so the first one tried is named
    with pytest.raises(LobsError, match=f"group '({layers[0]}|{layers[1]})' changes the outputs.*nothing was written"):
        prune(model, cg.feed(model, 64), PruneConfig(structured=True, sparsity=0.5, round_to=1, latency=False,
                                                    default_exclude=False))


def test_latency_is_timed_at_the_calibration_batch_when_the_batch_axis_is_free():
    model = cg.build(["residual"])
    feeds = [cg.feed(model, 5, seed=k) for k in range(2)]
    (feed,) = latency_feed(feeds, 32, model)
    assert feed["x"].shape[0] == 32
    np.testing.assert_array_equal(feed["x"][10:20], feed["x"][:10])  # the 10 held-out samples, repeated
    fixed = cg.build(["residual"])
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 5
    assert latency_feed(feeds, 32, fixed) == feeds[:1]  # a fixed batch: the feed as it is
