"""What every adapter of the registry must do, run over every op's cases (their modules' CASES).

The matrix view: the unfolded columns times the weight matrices (plus the bias) reproduce the op
as onnxruntime runs it, the columns and the Hessian from them equal brute-force references
(refs.py), and weight and bias survive the round trip. The channel view, for structured pruning:
dropping or zeroing channels through the adapter changes the op as removing them from its input
or output would. An adapter registered without cases fails here.
"""

from __future__ import annotations

import importlib
import math
import pkgutil

import numpy as np
import pytest
from onnx import NodeProto

from onnx_lobs.layers import ADAPTERS, Adapter

from . import __path__ as _package_path
from .refs import FAST_RTOL, HESS_RTOL, assert_op_close, case_rng, columns, hessian_from_chunks, ref_hessian, rel_fro


def _registered_cases() -> dict:
    """op -> its cases, from every test module of this package (as layers/ collects ADAPTERS)."""
    found = {}
    for info in sorted(pkgutil.iter_modules(_package_path), key=lambda i: i.name):
        if info.name.startswith("test_") and info.name != "test_contract":
            for case in getattr(importlib.import_module(f"{__package__}.{info.name}"), "CASES", ()):
                found.setdefault(case.op, []).append(case)
    return found


CASES = _registered_cases()
ALL = [c for op in sorted(CASES) for c in CASES[op]]
STRUCTURAL = [c for c in ALL if c.structural]
WITH_INPUTS = [c for c in STRUCTURAL if c.in_axis is not None]


def test_every_adapter_implements_the_protocol_and_has_cases():
    assert set(CASES) == set(ADAPTERS), "every registered op needs cases, and every case a registered op"
    for op, adapter in ADAPTERS.items():
        assert isinstance(adapter, Adapter) and adapter.op == op
        assert adapter.family in ("conv", "dense")
        assert [c for c in STRUCTURAL if c.op == op], f"{op}: no case checks the structured members"


def _bias_vector(adapter, node, b, geom, case):
    """The bias as the adapter sees it, checked: [groups, rows], or None when the op ignores it."""
    if b is None:
        return None
    bvec = adapter.bias_vector(node, b, geom.groups * geom.rows)
    if case.bias_ignored:
        assert bvec is None
    else:
        assert bvec.shape == (geom.groups, geom.rows)
    return bvec


# ----------------------------------------------------------------------------------------------
# the matrix view


@pytest.mark.parametrize("case", ALL, ids=str)
def test_columns_reproduce_op(case):
    x, w, b, model, node = case.setup()
    adapter = ADAPTERS[case.op]
    assert adapter.skip_reason(node, w.shape) is None
    geom = adapter.geometry(node, w.shape)
    cols, _ = columns(adapter, node, x, w.shape)
    mats = adapter.to_matrices(node, w.astype(np.float64))
    assert mats.shape == (geom.groups, geom.rows, geom.cols)
    assert cols.shape[0] == geom.groups and cols.shape[2] == geom.cols
    assert cols.dtype == (np.float64 if x.dtype == np.float64 else np.float32)  # x's values, not rounded
    if adapter.bias_input is None:
        assert adapter.bias_vector(node, np.zeros(geom.rows), geom.rows) is None

    y = case.run(model, x)
    patches, y_shape = case.reference(x, w.shape, case.attrs)
    assert y.shape == tuple(y_shape)
    ref = case.rows(y)
    assert cols.shape[1] == ref.shape[0] and ref.shape[1] == geom.groups * geom.rows
    bvec = _bias_vector(adapter, node, b, geom, case)
    for g in range(geom.groups):
        got = cols[g].astype(np.float64) @ mats[g].T
        if bvec is not None:
            got = got + bvec[g]
        assert_op_close(got, ref[:, g * geom.rows:(g + 1) * geom.rows], case.op_tol)

    # the columns are the brute-force receptive fields, in (sample, position) order
    if case.column_rtol:
        np.testing.assert_allclose(cols, patches, rtol=case.column_rtol, atol=0)
    else:
        np.testing.assert_array_equal(cols, patches)


