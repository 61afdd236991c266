"""The round trip's checks that need no torch: output agreement and interface comparison."""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from onnx_lobs.roundtrip import _interface_difference, _max_diff
from tests.builders import vi


def test_max_diff_is_relative_to_the_output_scale_and_inf_on_mismatch():
    ref = [np.array([[10.0, -3.0]], np.float32), np.zeros((0, 4), np.float32)]
    out = [np.array([[10.5, -3.0]], np.float32), np.zeros((0, 4), np.float32)]
    assert math.isclose(_max_diff(ref, out), 0.5 / 11.0, rel_tol=1e-6)
    assert _max_diff(ref, ref) == 0.0
    assert _max_diff(ref, [out[0].T, out[1]]) == math.inf  # shape differs
    assert _max_diff(ref, out[:1]) == math.inf  # an output missing


def test_interface_difference_names_type_rank_and_axis():
    a = vi("x", TensorProto.FLOAT, ["N", 3, 8])
    assert _interface_difference(a, vi("x", TensorProto.FLOAT, ["batch", 3, 8])) is None  # names of dims free
    assert "type" in _interface_difference(a, vi("x", TensorProto.DOUBLE, ["N", 3, 8]))
    assert "rank 2" in _interface_difference(a, vi("x", TensorProto.FLOAT, ["N", 24]))
    assert _interface_difference(a, vi("x", TensorProto.FLOAT, [4, 3, 8])) == "axis 0 is 4, the pruned model's dynamic"
    assert _interface_difference(a, vi("x", TensorProto.FLOAT, ["N", 3, 9])) == "axis 2 is 9, the pruned model's 8"
    assert _interface_difference(a, vi("x", TensorProto.FLOAT, None)) is None  # no shape to compare
