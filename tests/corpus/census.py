"""An independent reading of a model, to hold the tool's own findings against.

Nothing here imports onnx_lobs: the weighted ops are counted with a plain constant-folding rule
(a tensor is constant when it is an initializer, a Constant node, or computed only from
constants), and a model is compared with its pruned copy tensor by tensor.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import AttributeProto, ModelProto, numpy_helper

# Ops that carry a weight, and which input holds it.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "ConvInteger": 1, "MatMulInteger": 1,
                "QLinearConv": 3, "QLinearMatMul": 3, "LSTM": 1, "GRU": 1, "RNN": 1}
BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
# Nodes with constant inputs whose output is still not a constant.
NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                "Bernoulli", "If", "Loop", "Scan"}
ALIASES = {"Identity", "Cast"}  # a weight seen through these is still the stored tensor


@dataclass
class Weight:
    """A weighted op whose weight is a stored tensor reached directly (or through Identity/Cast)."""

    op: str
    key: tuple  # location of the weight tensor (see tensor_locations)
    bias: tuple | None
    trans_b: bool
    group: int


@dataclass
class Census:
    total: Counter = field(default_factory=Counter)  # weighted-op nodes per op type
    constant: Counter = field(default_factory=Counter)  # ... whose weight is a constant
    weights: list[Weight] = field(default_factory=list)

    def allowed_keys(self) -> set:
        """The tensors a pruner may change: weights and biases of the weighted ops."""
        return {w.key for w in self.weights} | {w.bias for w in self.weights if w.bias}


def _subgraphs(node):
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for k, g in enumerate(a.graphs):
                yield f"{a.name}[{k}]", g


def count(model: ModelProto) -> Census:
    census = Census()

    def visit(graph, outer: dict, path: tuple):
        table = dict(outer)  # name -> location key of the stored tensor, "folded", or None
        for i in graph.input:
            table[i.name] = None
        for t in graph.initializer:
            table[t.name] = ("init", path, t.name)
        for k, node in enumerate(graph.node):
            ins = [table.get(n) if n else "absent" for n in node.input]
            for attr, sub in _subgraphs(node):
                visit(sub, table, path + ((k, attr),))
            if node.op_type in WEIGHT_INPUT and len(node.input) > WEIGHT_INPUT[node.op_type]:
                census.total[node.op_type] += 1
                w = ins[WEIGHT_INPUT[node.op_type]]
                first = ins[0] if node.op_type == "MatMul" else None
                if w is not None or first is not None:
                    census.constant[node.op_type] += 1
                if isinstance(w, tuple) and node.op_type in BIAS_INPUT:
                    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
                    b = ins[2] if len(ins) > 2 and isinstance(ins[2], tuple) else None
                    census.weights.append(Weight(node.op_type, w, b, bool(a.get("transB", 0)), a.get("group", 1)))
                elif isinstance(w, tuple) and node.op_type == "MatMul":
                    census.weights.append(Weight("MatMul", w, None, False, 1))
            if node.op_type == "Constant":
                value = ("const", path, k) if node.attribute[0].name == "value" else "folded"
                table[node.output[0]] = value
            elif node.op_type in ALIASES and isinstance(ins[0], tuple):
                table[node.output[0]] = ins[0]
            elif node.input and node.op_type not in NOT_FOLDABLE and all(i is not None for i in ins):
                for o in node.output:
                    table[o] = "folded"
            else:
                for o in node.output:
                    table[o] = None

    visit(model.graph, {}, ())
    return census


def tensor_locations(model: ModelProto) -> dict:
    """Every stored tensor: (kind, graph path, name or node index) -> TensorProto."""
    out = {}

    def visit(graph, path):
        for t in graph.initializer:
            out[("init", path, t.name)] = t
        for k, node in enumerate(graph.node):
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                out[("const", path, k)] = node.attribute[0].t
            for attr, sub in _subgraphs(node):
                visit(sub, path + ((k, attr),))

    visit(model.graph, ())
    return out


DATA_FIELDS = {"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data",
               "external_data", "data_location"}


def _copy_without(message, skip_field, rewrite):
    """A copy of a protobuf message field by field; `rewrite(field, value)` may replace a value.

    Built this way (not CopyFrom, then clear) so a model with gigabytes of weights is never
    copied whole: only headers and structure are.
    """
    copy = type(message)()
    for f, value in message.ListFields():
        if skip_field(f.name):
            continue
        repeated = hasattr(value, "extend")  # a repeated container (descriptor APIs vary by protobuf version)
        value = rewrite(f.name, value)
        if repeated:
            getattr(copy, f.name).extend(value)
        elif f.message_type is not None:
            getattr(copy, f.name).CopyFrom(value)
        else:
            setattr(copy, f.name, value)
    return copy


def _strip(message):
    """Tensors keep name, type and dims but no contents, in graphs, nodes and attributes alike."""
    if isinstance(message, onnx.TensorProto):
        return _copy_without(message, DATA_FIELDS.__contains__, lambda f, v: v)

    def rewrite(name, value):
        if name in ("initializer", "node", "attribute", "graphs"):
            return [_strip(v) for v in value]
        if name in ("g", "t"):
            return _strip(value)
        return value

    return _copy_without(message, lambda name: False, rewrite)


def skeleton(model: ModelProto) -> bytes:
    """The model without tensor contents and metadata: everything that must not change."""
    copy = _copy_without(model, lambda name: name in ("metadata_props", "graph"), lambda f, v: v)
    copy.graph.CopyFrom(_strip(model.graph))
    return copy.SerializeToString(deterministic=True)


def _digest(t: onnx.TensorProto, folder: str | None) -> str:
    """A hash of a tensor's values, read from its external file when it has one."""
    h = hashlib.sha256()
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        with open(os.path.join(folder or ".", info["location"]), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            left = int(info["length"]) if "length" in info else None
            while left is None or left > 0:
                block = f.read(1 << 24 if left is None else min(left, 1 << 24))
                if not block:
                    break
                h.update(block)
                left = None if left is None else left - len(block)
    else:
        h.update(np.ascontiguousarray(numpy_helper.to_array(t)).tobytes())
    return h.hexdigest()


def changed_tensors(before: ModelProto, after: ModelProto, before_dir=None, after_dir=None) -> set:
    """Locations whose values differ (dtype, shape and name are covered by the skeleton).

    The folders resolve external data, so models can be loaded without it (load_external_data=False).
    """
    a, b = tensor_locations(before), tensor_locations(after)
    assert a.keys() == b.keys(), "the pruned model's tensors are not the same set"
    return {k for k in a if _digest(a[k], before_dir) != _digest(b[k], after_dir)}


def structure_problems(before: ModelProto, after: ModelProto, allowed: set, before_dir=None,
                       after_dir=None) -> list[str]:
    """Everything that differs beyond weight values and the one added metadata entry."""
    problems = []
    if skeleton(before) != skeleton(after):
        problems.append("graph, inputs, outputs, opsets, functions or tensor names/types changed")
    meta_b = [(p.key, p.value) for p in before.metadata_props]
    meta_a = [(p.key, p.value) for p in after.metadata_props]
    if meta_a[:-1] != meta_b or not meta_a or meta_a[-1][0] != "onnx_lobs":
        problems.append(f"metadata: expected {meta_b} plus one 'onnx_lobs' entry, got {[k for k, _ in meta_a]}")
    extra = changed_tensors(before, after, before_dir, after_dir) - allowed
    if extra:
        problems.append(f"tensors that are not weights or biases changed: {sorted(map(str, extra))[:3]}")
    return problems


def nm_violations(model: ModelProto, census: Census, n: int = 2, m: int = 4) -> list[str]:
    """Weights pruned to a pattern whose groups of m along the reduction axis hold more than n non-zeros.

    Only weights with some zeros are checked (the tool leaves shapes that do not divide dense).
    """
    tensors = tensor_locations(model)
    bad = []
    for w in census.weights:
        if tensors[w.key].data_location == onnx.TensorProto.EXTERNAL:
            continue  # only in-memory results are checked
        a = numpy_helper.to_array(tensors[w.key]).astype(np.float64)
        if not np.any(a == 0) or w.op == "ConvTranspose":  # its N:M layout is the adapter's to define
            continue
        if w.op == "Conv":
            groups = np.moveaxis(a, 1, -1)  # reduction channels last, per kernel position
        elif w.op == "Gemm" and w.trans_b:
            groups = a
        else:  # MatMul and Gemm without transB: W[K, N], K is the reduction axis
            groups = a.T
        if groups.shape[-1] % m:
            continue
        nz = (groups.reshape(groups.shape[:-1] + (-1, m)) != 0).sum(-1)
        if nz.max() > n:
            bad.append(f"{w.op} {w.key}: a group of {m} keeps {nz.max()}")
    return bad
