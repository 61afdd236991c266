"""The channel groups found on the graph: who produces, who consumes, and why a group is kept whole."""

from __future__ import annotations

import pytest

from onnx_lobs.graph import Constants, find_layers
from onnx_lobs.groups import find_groups, static_shapes
from onnx_lobs.index import GraphIndex
from onnx_lobs.modelio import as_loaded
from tests import channel_graphs as cg


def _groups(model):
    loaded = as_loaded(model)
    index = GraphIndex(loaded.model)
    layers, _ = find_layers(loaded, index)
    return find_groups(index, Constants(index), layers, static_shapes(loaded.model))


def _shape(g):
    return ([p.layer.name for p in g.producers], [(c.layer.name, c.port.block) for c in g.consumers], g.blocked)


def test_a_residual_stage_is_one_group():
    model, (stem, a1, b1, a2, b2, fc, out) = cg.built(["residual", "residual"])
    groups = _groups(model)
    # the stem and both blocks' last convs write the residual stream; the blocks' first convs and the
    # head read it
    assert _shape(groups[0]) == ([stem, b1, b2], [(a1, 1), (a2, 1), (fc, 1)], None)
    assert [_shape(g) for g in groups[1:3]] == [([a1], [(b1, 1)], None), ([a2], [(b2, 1)], None)]


def test_depthwise_passes_the_expanded_channels_through():
    model, (stem, expand, depthwise, project, *_) = cg.built(["inverted"])
    g = _groups(model)
    group = next(x for x in g if x.label == expand)
    assert _shape(group) == ([expand], [(project, 1)], None)
    assert [(e.kind, e.label) for e in group.edits] == [("depthwise", depthwise)]
    assert not any(x.label == depthwise for x in g)  # the depthwise conv is no group of its own


def test_squeeze_excite_gate_joins_the_gated_channels():
    model, (stem, reduce, expand, fc, _) = cg.built(["squeeze_excite"])
    g = _groups(model)[0]
    assert [p.layer.name for p in g.producers] == [stem, expand]  # the stem, and the gate's expand conv
    assert sorted(c.layer.name for c in g.consumers) == sorted([reduce, fc])


@pytest.mark.parametrize("head,block", [("gap_head", 1), ("flatten_head", 9), ("reshape_head", 36)])
def test_a_flatten_into_a_gemm_makes_each_channel_a_block_of_columns(head, block):
    g = _groups(cg.build([], head=head))[0]
    assert g.blocked is None
    assert [c.port.block for c in g.consumers] == [block]
    assert any(e.kind == "entry" for e in g.edits) == (head == "reshape_head")


@pytest.mark.parametrize("act", cg.ACTS)
def test_activations_and_nhwc_scales_pass_through(act):
    model, layers = cg.built(["conv_bn_act", "nhwc", "scale", "pool"], acts=[act])
    second = next(x for x in _groups(model) if x.label == layers[1])
    assert second.blocked is None
    kinds = sorted({(e.kind, e.label.rstrip("0123456789")) for e in second.edits})
    expected = {("slice", "batchnormalization"), ("slice", "mul"), ("slice", "add"), ("slice", "sub")}
    if act == "prelu":
        expected.add(("slice", "prelu"))
    assert set(kinds) == expected


@pytest.mark.parametrize("block,why", [
    ("lrn", "LRN 'lrn"), ("channel_softmax", "normalises over the channel axis"), ("tap", "graph output")])
def test_what_is_not_understood_keeps_the_group_whole_and_says_why(block, why):
    model, layers = cg.built(["residual", block])
    g = _groups(model)[0]  # the residual stream, which meets the block
    assert g.blocked is not None and why in g.blocked


def test_concat_puts_each_group_at_its_offset():
    model, (stem, a, b, fc, _) = cg.built(["concat"])
    g = {x.label: x for x in _groups(model)}
    cat = next(n for n in g[a].ports if n.startswith("concat"))
    assert (g[a].ports[cat].offset, g[b].ports[cat].offset) == (0, 4)
    assert [c.layer.name for c in g[a].consumers] == [fc] == [c.layer.name for c in g[b].consumers]
    assert g[a].blocked is None and g[b].blocked is None


def test_split_parts_carry_ranges_of_the_channels():
    model, (stem, first, inner, mix, fc, _) = cg.built(["c2f"])
    g = {x.label: x for x in _groups(model)}[first]
    assert g.blocked is None
    reads = {c.layer.name: (c.port.lo, c.port.hi, c.port.offset) for c in g.consumers}
    assert reads == {inner: (4, 8, 0), mix: (0, 8, 0)}  # the mix reads all eight, and z (another group)
    assert [e.kind for e in g.edits] == ["split"]


