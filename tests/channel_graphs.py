"""Small graphs made of the channel patterns structured pruning must understand, block by block,
for the group finder's and the shrink rule's tests (and their hypothesis-generated mixtures)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SPATIAL = 6


class Graph:
    """NCHW graph built block by block; every block keeps the channel count it is given."""

    def __init__(self, seed: int = 0, channels: int = 8, opset: int = 13):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k, self.opset = [], [], 0, opset
        self.extra_outputs: list[str] = []
        self.layers: list[str] = []  # every Conv, Gemm and MatMul, in the order built
        self.x, self.c = self.conv("x", 3, channels, 3), channels

    def name(self, op: str) -> str:
        self.k += 1
        return f"{op.lower()}{self.k}"

    def const(self, a, dtype=np.float32) -> str:
        n = self.name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(a, dtype), n))
        return n

    def op(self, op: str, inputs, **attrs) -> str:
        n = self.name(op)
        self.nodes.append(helper.make_node(op, list(inputs), [n], name=n, **attrs))
        if op in ("Conv", "Gemm", "MatMul"):
            self.layers.append(n)
        return n

    def conv(self, x, cin, cout, k, group=1, bias=True, gain=1.0) -> str:
        w = self.rng.standard_normal((cout, cin // group, k, k)) * gain / np.sqrt(cin // group * k * k)
        inputs = [x, self.const(w)] + ([self.const(0.1 * self.rng.standard_normal(cout))] if bias else [])
        return self.op("Conv", inputs, pads=[k // 2] * 4, group=group)

    def per_channel(self, shape=None) -> str:
        return self.const(self.rng.uniform(0.5, 1.5, shape or (1, self.c, 1, 1)))

    # ------------------------------------------------------------------ blocks (x -> x, same channels)

    def conv_bn_act(self, act="relu"):
        y = self.conv(self.x, self.c, self.c, 3, bias=False)
        c = self.c
        y = self.op("BatchNormalization", [y, self.const(self.rng.uniform(.5, 1.5, c)),
                                           self.const(self.rng.standard_normal(c)),
                                           self.const(0.1 * self.rng.standard_normal(c)),
                                           self.const(self.rng.uniform(.5, 1.5, c))])
        self.x = self.act(y, act)

    def act(self, y, kind):
        if kind == "relu":
            return self.op("Relu", [y])
        if kind == "prelu":
            return self.op("PRelu", [y, self.const(self.rng.uniform(0, .3, (self.c, 1, 1)))])
        if kind == "clip":
            return self.op("Clip", [y, self.const(0.0), self.const(6.0)])
        if kind == "gelu":  # the decomposed form exporters write: x * 0.5 * (1 + erf(x / sqrt 2))
            e = self.op("Erf", [self.op("Div", [y, self.const(np.sqrt(2.0))])])
            return self.op("Mul", [self.op("Mul", [y, self.op("Add", [e, self.const(1.0)])]), self.const(0.5)])
        if kind == "hardswish":  # x * clip(x + 3, 0, 6) / 6
            g = self.op("Clip", [self.op("Add", [y, self.const(3.0)]), self.const(0.0), self.const(6.0)])
            return self.op("Div", [self.op("Mul", [y, g]), self.const(6.0)])
        raise ValueError(kind)

    def residual(self):
        y = self.op("Relu", [self.conv(self.x, self.c, self.c, 3)])
        y = self.conv(y, self.c, self.c, 3, gain=0.5)
        self.x = self.op("Relu", [self.op("Add", [self.x, y])])

    def inverted(self, expand=2):
        h = self.c * expand
        y = self.op("Relu", [self.conv(self.x, self.c, h, 1)])
        y = self.op("Relu", [self.conv(y, h, h, 3, group=h)])
        self.x = self.op("Add", [self.x, self.conv(y, h, self.c, 1, gain=0.5)])

    def squeeze_excite(self, r=2):
        s = self.op("GlobalAveragePool", [self.x])
        s = self.op("Relu", [self.conv(s, self.c, max(1, self.c // r), 1)])
        gate = self.op("Sigmoid", [self.conv(s, max(1, self.c // r), self.c, 1)])
        self.x = self.op("Mul", [self.x, gate])

    def nhwc(self):
        t = self.op("Transpose", [self.x], perm=[0, 2, 3, 1])
        t = self.op("Add", [self.op("Mul", [t, self.per_channel((self.c,))]), self.per_channel((self.c,))])
        self.x = self.op("Transpose", [t], perm=[0, 3, 1, 2])

    def scale(self):
        self.x = self.op("Sub", [self.op("Mul", [self.x, self.per_channel()]), self.per_channel()])

    def pool(self):
        self.x = self.op("MaxPool", [self.x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    def concat(self):
        """Two convs joined along the channel axis: two groups meet in one tensor."""
        a = self.conv(self.x, self.c, self.c // 2, 1)
        b = self.conv(self.x, self.c, self.c - self.c // 2, 1)
        self.x = self.op("Concat", [a, b], axis=1)

    def c2f(self):
        """YOLO's C2f: a conv split in two parts, one through a conv, all three joined, then mixed."""
        c, half = self.c, self.c // 2
        y = self.op("Relu", [self.conv(self.x, c, c, 1)])
        n = self.name("split")
        self.nodes.append(helper.make_node("Split", [y, self.const([half, c - half], np.int64)],
                                           [n + "a", n + "b"], name=n, axis=1))
        z = self.op("Relu", [self.conv(n + "b", c - half, c - half, 3)])
        cat = self.op("Concat", [n + "a", n + "b", z], axis=1)
        self.x = self.conv(cat, c + (c - half), c, 1)

    def slices(self):
        """The channel axis sliced in two halves, one kept, one through a conv, joined again."""
        c, half = self.c, self.c // 2
        a = self.op("Slice", [self.x, self.const([0], np.int64), self.const([half], np.int64),
                              self.const([1], np.int64)])
        b = self.op("Slice", [self.x, self.const([half], np.int64), self.const([2 ** 62], np.int64),
                              self.const([1], np.int64)])
        self.x = self.op("Concat", [self.op("Relu", [a]), self.conv(b, c - half, c - half, 3)], axis=1)

    def attention(self, heads=2, scaled_q=False, mask=False):
        """A transformer block on the feature map's positions (MobileViT-style): the tokens
        [N, HW, C] through multi-head attention as exporters write it, back to NCHW, residual."""
        c, d = self.c, self.c // heads
        t = self.op("Transpose", [self.op("Reshape", [self.x, self.const([0, c, -1], np.int64)])], perm=[0, 2, 1])

        def proj(x, cin, cout):
            w = self.rng.standard_normal((cin, cout)) / np.sqrt(cin)
            return self.op("Add", [self.op("MatMul", [x, self.const(w)]), self.const(0.1 * self.rng.standard_normal(cout))])

        def split_heads(x, perm):
            return self.op("Transpose", [self.op("Reshape", [x, self.const([0, 0, heads, d], np.int64)])], perm=perm)

        q = proj(t, c, c)
        if scaled_q:
            q = self.op("Mul", [q, self.const(1 / np.sqrt(d))])
        q, k, v = split_heads(q, [0, 2, 1, 3]), split_heads(proj(t, c, c), [0, 2, 3, 1]), \
            split_heads(proj(t, c, c), [0, 2, 1, 3])
        s = self.op("MatMul", [q, k])
        s = s if scaled_q else self.op("Div", [s, self.const(np.sqrt(d))])
        if mask:
            s = self.op("Add", [s, self.const(np.where(self.rng.random((1, 1, 1, SPATIAL ** 2)) < .2, -1e4, 0.0))])
        ctx = self.op("MatMul", [self.op("Softmax", [s], axis=-1), v])
        ctx = self.op("Reshape", [self.op("Transpose", [ctx], perm=[0, 2, 1, 3]), self.const([0, 0, c], np.int64)])
        o = self.op("Transpose", [proj(ctx, c, c)], perm=[0, 2, 1])
        self.x = self.op("Add", [self.x, self.op("Reshape", [o, self.const([0, c, SPATIAL, SPATIAL], np.int64)])])

    def attention_masked(self):
        self.attention(scaled_q=True, mask=True)

    def lrn(self):
        """Blocked: local response normalisation mixes neighbouring channels."""
        self.x = self.op("LRN", [self.x], size=3)

    def channel_softmax(self):
        """Blocked: a normalisation over the channel axis."""
        self.x = self.op("Softmax", [self.x], axis=1)

    def tap(self):
        """Blocked: the channels also leave as a graph output."""
        self.extra_outputs.append(self.x)
        self.x = self.op("Relu", [self.x])

    # ------------------------------------------------------------------ heads

    def gap_head(self, hidden=12, classes=5):
        f = self.op("Flatten", [self.op("GlobalAveragePool", [self.x])], axis=1)
        return self.dense_head(f, self.c, hidden, classes)

    def flatten_head(self, hidden=12, classes=5):
        f = self.op("Flatten", [self.op("MaxPool", [self.x], kernel_shape=[2, 2], strides=[2, 2])], axis=1)
        return self.dense_head(f, self.c * (SPATIAL // 2) ** 2, hidden, classes)

    def reshape_head(self, hidden=12, classes=5):
        f = self.op("Reshape", [self.x, self.const([-1, self.c * SPATIAL ** 2], np.int64)])
        return self.dense_head(f, self.c * SPATIAL ** 2, hidden, classes)

    def dense_head(self, f, cols, hidden, classes):
        w = self.rng.standard_normal((hidden, cols)) / np.sqrt(cols)
        h = self.op("Relu", [self.op("Gemm", [f, self.const(w), self.const(np.zeros(hidden))], transB=1)])
        w2 = self.rng.standard_normal((hidden, classes)) / np.sqrt(hidden)
        out = self.op("Add", [self.op("MatMul", [h, self.const(w2)]), self.const(np.zeros(classes))])
        return self.model(out, classes)

    def model(self, out: str, classes: int) -> onnx.ModelProto:
        outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])]
        outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", None, None, None])
                    for o in self.extra_outputs]
        g = helper.make_graph(self.nodes, "channels",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SPATIAL, SPATIAL])],
                              outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=8)
        onnx.checker.check_model(m, full_check=True)
        return m


