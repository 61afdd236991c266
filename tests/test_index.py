"""The graph index on onnx-ir: uses across If/Loop/Scan scopes, scopes and their addresses in a
copy, sparse initializers (which onnx-ir drops), and the pairing with the protobuf nodes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lobs.graph import QUANTIZED, SPARSE, ConstRef, Constants
from onnx_lobs.index import GraphIndex, address, read_ir, resolve, write_ir
from tests import subgraphs
from tests.builders import make_model, tensor, vi


def test_outer_weights_are_used_inside_bodies_and_scopes_are_known():
    rng = np.random.default_rng(0)
    for make, body_op in ((subgraphs.if_model, "If"), (subgraphs.loop_model, "Loop"), (subgraphs.scan_model, "Scan")):
        model = make(rng)
        index = GraphIndex(model)
        weight = next(v for v in index.ir.graph.initializers.values() if v.name in ("W", "Wo"))
        (use,) = weight.uses()
        site = index.site(use.node)
        assert site.node.op_type == "MatMul" and site.proto.op_type == "MatMul" and site.proto.name == site.label
        assert [p.op_type for p, _ in site.scope] == [body_op]
        # the defining scope of the MatMul's activation input: inside the body unless it comes from outside
        x = site.node.inputs[0]
        assert index.defining_scope(x) == (site.scope if x.producer() is not None or x.graph is not index.ir.graph
                                           else ())


def test_every_node_is_paired_with_its_protobuf_in_walk_order():
    model = subgraphs.if_model(np.random.default_rng(1))
    index = GraphIndex(model)
    assert [s.proto.op_type for s in index.sites] == [s.node.op_type for s in index.sites]
    assert len(index.sites) == 3 + 2 + 2  # main graph, else branch, then branch
    assert index.sites[0].label == "ReduceSum_0" and index.sites[2].label == "branch"


def test_addresses_find_the_same_bodies_in_a_copy():
    model = subgraphs.loop_model(np.random.default_rng(2))
    index = GraphIndex(model)
    inner = next(s for s in index.sites if s.scope)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    other = GraphIndex(copy)
    assert other.at(inner.path).proto.name == inner.proto.name
    (parent, attr), = resolve(other.ir, address(inner.scope))
    assert parent.op_type == "Loop" and attr == "body" and parent is not inner.scope[0][0]


def test_sparse_initializers_are_recognised_though_onnx_ir_drops_them():
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "S")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "S_idx")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "S"], ["y"], name="mm")], "g",
                              [vi("x", TensorProto.FLOAT, [1, 2])], [vi("y", TensorProto.FLOAT, [1, 2])],
                              sparse_initializer=[helper.make_sparse_tensor(values, indices, [2, 2])])
    model = helper.make_model(graph)
    index = GraphIndex(model)
    (site,) = index.sites
    assert index.is_sparse(site.node.inputs[1]) and not index.is_sparse(site.node.inputs[0])
    assert Constants(index).at(site, 1) == SPARSE
    assert not write_ir(read_ir(model)).graph.sparse_initializer  # the gap: onnx-ir drops them ...
    back = write_ir(read_ir(model), model)  # ... and write_ir puts them back
    assert [t.values.name for t in back.graph.sparse_initializer] == ["S"]
    onnx.checker.check_model(back)


def test_constants_seen_through_identity_cast_and_dequantize():
    rng = np.random.default_rng(3)
    w16 = rng.standard_normal((4, 3)).astype(np.float16)
    nodes = [helper.make_node("Constant", [], ["Wk"], value=tensor("", w16)),
             helper.make_node("Identity", ["Wk"], ["Wi"]),
             helper.make_node("Cast", ["Wi"], ["W32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "W32"], ["a"], name="mm"),
             helper.make_node("DequantizeLinear", ["q", "sc"], ["Wq"]),
             helper.make_node("Transpose", ["Wq"], ["Wqt"]),
             helper.make_node("MatMul", ["a", "Wqt"], ["y"], name="qmm")]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 4])], [vi("y", TensorProto.FLOAT, ["N", 3])],
                       [tensor("q", np.ones((3, 3), np.int8)), tensor("sc", np.float32(0.1))])
    index = GraphIndex(model)
    constants = Constants(index)
    mm, qmm = (next(s for s in index.sites if s.label == n) for n in ("mm", "qmm"))
    ref = constants.at(mm, 1)
    assert isinstance(ref, ConstRef) and ref.cast_to == TensorProto.FLOAT and ref.dtype == TensorProto.FLOAT16
    assert ref.where == "Constant node (through Cast)" and ref.node.op_type == "Constant"
    # the Identity and the Cast are aliases, not uses: the MatMul is the weight's only consumer
    assert [c.site.label for c in constants.consumers[ref.value]] == ["mm"]
    assert constants.at(qmm, 1) == QUANTIZED