def test_mlp_hidden_neurons():
    g = _groups(cg.mlp())
    assert [_shape(x)[:2] for x in g[:2]] == [(["matmul2"], [("matmul7", 1)]), (["matmul7"], [("matmul12", 1)])]
    assert "graph output" in g[2].blocked


def test_attention_heads_are_one_group_of_q_k_v_and_the_output_projection():
    model, (stem, q, k, v, _, _, o, fc, _) = cg.built(["attention"])  # _: the activation products
    groups = {g.label: g for g in _groups(model)}
    heads = groups[q]
    assert (heads.channels, heads.width) == (2, 4)  # 2 heads of 4 units each
    assert _shape(heads) == ([q, k, v], [(o, 4)], None)
    # the head count of each Reshape into heads, and the merged width, follow the removed heads
    assert sorted(e.kind for e in heads.edits if e.kind == "entry") == ["entry"] * 4
    # the residual stream reaches q, k and v through a Reshape to tokens and a Transpose, and
    # the output projection writes it back
    assert _shape(groups[stem])[:2] == ([stem, o], [(q, 1), (k, 1), (v, 1), (fc, 1)])


def _fused_qkv(runtime_shape=False):
    """q, k and v from one MatMul and a Split, or the heads Reshape's shape computed at run time."""
    g = cg.Graph(channels=8)
    c, heads, d = 8, 2, 4
    t = g.op("Transpose", [g.op("Reshape", [g.x, g.const([0, c, -1], "int64")])], perm=[0, 2, 1])
    if runtime_shape:
        parts = [g.op("MatMul", [t, g.const(g.rng.standard_normal((c, c)))]) for _ in range(3)]
        lead = g.op("Slice", [g.op("Shape", [t]), g.const([0], "int64"), g.const([2], "int64")])
        shape = g.op("Concat", [lead, g.const([heads, d], "int64")], axis=0)
    else:
        qkv = g.op("MatMul", [t, g.const(g.rng.standard_normal((c, 3 * c)))])
        n = g.name("split")
        g.nodes.append(cg.helper.make_node("Split", [qkv, g.const([c] * 3, "int64")], [n + "q", n + "k", n + "v"],
                                           name=n, axis=2))
        parts, shape = [n + "q", n + "k", n + "v"], g.const([0, 0, heads, d], "int64")
    q, k, v = (g.op("Transpose", [g.op("Reshape", [x, shape])], perm=p)
               for x, p in zip(parts, ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3])))
    ctx = g.op("MatMul", [g.op("Softmax", [g.op("MatMul", [q, k])], axis=-1), v])
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, 0, c], "int64")])
    o = g.op("Transpose", [g.op("MatMul", [ctx, g.const(g.rng.standard_normal((c, c)))])], perm=[0, 2, 1])
    g.x = g.op("Reshape", [o, g.const([0, c, cg.SPATIAL, cg.SPATIAL], "int64")])
    return g.gap_head(), g.layers


@pytest.mark.parametrize("runtime_shape,why", [
    (False, "carries the channels in two layouts"),  # head h of q is channel h, of k channel 2 + h
    (True, "its shapes are not known"),  # the Reshape into heads: data propagation cannot tell
])
def test_attention_that_cannot_be_followed_is_kept_whole(runtime_shape, why):
    model, layers = _fused_qkv(runtime_shape)
    groups = {g.label: g for g in _groups(model)}
    heads = groups[layers[1]]
    assert heads.blocked and why in heads.blocked


@pytest.mark.parametrize("axis,blocked", [(0, False), (1, True), (-3, True)])
def test_a_shape_read_blocks_only_when_it_reads_the_channel_count(axis, blocked):
    g = cg.Graph()
    stem = g.layers[0]
    g.op("Gather", [g.op("Shape", [g.x]), g.const(axis, "int64")], axis=0)  # a batch size is harmless,
    # a channel count is not (what reads it is left out: the rule looks at the Shape's readers only)
    g.x = g.op("Relu", [g.x])
    model = g.gap_head()
    why = {x.label: x for x in _groups(model)}[stem].blocked
    assert (why is not None and "channel count is read at run time" in why) == blocked, why


def test_shape_inference_leaves_nothing_in_the_working_directory(tmp_path, monkeypatch):
    """onnxruntime's symbolic inference saves its partial model to the working directory when it
    gives up (here at an op it does not know): the user's directory must stay as it was."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((4, 8), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Foo", ["y"], ["z"], domain="com.example")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [z], [w]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    monkeypatch.chdir(tmp_path)
    assert static_shapes(model)["y"] == ("n", "t", 8)
    assert list(tmp_path.iterdir()) == []