@pytest.mark.parametrize("case", ALL, ids=str)
def test_hessian_matches_loops(case):
    x, w, b, _, node = case.setup()
    adapter = ADAPTERS[case.op]
    geom = adapter.geometry(node, w.shape)
    bias = b is not None and adapter.bias_vector(node, b, geom.groups * geom.rows) is not None
    h, n = hessian_from_chunks(adapter, node, x, w.shape, bias)
    patches, y_shape = case.reference(x, w.shape, case.attrs)
    ref = ref_hessian(patches, bias)
    assert n == patches.shape[1] == math.prod(y_shape) // y_shape[case.out_axis]  # one sample an output position
    assert h.shape == ref.shape
    assert rel_fro(h, ref) <= HESS_RTOL
    h_fast, _ = hessian_from_chunks(adapter, node, x, w.shape, bias, exact=False)
    assert rel_fro(h_fast, ref) <= FAST_RTOL


@pytest.mark.parametrize("case", ALL, ids=str)
def test_round_trips(case):
    _, w, b, _, node = case.setup()
    adapter = ADAPTERS[case.op]
    geom = adapter.geometry(node, w.shape)
    other = np.float64 if w.dtype == np.float32 else np.float32
    for arr in (w, w.astype(other), w != 0):
        mats = adapter.to_matrices(node, arr)
        assert mats.shape == (geom.groups, geom.rows, geom.cols)
        back = adapter.from_matrices(node, mats, arr)
        assert back.shape == arr.shape and back.dtype == arr.dtype
        np.testing.assert_array_equal(back, arr)
    bvec = _bias_vector(adapter, node, b, geom, case)
    if bvec is not None:
        back = adapter.bias_from_vector(node, bvec, b)
        assert back.shape == b.shape
        np.testing.assert_allclose(back, b, rtol=case.bias_rtol, atol=0)  # rtol 0: exactly equal


# ----------------------------------------------------------------------------------------------
# the channel view (structured pruning)


@pytest.mark.parametrize("case", ALL, ids=str)
def test_channels_agree_with_geometry_and_shapes(case):
    x, w, _, model, node = case.setup()
    adapter = ADAPTERS[case.op]
    geom = adapter.geometry(node, w.shape)
    inputs, outputs = adapter.channels(node, w.shape)
    kernel = math.prod(w.shape[2:])  # positions per channel (1 for a dense op)
    assert outputs == geom.groups * geom.rows
    assert inputs * kernel == geom.groups * geom.cols
    assert w.size * geom.groups == inputs * outputs * kernel
    assert case.run(model, x).shape[case.out_axis] == outputs
    if case.in_axis is not None:
        assert x.shape[case.in_axis] == inputs
    rank = adapter.input_rank(w.shape)
    assert rank is None or rank == x.ndim
    assert 1 <= adapter.fan_in(node, w.shape) <= geom.cols
    renamed = NodeProto()
    renamed.CopyFrom(node)
    renamed.name, renamed.input[0] = "other", "z"  # names do not decide the view
    key = adapter.view_key(node)
    assert isinstance(key, tuple) and hash(key) == hash(adapter.view_key(renamed)) and key == adapter.view_key(renamed)


def _allowed_keep(rng, total, groups, same_positions):
    """A random subset of channels the group rule allows: as many in every group, at the same
    local positions when the groups share that weight axis (all channels when a group has one)."""
    per = total // groups
    count = int(rng.integers(1, per)) if per > 1 else 1
    first = np.sort(rng.choice(per, count, replace=False))
    local = [first if same_positions else np.sort(rng.choice(per, count, replace=False)) for _ in range(groups)]
    return np.concatenate([g * per + p for g, p in enumerate(local)])


def _forbidden_keeps(total, groups, same_positions):
    """Keep sets every adapter must refuse: out of order, and what the group rule forbids."""
    bad = [np.array([1, 0])] if total > 1 else []
    per = total // groups
    if groups > 1:
        bad.append(np.array([0]))  # one group keeps a channel, the others none
        if same_positions and per > 1:  # one channel a group, not the same one
            bad.append(np.array([0] + [g * per + 1 for g in range(1, groups)]))
    return bad


