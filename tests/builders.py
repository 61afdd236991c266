"""Small ONNX models built in code for the tests (no downloads, no bundled files needed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR = 8  # onnxruntime releases lag onnx's newest IR version


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, ir=IR) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    onnx.checker.check_model(model)
    return model


def tensor(name, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def vi(name, elem=TensorProto.FLOAT, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def single_layer(op: str, weight: np.ndarray, x_shape, bias=None, attrs=None, dtype=np.float32,
                 in_name="x", out_name="y", opset=OPSET) -> onnx.ModelProto:
    """x -> op(x, W[, b]) -> y, with a dynamic first axis."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [tensor("W", weight.astype(dtype))]
    inputs = [in_name, "W"]
    if bias is not None:
        inits.append(tensor("B", bias.astype(dtype)))
        inputs.append("B")
    node = helper.make_node(op, inputs, [out_name], name=f"{op.lower()}0", **(attrs or {}))
    out_shape = ["N"] + [f"d{i}" for i in range(1, len(x_shape))]
    return make_model([node], [vi(in_name, elem, ["N"] + list(x_shape[1:]))], [vi(out_name, elem, out_shape)],
                      inits, opset=opset)


def mlp(rng, sizes=(12, 16, 8, 4), dtype=np.float32) -> onnx.ModelProto:
    """Gemm (transB=1, bias) -> Relu -> MatMul -> Relu -> Gemm (transB=0): every dense form."""
    a, b, c, d = sizes
    inits = [tensor("W1", rng.standard_normal((b, a)).astype(dtype)), tensor("b1", rng.standard_normal(b).astype(dtype)),
             tensor("W2", rng.standard_normal((b, c)).astype(dtype)),
             tensor("W3", rng.standard_normal((c, d)).astype(dtype)), tensor("b3", rng.standard_normal(d).astype(dtype))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], name="fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "W3", "b3"], ["y"], name="fc3", alpha=0.5, beta=2.0)]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make_model(nodes, [vi("x", elem, ["N", a])], [vi("y", elem, ["N", d])], inits)


def small_cnn(rng) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> depthwise Conv -> Flatten -> Gemm: a chain like LeNet-5."""
    inits = [tensor("Wc1", rng.standard_normal((6, 2, 3, 3)).astype(np.float32)),
             tensor("bc1", rng.standard_normal(6).astype(np.float32)),
             tensor("Wc2", rng.standard_normal((6, 1, 3, 3)).astype(np.float32)),
             tensor("Wf", rng.standard_normal((5, 6 * 2 * 2)).astype(np.float32)),
             tensor("bf", rng.standard_normal(5).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "Wc1", "bc1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "Wc2"], ["c2"], name="dwconv", group=6, strides=[2, 2],
                              auto_pad="SAME_UPPER"),
             helper.make_node("Flatten", ["c2"], ["f"]),
             helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 2, 8, 8])], [vi("y", TensorProto.FLOAT, ["N", 5])],
                      inits)


def save_npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)