BLOCKS = ("conv_bn_act", "residual", "inverted", "squeeze_excite", "nhwc", "scale", "pool", "concat", "c2f",
          "slices", "attention", "attention_masked")
BLOCKING = ("lrn", "channel_softmax", "tap")
HEADS = ("gap_head", "flatten_head", "reshape_head")
ACTS = ("relu", "prelu", "clip", "gelu", "hardswish")


def build(blocks, head="gap_head", seed=0, channels=8, acts=()) -> onnx.ModelProto:
    return built(blocks, head, seed, channels, acts)[0]


def built(blocks, head="gap_head", seed=0, channels=8, acts=()) -> tuple[onnx.ModelProto, list[str]]:
    """The model and the names of its layers in the order built."""
    g = Graph(seed, channels)
    acts = list(acts)
    for b in blocks:
        if b == "conv_bn_act":
            g.conv_bn_act(acts.pop(0) if acts else "relu")
        else:
            getattr(g, b)()
    return getattr(g, head)(), g.layers


def mlp(seed=0, sizes=(10, 16, 12, 4)) -> onnx.ModelProto:  # layers: matmul1, 4, 7 ...
    """MatMul + Add layers with Relu between: hidden neurons are the groups."""
    rng = np.random.default_rng(seed)
    g = Graph.__new__(Graph)
    g.rng, g.nodes, g.inits, g.k, g.opset, g.extra_outputs, g.layers = rng, [], [], 0, 13, [], []
    x = "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        x = g.op("Add", [g.op("MatMul", [x, g.const(rng.standard_normal((a, b)) / np.sqrt(a))]),
                         g.const(0.1 * rng.standard_normal(b))])
        if i < len(sizes) - 2:
            x = g.op("Relu", [x])
    out = helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", sizes[-1]])
    graph = helper.make_graph(g.nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [out], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def encoder(seed=0, layers=2, hidden=16, heads=4, ffn=32, seq=6, norm="post", shapes="constant") -> onnx.ModelProto:
    """A BERT/MiniLM-shaped encoder on embeddings x [N, seq, hidden]: blocks of multi-head
    attention (q/k/v, Reshape into heads, Transpose, MatMul, Softmax, MatMul, output projection)
    and an FFN with the exporters' decomposed Gelu, LayerNorm after (post) or before (pre) each.
    shapes "computed": the Reshape targets built at run time as torch's legacy exporter writes
    them, [batch, seq, heads, hidden // heads] and [batch, seq, hidden] from Shape(x)."""
    g = Graph.__new__(Graph)
    g.rng, g.nodes, g.inits, g.k, g.opset, g.extra_outputs, g.layers = np.random.default_rng(seed), [], [], 0, 17, [], []

    def linear(x, a, b):
        w = g.rng.standard_normal((a, b)) / np.sqrt(a)
        return g.op("Add", [g.op("MatMul", [x, g.const(w)]), g.const(0.02 * g.rng.standard_normal(b))])

    def ln(x):
        return g.op("LayerNormalization", [x, g.const(np.ones(hidden)), g.const(np.zeros(hidden))], axis=-1)

    def size(x, axis):  # Shape(x)[axis] as a 1-element tensor
        picked = g.op("Gather", [g.op("Shape", [x]), g.const(axis, np.int64)], axis=0)
        return picked, g.op("Unsqueeze", [picked, g.const([0], np.int64)])

    def targets(x):
        if shapes == "constant":
            return g.const([0, 0, heads, d], np.int64), g.const([0, 0, hidden], np.int64)
        (_, b), (_, s), (c, c1) = size(x, 0), size(x, 1), size(x, 2)
        dh = g.op("Unsqueeze", [g.op("Div", [c, g.const(heads, np.int64)]), g.const([0], np.int64)])
        split = g.op("Concat", [b, s, g.const([heads], np.int64), dh], axis=0)
        return split, g.op("Concat", [b, s, c1], axis=0)

    d = hidden // heads

    def attention(x):
        split, merge = targets(x)
        q, k, v = (g.op("Transpose", [g.op("Reshape", [linear(x, hidden, hidden), split])], perm=p)
                   for p in ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]))
        att = g.op("Softmax", [g.op("Div", [g.op("MatMul", [q, k]), g.const(np.sqrt(d))])], axis=-1)
        ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3]), merge])
        return linear(ctx, hidden, hidden)

    def ffn_(x):
        h = linear(x, hidden, ffn)
        return linear(g.act(h, "gelu"), ffn, hidden)

    x = "x"
    for _ in range(layers):
        for block in (attention, ffn_):
            x = ln(g.op("Add", [x, block(x)])) if norm == "post" else g.op("Add", [x, block(ln(x))])
    graph = helper.make_graph(g.nodes, "encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["N", seq, hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", seq, hidden])], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feed(model: onnx.ModelProto, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = model.graph.input[0]
    shape = [n] + [d.dim_value for d in x.type.tensor_type.shape.dim[1:]]
    return {"x": rng.standard_normal(shape).astype(np.float32)}