def _zeroed(x, channels, axis):
    x = x.copy()
    index = [slice(None)] * x.ndim
    index[axis] = channels
    x[tuple(index)] = 0
    return x


@pytest.mark.parametrize("case", WITH_INPUTS, ids=str)
def test_input_columns_are_those_reading_the_channels(case):
    """Zeroing the columns of some input channels is zeroing those channels of x."""
    x, w, b, model, node = case.setup()
    adapter = ADAPTERS[case.op]
    geom = adapter.geometry(node, w.shape)
    inputs, _ = adapter.channels(node, w.shape)
    rng = case_rng("columns" + case.name)
    some = np.sort(rng.choice(inputs, int(rng.integers(1, inputs)) if inputs > 1 else 1, replace=False))
    for chosen in (some, np.array([inputs // 2])):  # (a random subset may be whole groups)
        cols = adapter.input_columns(node, w.shape, chosen)
        assert cols.dtype == bool and cols.shape == (geom.groups, geom.cols)
        rest = adapter.input_columns(node, w.shape, np.setdiff1d(np.arange(inputs), chosen))
        assert not np.any(cols & rest) and np.all(cols | rest)
        assert cols.sum() * inputs == len(chosen) * geom.groups * geom.cols  # a channel's columns: all its taps
        mats = np.where(cols[:, None, :], 0, adapter.to_matrices(node, w))
        pruned = case.model(adapter.from_matrices(node, mats, w), b, x.shape)
        assert_op_close(case.run(pruned, x), case.run(model, _zeroed(x, chosen, case.in_axis)), case.op_tol)


def _drop(case, side):
    """Drop a random allowed set of the case's input or output channels, after checking that the
    forbidden sets raise: ((x, w, b, model, node), keep, the smaller weight)."""
    x, w, b, model, node = case.setup()
    adapter = ADAPTERS[case.op]
    groups = adapter.geometry(node, w.shape).groups
    inputs, outputs = adapter.channels(node, w.shape)
    total, drop = (inputs, adapter.drop_inputs) if side == "inputs" else (outputs, adapter.drop_outputs)
    for bad in _forbidden_keeps(total, groups, case.same_positions == side):
        with pytest.raises(ValueError):
            drop(node, w, bad)
    keep = _allowed_keep(case_rng(side + case.name), total, groups, case.same_positions == side)
    smaller = drop(node, w, keep)
    assert smaller.dtype == w.dtype
    assert adapter.channels(node, smaller.shape) == ((len(keep), outputs) if side == "inputs" else (inputs, len(keep)))
    return (x, w, b, model, node), keep, smaller


@pytest.mark.parametrize("case", STRUCTURAL, ids=str)
def test_drop_outputs_keeps_exactly_those_outputs(case):
    (x, _, b, model, node), keep, w2 = _drop(case, "outputs")
    b2 = None
    if b is not None:
        b2 = ADAPTERS[case.op].drop_bias(node, b, keep)
        assert b2.dtype == b.dtype and b2.ndim == b.ndim
    y = case.run(case.model(w2, b2, x.shape), x)
    ref = np.take(case.run(model, x), keep, axis=case.out_axis)
    assert y.shape == ref.shape
    assert_op_close(y, ref, case.op_tol)


@pytest.mark.parametrize("case", WITH_INPUTS, ids=str)
def test_drop_inputs_equals_zeroed_inputs(case):
    """The smaller weight fed x without the dropped channels is the op fed x with them zeroed."""
    (x, _, b, model, _), keep, w2 = _drop(case, "inputs")
    small = np.take(x, keep, axis=case.in_axis)
    y = case.run(case.model(w2, b, small.shape), small)
    ref = case.run(model, _zeroed(x, np.setdiff1d(np.arange(x.shape[case.in_axis]), keep), case.in_axis))
    assert y.shape == ref.shape
    assert_op_close(y, ref, case.op_tol)
