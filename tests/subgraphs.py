"""Models whose weights live in awkward places: Constant nodes, If/Loop/Scan bodies, shared, fp16."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from tests.builders import make_model, tensor, vi

F = TensorProto.FLOAT


def if_model(rng):
    """then: MatMul with an outer initializer; else: Gemm with a Constant-node weight inside the branch."""
    w_outer = rng.standard_normal((6, 3)).astype(np.float32)
    w_const = rng.standard_normal((3, 6)).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("MatMul", ["t", "Wo"], ["o1"], name="then_mm")],
        "then", [], [vi("o1", F, ["N", 3])])
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["Wc"], value=tensor("Wc_value", w_const)),
         helper.make_node("Gemm", ["x", "Wc"], ["o2"], name="else_gemm", transB=1)],
        "else", [], [vi("o2", F, ["N", 3])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [vi("x", F, ["N", 6])], [vi("y", F, ["N", 3])],
                      [tensor("Wo", w_outer), tensor("zero", np.array(0, np.float32))])


def loop_model(rng, trips=3):
    """h <- Relu(h @ W) three times, W an outer initializer used inside the Loop body."""
    w = (rng.standard_normal((5, 5)) / 2).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h", "W"], ["m"], name="loop_mm"),
         helper.make_node("Relu", ["m"], ["h_out"])],
        "body", [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("h", F, ["N", 5])],
        [vi("cond_out", TensorProto.BOOL, []), vi("h_out", F, ["N", 5])])
    nodes = [helper.make_node("Loop", ["trips", "true", "x"], ["y"], name="loop", body=body)]
    return make_model(nodes, [vi("x", F, ["N", 5])], [vi("y", F, ["N", 5])],
                      [tensor("W", w), tensor("trips", np.array(trips, np.int64)), tensor("true", np.array(True))])


def scan_model(rng):
    """A running sum over the first axis: s <- s + Relu(x_t @ W); W used inside the Scan body."""
    w = rng.standard_normal((4, 4)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["xt", "W"], ["m"], name="scan_mm"),
         helper.make_node("Relu", ["m"], ["r"]),
         helper.make_node("Add", ["s", "r"], ["s_out"]),
         helper.make_node("Identity", ["r"], ["r_out"])],
        "body", [vi("s", F, [4]), vi("xt", F, [4])], [vi("s_out", F, [4]), vi("r_out", F, [4])])
    nodes = [helper.make_node("Scan", ["s0", "x"], ["s_final", "rs"], name="scan", body=body, num_scan_inputs=1)]
    return make_model(nodes, [vi("x", F, ["T", 4])], [vi("s_final", F, [4]), vi("rs", F, ["T", 4])],
                      [tensor("W", w), tensor("s0", np.zeros(4, np.float32))])


def shared_model(rng):
    """One weight used by two MatMuls (pruned once); another also read by an Add (skipped)."""
    w = rng.standard_normal((4, 4)).astype(np.float32)
    v = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_a"),
             helper.make_node("Relu", ["x"], ["rx"]),
             helper.make_node("MatMul", ["rx", "W"], ["b"], name="mm_b"),
             helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("MatMul", ["ab", "V"], ["c"], name="mm_v"),
             helper.make_node("ReduceSum", ["V"], ["vs"], keepdims=0),
             helper.make_node("Add", ["c", "vs"], ["y"])]
    return make_model(nodes, [vi("x", F, ["N", 4])], [vi("y", F, ["N", 4])], [tensor("W", w), tensor("V", v)])


def constant_identity_model(rng, dtype=np.float32):
    """Weights in Constant nodes reached through an Identity, in the main graph."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = rng.standard_normal((8, 3)).astype(dtype)
    nodes = [helper.make_node("Constant", [], ["Wk"], value=tensor("", w)),
             helper.make_node("Identity", ["Wk"], ["Wi"]),
             helper.make_node("MatMul", ["x", "Wi"], ["y"], name="mm")]
    return make_model(nodes, [vi("x", elem, ["N", 8])], [vi("y", elem, ["N", 3])])
