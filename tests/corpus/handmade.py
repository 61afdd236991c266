"""The onnx.helper half of the corpus: graphs in the shapes other converters leave behind.

Each builder takes a seeded generator and returns a checked model; each has a calibration
generator beside it that makes valid inputs. Weights are scaled by 1/sqrt(fan-in) so the
activations stay in a sane range through the stack, as in a trained net.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .signals import features, images

F, F16, BF16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT64


def w(rng, *shape, fan_in=None, dtype=np.float32):
    fan_in = fan_in or int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)


def t(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def node(op, ins, outs, name="", **attrs):
    return helper.make_node(op, ins, outs, name=name, **attrs)


def model(nodes, inputs, outputs, inits, opset, ir, producer, domains=(), functions=()):
    graph = helper.make_graph(nodes, "main", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    m = helper.make_model(graph, opset_imports=opsets, ir_version=ir, producer_name=producer,
                          functions=list(functions))
    m.metadata_props.add(key="corpus.source", value=producer)
    onnx.checker.check_model(m, full_check=True)
    return m


# ----------------------------------------------------------------------------- Keras / tf2onnx

def keras_nhwc(rng):
    """Channels-last input, Transposes around the convs, Dense layers as MatMul + Add (tf2onnx, opset 13)."""
    inits = [t("conv2d/kernel", w(rng, 16, 3, 3, 3)), t("conv2d/bias", w(rng, 16, fan_in=4)),
             t("depthwise/kernel", w(rng, 16, 1, 3, 3)),
             t("conv2d_1/kernel", w(rng, 32, 16, 1, 1)), t("conv2d_1/bias", w(rng, 32, fan_in=4)),
             t("dense/kernel", w(rng, 32, 24, fan_in=32)), t("dense/bias", w(rng, 24, fan_in=4)),
             t("dense_1/kernel", w(rng, 24, 10, fan_in=24)), t("dense_1/bias", w(rng, 10, fan_in=4))]
    nodes = [node("Transpose", ["input_1"], ["conv2d__6:0"], "conv2d__6", perm=[0, 3, 1, 2]),
             node("Conv", ["conv2d__6:0", "conv2d/kernel", "conv2d/bias"], ["conv2d/BiasAdd:0"], "conv2d/BiasAdd",
                  pads=[1, 1, 1, 1]),
             node("Relu", ["conv2d/BiasAdd:0"], ["conv2d/Relu:0"], "conv2d/Relu"),
             node("Conv", ["conv2d/Relu:0", "depthwise/kernel"], ["depthwise/dw:0"], "depthwise/depthwise",
                  group=16, strides=[2, 2], auto_pad="SAME_UPPER"),
             node("Relu", ["depthwise/dw:0"], ["depthwise/Relu:0"], "depthwise/Relu"),
             node("Conv", ["depthwise/Relu:0", "conv2d_1/kernel", "conv2d_1/bias"], ["conv2d_1/BiasAdd:0"],
                  "conv2d_1/BiasAdd"),
             node("Relu", ["conv2d_1/BiasAdd:0"], ["conv2d_1/Relu:0"], "conv2d_1/Relu"),
             node("Transpose", ["conv2d_1/Relu:0"], ["conv2d_1/Relu__12:0"], "conv2d_1/Relu__12", perm=[0, 2, 3, 1]),
             node("ReduceMean", ["conv2d_1/Relu__12:0"], ["gap/Mean:0"], "gap/Mean", axes=[1, 2], keepdims=0),
             node("MatMul", ["gap/Mean:0", "dense/kernel"], ["dense/MatMul:0"], "dense/MatMul"),
             node("Add", ["dense/MatMul:0", "dense/bias"], ["dense/BiasAdd:0"], "dense/BiasAdd"),
             node("Relu", ["dense/BiasAdd:0"], ["dense/Relu:0"], "dense/Relu"),
             node("MatMul", ["dense/Relu:0", "dense_1/kernel"], ["dense_1/MatMul:0"], "dense_1/MatMul"),
             node("Add", ["dense_1/MatMul:0", "dense_1/bias"], ["dense_1/BiasAdd:0"], "dense_1/BiasAdd"),
             node("Softmax", ["dense_1/BiasAdd:0"], ["dense_1"], "dense_1/Softmax", axis=-1)]
    return model(nodes, [vi("input_1", F, ["unk__20", 16, 16, 3])], [vi("dense_1", F, ["unk__21", 10])],
                 inits, 13, 7, "tf2onnx")


def keras_calib(rng, n):
    return {"input_1": images(rng, n, 3, 16, channels_last=True)}


# ----------------------------------------------------------------------------- Paddle

def paddle_constants(rng):
    """Every weight in a Constant node with an empty node name and an empty tensor name (opset 11)."""
    def const(out, array):
        return node("Constant", [], [out], "", value=t("", array))

    nodes = [const("conv2d_0.w_0", w(rng, 16, 8, 3, 3)), const("conv2d_0.b_0", w(rng, 16, fan_in=4)),
             node("Conv", ["x", "conv2d_0.w_0", "conv2d_0.b_0"], ["conv2d_0.tmp_1"], "", pads=[1, 1, 1, 1]),
             node("Relu", ["conv2d_0.tmp_1"], ["relu_0.tmp_0"], ""),
             const("conv2d_1.w_0", w(rng, 32, 16, 3, 3)),
             node("Conv", ["relu_0.tmp_0", "conv2d_1.w_0"], ["conv2d_1.tmp_0"], "", strides=[2, 2], pads=[1, 1, 1, 1]),
             node("Relu", ["conv2d_1.tmp_0"], ["relu_1.tmp_0"], ""),
             node("GlobalAveragePool", ["relu_1.tmp_0"], ["pool2d_0.tmp_0"], ""),
             node("Flatten", ["pool2d_0.tmp_0"], ["flatten_0.tmp_0"], "", axis=1),
             const("linear_0.w_0", w(rng, 32, 24, fan_in=32)), const("linear_0.b_0", w(rng, 24, fan_in=4)),
             node("MatMul", ["flatten_0.tmp_0", "linear_0.w_0"], ["linear_0.tmp_0"], ""),
             node("Add", ["linear_0.tmp_0", "linear_0.b_0"], ["linear_0.tmp_1"], ""),
             node("Relu", ["linear_0.tmp_1"], ["relu_2.tmp_0"], ""),
             const("linear_1.w_0", w(rng, 6, 24)), const("linear_1.b_0", w(rng, 6, fan_in=4)),
             node("Gemm", ["relu_2.tmp_0", "linear_1.w_0", "linear_1.b_0"], ["linear_1.tmp_1"], "", transB=1),
             node("Softmax", ["linear_1.tmp_1"], ["save_infer_model/scale_0.tmp_0"], "", axis=1)]
    return model(nodes, [vi("x", F, [-1, 8, 10, 10])], [vi("save_infer_model/scale_0.tmp_0", F, [-1, 6])],
                 [], 11, 6, "PaddlePaddle")


def paddle_calib(rng, n):
    return {"x": features(rng, n, 8, 10)}


# ----------------------------------------------------------------------------- If with outer weights

IF_BLOCK = 64  # the default --batch-size: each batch takes one branch, so blocks alternate


def if_outer(rng, opset=11):
    """Both If branches read weights from the outer scope; one weight is used by both."""
    inits = [t("W0", w(rng, 24, 12)), t("b0", w(rng, 24, fan_in=4)),
             t("W_then", w(rng, 24, 24, fan_in=24)),
             t("W_else", w(rng, 24, 24)), t("b_else", w(rng, 24, fan_in=4)),
             t("W_out", w(rng, 24, 6, fan_in=24)), t("b_out", w(rng, 6, fan_in=4)), t("zero", np.float32(0))]
    then_g = helper.make_graph(
        [node("MatMul", ["h", "W_then"], ["t1"], "then/MatMul"), node("Relu", ["t1"], ["t2"], "then/Relu"),
         node("Gemm", ["t2", "W_out", "b_out"], ["y_then"], "then/out")], "then", [], [vi("y_then", F, None)])
    else_g = helper.make_graph(
        [node("Gemm", ["h", "W_else", "b_else"], ["e1"], "else/Gemm", transB=1),
         node("Tanh", ["e1"], ["e2"], "else/Tanh"),
         node("Gemm", ["e2", "W_out", "b_out"], ["y_else"], "else/out")], "else", [], [vi("y_else", F, None)])
    nodes = [node("Gemm", ["x", "W0", "b0"], ["g"], "in", transB=1), node("Relu", ["g"], ["h"], "in/Relu"),
             node("ReduceMean", ["x"], ["m"], "mean", keepdims=0), node("Greater", ["m", "zero"], ["c"], "positive"),
             node("If", ["c"], ["y"], "branch", then_branch=then_g, else_branch=else_g)]
    inputs = [vi("x", F, ["N", 12])]
    if opset < 9:  # IR 3: every initializer is also a graph input (a default the caller could override)
        inputs += [vi(i.name, i.data_type, list(i.dims)) for i in inits]
    return model(nodes, inputs, [vi("y", F, ["N", 6])], inits, opset, 3 if opset < 9 else 6,
                 f"onnx.helper (opset {opset})")


def if_calib(rng, n):
    """Blocks of IF_BLOCK samples with a positive, then a negative mean: both branches get batches."""
    sign = np.where((np.arange(n) // IF_BLOCK) % 2 == 0, 1.0, -1.0)[:, None]
    return {"x": (rng.standard_normal((n, 12)) + 0.5 * sign).astype(np.float32)}


# ----------------------------------------------------------------------------- opset 7

def opset7(rng):
    """An old converter's graph (opset 7, IR 3): initializers listed as graph inputs, BatchNormalization
    left unfused after the Conv, MaxPool, Flatten, Gemm with its bias required."""
    inits = [t("conv1.W", w(rng, 16, 4, 3, 3)), t("conv1.b", w(rng, 16, fan_in=4)),
             t("bn.scale", rng.uniform(0.5, 1.5, 16).astype(np.float32)), t("bn.B", w(rng, 16, fan_in=9)),
             t("bn.mean", w(rng, 16, fan_in=25)), t("bn.var", rng.uniform(0.5, 2, 16).astype(np.float32)),
             t("conv2.W", w(rng, 32, 16, 3, 3)), t("conv2.b", w(rng, 32, fan_in=4)),
             t("fc.W", w(rng, 10, 32 * 4 * 4)), t("fc.b", w(rng, 10, fan_in=4))]
    nodes = [node("Conv", ["data", "conv1.W", "conv1.b"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             node("BatchNormalization", ["c1", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["b1"], "bn1"),
             node("Relu", ["b1"], ["r1"], "relu1"),
             node("MaxPool", ["r1"], ["p1"], "pool1", kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p1", "conv2.W", "conv2.b"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
             node("Relu", ["c2"], ["r2"], "relu2"),
             node("MaxPool", ["r2"], ["p2"], "pool2", kernel_shape=[2, 2], strides=[2, 2]),
             node("Flatten", ["p2"], ["f"], "flatten"),
             node("Gemm", ["f", "fc.W", "fc.b"], ["prob"], "fc", transB=1)]
    inputs = [vi("data", F, ["N", 4, 16, 16])] + [vi(i.name, i.data_type, list(i.dims)) for i in inits]
    return model(nodes, inputs, [vi("prob", F, ["N", 10])], inits, 7, 3, "onnx.helper (opset 7)")


def opset7_calib(rng, n):
    return {"data": images(rng, n, 4, 16)}


# ----------------------------------------------------------------------------- quantized

def quantized(rng):
    """A QLinearConv and a MatMul on DequantizeLinear weights beside a float Gemm head (opset 13)."""
    wq = rng.integers(0, 255, (16, 8, 3, 3)).astype(np.uint8)
    w8 = rng.integers(-127, 128, (16, 32)).astype(np.int8)
    inits = [t("x_scale", np.float32(0.05)), t("x_zp", np.uint8(128)), t("w_q", wq), t("w_scale", np.float32(0.01)),
             t("w_zp", np.uint8(128)), t("y_scale", np.float32(0.1)), t("y_zp", np.uint8(128)),
             t("conv_bias", rng.integers(-200, 200, 16).astype(np.int32)),
             t("fc_w_q", w8), t("fc_w_scale", np.full(32, 0.02, np.float32)), t("fc_w_zp", np.zeros(32, np.int8)),
             t("fc_b", w(rng, 32, fan_in=4)), t("head_w", w(rng, 8, 32)), t("head_b", w(rng, 8, fan_in=4))]
    nodes = [node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], "quant"),
             node("QLinearConv", ["xq", "x_scale", "x_zp", "w_q", "w_scale", "w_zp", "y_scale", "y_zp", "conv_bias"],
                  ["cq"], "qconv", pads=[1, 1, 1, 1]),
             node("DequantizeLinear", ["cq", "y_scale", "y_zp"], ["c"], "dequant"),
             node("Relu", ["c"], ["r"], "relu"),
             node("GlobalAveragePool", ["r"], ["p"], "pool"), node("Flatten", ["p"], ["f"], "flatten"),
             node("DequantizeLinear", ["fc_w_q", "fc_w_scale", "fc_w_zp"], ["fc_w"], "fc_w_dq", axis=1),
             node("MatMul", ["f", "fc_w"], ["fm"], "fc"), node("Add", ["fm", "fc_b"], ["fa"], "fc/bias"),
             node("Relu", ["fa"], ["fr"], "fc/relu"),
             node("Gemm", ["fr", "head_w", "head_b"], ["y"], "head", transB=1)]
    return model(nodes, [vi("x", F, ["N", 8, 8, 8])], [vi("y", F, ["N", 8])], inits, 13, 7,
                 "onnxruntime.quantization style (QOperator conv, QDQ fc)")


def quantized_calib(rng, n):
    return {"x": np.clip(4 * features(rng, n, 8, 8) - 2, -6, 6)}


# ----------------------------------------------------------------------------- streaming, no batch axis

STATE = (2, 1, 128)


def streaming(rng):
    """One audio frame per call with a recurrent state [2, 1, 128] and a scalar sample rate (opset 16).

    No input has a batch axis: calibration data holds one sample per arr[i].
    """
    h = STATE[2]
    inits = [t("sr_ref", np.float32(16000)), t("idx0", np.int64(0)), t("idx1", np.int64(1)), t("axis0", np.array([0])),
             t("enc.W", w(rng, 64, h, fan_in=64)), t("enc.b", w(rng, h, fan_in=4)),
             t("cell0.Wx", w(rng, h, h)), t("cell0.b", w(rng, h, fan_in=4)), t("cell0.Wh", w(rng, h, h, fan_in=h)),
             t("cell1.Wx", w(rng, h, h)), t("cell1.b", w(rng, h, fan_in=4)), t("cell1.Wh", w(rng, h, h, fan_in=h)),
             t("out.W", w(rng, 1, h)), t("out.b", np.zeros(1, np.float32))]
    nodes = [node("Cast", ["sr"], ["srf"], "sr/cast", to=F), node("Div", ["srf", "sr_ref"], ["scale"], "sr/scale"),
             node("Mul", ["input", "scale"], ["xs"], "sr/apply"),
             node("MatMul", ["xs", "enc.W"], ["e0"], "enc/MatMul"), node("Add", ["e0", "enc.b"], ["e1"], "enc/Add"),
             node("Relu", ["e1"], ["e"], "enc/Relu"),
             node("Gather", ["state", "idx0"], ["h0"], "state/h0"),
             node("Gather", ["state", "idx1"], ["h1"], "state/h1")]
    x = "e"
    for k, hk in enumerate(("h0", "h1")):
        nodes += [node("Gemm", [x, f"cell{k}.Wx", f"cell{k}.b"], [f"c{k}x"], f"cell{k}/x", transB=1),
                  node("MatMul", [hk, f"cell{k}.Wh"], [f"c{k}h"], f"cell{k}/h"),
                  node("Add", [f"c{k}x", f"c{k}h"], [f"c{k}s"], f"cell{k}/add"),
                  node("Tanh", [f"c{k}s"], [f"n{k}"], f"cell{k}/tanh"),
                  node("Unsqueeze", [f"n{k}", "axis0"], [f"u{k}"], f"cell{k}/unsqueeze")]
        x = f"n{k}"
    nodes += [node("Concat", ["u0", "u1"], ["stateN"], "state/out", axis=0),
              node("Gemm", ["n1", "out.W", "out.b"], ["logit"], "out", transB=1),
              node("Sigmoid", ["logit"], ["output"], "out/sigmoid")]
    return model(nodes, [vi("input", F, [1, 64]), vi("state", F, list(STATE)), vi("sr", I64, [])],
                 [vi("output", F, [1, 1]), vi("stateN", F, list(STATE))], inits, 16, 8, "onnx.helper (streaming)")


def streaming_calib(rng, n, path, streams=8):
    """Per-sample layout (one axis more than each input, arr[i] is one call's feed).

    The states are the ones the model reaches: a few synthetic audio streams (tones and noise)
    are run through it frame by frame from a zero state, and every call's feed is recorded.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    frames, states, rates = [], [], []
    per = -(-n // streams)
    for _ in range(streams):
        sr = int(rng.choice([8000, 16000]))
        t = np.arange((per + 1) * 64) / sr
        tones = np.sin(2 * np.pi * rng.uniform(100, 1000, (3, 1)) * t).sum(0)
        signal = (tones + 0.3 * rng.standard_normal(t.size)).astype(np.float32)
        state = np.zeros(STATE, np.float32)
        for k in range(per):
            frame = signal[k * 64:(k + 1) * 64][None]
            frames.append(frame)
            states.append(state)
            rates.append(sr)
            _, state = sess.run(None, {"input": frame, "state": state, "sr": np.array(sr, np.int64)})
    return {"input": np.stack(frames)[:n], "state": np.stack(states)[:n], "sr": np.array(rates[:n], np.int64)}


# ----------------------------------------------------------------------------- newest opset, mixed storage

def newest_opset(rng):
    """Opset 26 / IR 13: two inputs, two outputs, a model-local function, fp16 and bf16 weights cast
    up for compute, a grouped dilated Conv1d, Gemm with transB, alpha and beta, MatMul + Add."""
    import ml_dtypes

    swish = helper.make_function("corpus.local", "Swish", ["X"], ["Y"],
                                 [node("Sigmoid", ["X"], ["S"]), node("Mul", ["X", "S"], ["Y"])],
                                 [helper.make_opsetid("", 26)])
    inits = [t("conv0.w16", w(rng, 16, 2, 5, dtype=np.float16)), t("conv0.b", w(rng, 16, fan_in=4)),
             t("conv1.wbf16", w(rng, 16, 16, 3).astype(ml_dtypes.bfloat16)),
             t("axes", np.array([2], np.int64)),
             t("dense.W", w(rng, 32, 24)), t("dense.b", w(rng, 32, fan_in=4)),
             t("mix.W", w(rng, 48, 16, fan_in=48)), t("mix.b", w(rng, 16, fan_in=4)),
             t("head.W", w(rng, 16, 4, fan_in=16)), t("head.b", w(rng, 4, fan_in=4))]
    nodes = [node("Cast", ["conv0.w16"], ["conv0.w"], "conv0/cast", to=F),
             node("Conv", ["signal", "conv0.w", "conv0.b"], ["s0"], "conv0", group=4, strides=[2], pads=[2, 2]),
             node("Relu", ["s0"], ["s1"], "conv0/relu"),
             node("Cast", ["conv1.wbf16"], ["conv1.w"], "conv1/cast", to=F),
             node("Conv", ["s1", "conv1.w"], ["s2"], "conv1", dilations=[2], pads=[2, 2]),
             node("Swish", ["s2"], ["s3"], "conv1/swish", domain="corpus.local"),
             node("ReduceMean", ["s3", "axes"], ["s4"], "pool", keepdims=0),
             node("Gemm", ["features", "dense.W", "dense.b"], ["d0"], "dense", transB=1, alpha=0.5, beta=2.0),
             node("Relu", ["d0"], ["d1"], "dense/relu"),
             node("Concat", ["s4", "d1"], ["c"], "concat", axis=1),
             node("MatMul", ["c", "mix.W"], ["m0"], "mix"), node("Add", ["m0", "mix.b"], ["embedding"], "mix/bias"),
             node("Relu", ["embedding"], ["m1"], "mix/relu"),
             node("Gemm", ["m1", "head.W", "head.b"], ["logits"], "head")]
    return model(nodes, [vi("signal", F, ["N", 8, 32]), vi("features", F, ["N", 24])],
                 [vi("logits", F, ["N", 4]), vi("embedding", F, ["N", 16])], inits, 26, 13,
                 "onnx.helper (newest opset)", domains=("corpus.local",), functions=[swish])


def newest_calib(rng, n):
    signal = features(rng, n, 8, 32)[:, :, 0, :]  # smooth along time, correlated across channels
    mix = rng.standard_normal((24, 6)) / np.sqrt(6)
    return {"signal": signal, "features": (rng.standard_normal((n, 6)) @ mix.T).astype(np.float32)}


# ----------------------------------------------------------------------------- over 2 GB, external data

def large_vocab(dim=64) -> int:
    return 2_000_000_000 // (4 * dim) + 50_000


def large_calib(rng, n):
    return {"ids": rng.integers(0, large_vocab(), n).astype(np.int64)}


def large_external(rng, path: str, dim=64):
    """A 2.06 GB embedding table (not a layer) before two prunable layers, saved with external data
    (as tests/test_large.py builds its model). The rows cycle through 97 random directions, so the
    projection sees a full-rank input."""
    vocab = large_vocab(dim)
    base = rng.standard_normal((97, dim)).astype(np.float32)
    table = np.empty((vocab, dim), np.float32)
    for i in range(0, vocab, 97 * 4096):
        j = min(vocab, i + 97 * 4096)
        table[i:j] = np.tile(base, (-(-(j - i) // 97), 1))[:j - i]
    table *= (1 + np.arange(vocab, dtype=np.float32) % 89 / 89.0)[:, None]
    inits = [numpy_helper.from_array(table, "embedding.table"), t("proj.W", w(rng, dim, 32, fan_in=dim)),
             t("head.W", w(rng, 8, 32)), t("head.b", w(rng, 8, fan_in=4))]
    del table
    nodes = [node("Gather", ["embedding.table", "ids"], ["e"], "embed"), node("MatMul", ["e", "proj.W"], ["p"], "proj"),
             node("Relu", ["p"], ["r"], "proj/relu"), node("Gemm", ["r", "head.W", "head.b"], ["y"], "head", transB=1)]
    graph = helper.make_graph(nodes, "big", [vi("ids", I64, ["N"])], [vi("y", F, ["N", 8])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                          producer_name="onnx.helper (external data)")
    m.metadata_props.add(key="corpus.source", value="onnx.helper (external data)")
    onnx.save_model(m, path, save_as_external_data=True, location=path.rsplit("/", 1)[-1] + ".data")
