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


def small_unet(rng, channels=8) -> onnx.ModelProto:
    """Conv (stride 2) -> Relu -> ConvTranspose (stride 2, bias) -> Concat with the input's skip
    path -> grouped ConvTranspose (stride 1, pads) -> Relu -> Conv 1x1: a UNet-style decoder."""
    c = channels

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = [tensor("We", w(c, 3, 3, 3)), tensor("be", rng.standard_normal(c).astype(np.float32) * 0.1),
             tensor("Wu", w(c, c, 2, 2)), tensor("bu", rng.standard_normal(c).astype(np.float32) * 0.1),
             tensor("Wr", w(2 * c, c // 2, 3, 3)),
             tensor("Ws", w(c, 3, 1, 1)),
             tensor("Wo", w(2, c, 1, 1)), tensor("bo", np.zeros(2, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "We", "be"], ["e"], name="enc", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["e"], ["er"]),
             helper.make_node("ConvTranspose", ["er", "Wu", "bu"], ["u"], name="up", strides=[2, 2]),
             helper.make_node("Conv", ["x", "Ws"], ["skip"], name="skip"),
             helper.make_node("Concat", ["u", "skip"], ["cat"], axis=1),
             helper.make_node("ConvTranspose", ["cat", "Wr"], ["r"], name="refine", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["r"], ["rr"]),
             helper.make_node("Conv", ["rr", "Wo", "bo"], ["y"], name="head")]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                      [vi("y", TensorProto.FLOAT, ["N", 2, 8, 8])], inits)


def streaming_model(rng, x_batch="N") -> onnx.ModelProto:
    """A streaming/recurrent-style model whose inputs are not all batched on axis 0: audio
    x [N, 16], a state [2, 1, 8] (axis 0 is the layer count, not a batch) and an int64 scalar
    sample rate. y = (x @ W1 + sum_0(state @ Ws)) * (sr / 16000) @ W2, new state out."""
    inits = [tensor("W1", rng.standard_normal((16, 8)).astype(np.float32)),
             tensor("Ws", rng.standard_normal((8, 8)).astype(np.float32)),
             tensor("W2", rng.standard_normal((8, 4)).astype(np.float32)),
             tensor("axis0", np.array([0], np.int64)), tensor("ref_rate", np.array(16000.0, np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="in_proj"),
             helper.make_node("MatMul", ["state", "Ws"], ["s"], name="state_proj"),
             helper.make_node("ReduceSum", ["s", "axis0"], ["s_sum"], keepdims=0),
             helper.make_node("Add", ["h", "s_sum"], ["hs"]),
             helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["sr_f", "ref_rate"], ["scale"]),
             helper.make_node("Mul", ["hs", "scale"], ["hm"]),
             helper.make_node("Relu", ["hm"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="out_proj"),
             helper.make_node("Tanh", ["s"], ["state_out"])]
    return make_model(nodes, [vi("state", TensorProto.FLOAT, [2, 1, 8]), vi("x", TensorProto.FLOAT, [x_batch, 16]),
                              vi("sr", TensorProto.INT64, [])],
                      [vi("y", TensorProto.FLOAT, [x_batch, 4]), vi("state_out", TensorProto.FLOAT, [2, 1, 8])], inits)
