"""Report serialisation and the bound's recursion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from onnx_lobs import PruneConfig, prune
from onnx_lobs.report import chain_bound, format_table
from tests import subgraphs
from tests.builders import mlp


def test_chain_bound_recursion():
    # e1 = 0.5; e2 = 2 * 1.5 * 0.5 + 0.25 = 1.75; final = 3 * 1.75
    assert chain_bound([(1.0, 4.0, 0.5), (1.5, 2.0, 0.25)], 3.0) == pytest.approx(5.25)
    assert chain_bound([], 1.0) == 0.0


def test_report_json_is_strict_and_complete():
    rng = np.random.default_rng(0)
    result = prune(mlp(rng), {"x": rng.standard_normal((100, 12)).astype(np.float32)}, PruneConfig(default_exclude=False, sparsity=0.5))
    text = result.report.to_json()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["config"]["method"] == "auto" and data["config"]["sparsity"] == 0.5
    assert {"onnx", "onnxruntime", "numpy", "onnx_lobs"} <= set(data["versions"])
    assert {"load", "forward", "hessian", "solve", "verify", "total"} <= set(data["timings"])
    assert data["samples"] == {"calibration": 90, "held_out": 10}
    for rec in data["layers"]:
        assert rec["error"] >= 0 and math.isfinite(rec["rel_error"])
    table = format_table(result.report)
    assert "fc1" in table and "overall sparsity 50.0%" in table and "bound" in table


def test_bound_reason_for_non_chains():
    rng = np.random.default_rng(1)
    report = prune(subgraphs.shared_model(rng), {"x": rng.standard_normal((60, 4)).astype(np.float32)}).report
    assert report.bound["measured_rms"] is None and "Add" in report.bound["reason"]
    assert "error bound not computed" in format_table(report)
