"""The FLOPs counter against hand counts."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from onnx_lobs.flops import count
from tests.builders import make_model, tensor, vi


def _one(node, x_shape, w_shape, y_shape):
    w = tensor("w", np.zeros(w_shape, np.float32))
    y = [None] * len(x_shape) if y_shape is None else y_shape
    return make_model([node], [vi("x", TensorProto.FLOAT, x_shape)], [vi("y", TensorProto.FLOAT, y)], [w])


def test_conv_grouped_strided():
    # 16 -> 32 channels, 3x3, group 2, stride 2 on 10x10 with pad 1: 5x5 outputs
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4, group=2)
    f = count(_one(node, ["N", 16, 10, 10], (32, 8, 3, 3), None))
    assert f.total == 2 * (5 * 5) * 32 * 8 * 9 and not f.unknown


def test_conv_transpose():
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    f = count(_one(node, [1, 4, 3, 3], (4, 6, 2, 2), None))
    assert f.total == 2 * (4 * 3 * 3) * 6 * 4


def test_gemm_and_matmul_at_batch_one():
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    assert count(_one(gemm, ["N", 20], (7, 20), None)).total == 2 * 7 * 20
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    assert count(_one(mm, ["N", 5, 20], (20, 7), None)).total == 2 * 5 * 7 * 20


def test_unknown_shapes_are_listed():
    custom = helper.make_node("Mystery", ["x"], ["t"], domain="example.custom")
    mm = helper.make_node("MatMul", ["t", "w"], ["y"], name="after_custom")
    g = helper.make_graph([custom, mm], "g", [vi("x", TensorProto.FLOAT, [2, 3])],
                          [vi("y", TensorProto.FLOAT, [None, None])], [tensor("w", np.zeros((3, 4), np.float32))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("example.custom", 1)])
    f = count(m)
    assert f.total == 0 and f.unknown == ["after_custom"]
