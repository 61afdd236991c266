#!/usr/bin/env python3
"""Structured pruning against onnxsim's structured pruning, at the same FLOPs, in one process.

For each model and FLOPs target (the fraction of the dense FLOPs kept), onnx-lobs prunes with
--structured --flops F (method lobs), and onnxsim 0.8.1 (a dev-only install: pip install
onnxsim==0.8.1) with apply_structured_wanda_pruning and apply_structured_pruning, their channel
sparsity found by bisection so that their FLOPs match ours (onnx-lobs's counter, flops.py).
Printed per run: parameters, MFLOPs, file size, onnxruntime latency ratio dense / pruned at batch 1
and batch 32 (2 threads, warm, the two models taking turns, median), held-out relative L2 against the dense
model, and for the LeNets the MNIST test error.

    python tools/bench_structured.py                                # every model, F = 0.7 and 0.5
    python tools/bench_structured.py --models lenet300 lenet5 --targets 0.5
    python tools/bench_structured.py --lenet-retrain --mnist ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_speed import MODELS as CNNS, Net  # noqa: E402
from onnx_lobs import PruneConfig, prune  # noqa: E402
from onnx_lobs.flops import count  # noqa: E402
from onnx_lobs.structured_checks import latency, parameters  # noqa: E402


# ----------------------------------------------------------------------------- models

def yolo(seed=0, size=160):
    """A YOLOv8-style detector: strided convs, C2f blocks (Split, bottlenecks, Concat), SPPF
    (three MaxPools joined by a Concat), and a head per scale."""
    net = Net(seed)
    x, hw = net.conv("input", (size, size), 3, 16, 3, stride=2)
    x, c = net.op("Relu", [x]), 16
    outs = []
    for width in (32, 64, 128):
        x, hw = net.conv(x, hw, c, width, 3, stride=2)
        x, c = net.op("Relu", [x]), width
        x = _c2f(net, x, hw, c)
        if width == 128:
            x = _sppf(net, x, hw, c)
        if width >= 64:
            h, _ = net.conv(x, hw, c, 32, 3)
            outs.append(net.conv(net.op("Relu", [h]), hw, 32, 21, 1)[0])  # 16 box + 5 class channels
    graph = helper.make_graph(net.nodes, "yolo", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               ["N", 3, size, size])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def _c2f(net, x, hw, c):
    half = c // 2
    y, _ = net.conv(x, hw, c, c, 1)
    y = net.op("Relu", [y])
    a, b = net._name("split") + "a", net._name("split") + "b"
    net.nodes.append(helper.make_node("Split", [y, net._init(net._name("sizes"), np.array([half, half]))],
                                      [a, b], axis=1))
    net.inits[-1] = numpy_helper.from_array(np.array([half, half], np.int64), net.inits[-1].name)
    z, _ = net.conv(b, hw, half, half, 3)
    z, _ = net.conv(net.op("Relu", [z]), hw, half, half, 3, gain=0.5)
    z = net.op("Add", [b, z])
    cat = net.op("Concat", [a, b, z], axis=1)
    out, _ = net.conv(cat, hw, 3 * half, c, 1)
    return net.op("Relu", [out])


def _sppf(net, x, hw, c):
    y, _ = net.conv(x, hw, c, c // 2, 1)
    pools = [net.op("Relu", [y])]
    for _ in range(3):
        pools.append(net.op("MaxPool", [pools[-1]], kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
    out, _ = net.conv(net.op("Concat", pools, axis=1), hw, 2 * c, c, 1)
    return net.op("Relu", [out])


def minilm(seed=0, layers=6, hidden=384, heads=12, ffn=1536, seq=64):
    """A MiniLM-shaped encoder on embeddings [N, seq, hidden]: post-norm blocks of multi-head
    attention (q/k/v, Reshape into heads, Transpose, MatMul, Softmax, MatMul, output projection)
    and an FFN with the exporters' decomposed Gelu."""
    rng = np.random.default_rng(seed)
    nodes, inits, k = [], [], [0]

    def name(op):
        k[0] += 1
        return f"{op}{k[0]}"

    def const(a, dtype=np.float32):
        n = name("c")
        inits.append(numpy_helper.from_array(np.asarray(a, dtype), n))
        return n

    def op(t, ins, **attrs):
        n = name(t.lower())
        nodes.append(helper.make_node(t, ins, [n], name=n, **attrs))
        return n

    def linear(x, a, b):
        return op("Add", [op("MatMul", [x, const(rng.standard_normal((a, b)) / math.sqrt(a))]),
                          const(0.02 * rng.standard_normal(b))])

    def norm(x):
        return op("LayerNormalization", [x, const(np.ones(hidden)), const(np.zeros(hidden))], axis=-1)

    x, d = "input", hidden // heads
    for _ in range(layers):
        q, kk, v = (op("Transpose", [op("Reshape", [linear(x, hidden, hidden), const([0, 0, heads, d], np.int64)])],
                       perm=p) for p in ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]))
        att = op("Softmax", [op("Div", [op("MatMul", [q, kk]), const(math.sqrt(d))])], axis=-1)
        ctx = op("Reshape", [op("Transpose", [op("MatMul", [att, v])], perm=[0, 2, 1, 3]),
                             const([0, 0, hidden], np.int64)])
        x = norm(op("Add", [x, linear(ctx, hidden, hidden)]))
        h = linear(x, hidden, ffn)
        g = op("Mul", [op("Mul", [h, op("Add", [op("Erf", [op("Div", [h, const(math.sqrt(2))])]), const(1.0)])]),
                       const(0.5)])
        x = norm(op("Add", [x, linear(g, ffn, hidden)]))
    graph = helper.make_graph(nodes, "minilm", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["N", seq, hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", seq, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _lenet(name):
    return onnx.load(os.path.join(ROOT, "models", f"{name}.onnx"))


MODELS = {"resnet50": lambda: CNNS["resnet50"]().model(), "mobilenetv2": lambda: CNNS["mobilenetv2"]().model(),
          "yolo": yolo, "minilm": minilm, "lenet300": lambda: _lenet("lenet300"), "lenet5": lambda: _lenet("lenet5")}


def data(name, model, samples, held, rng):
    """(calibration array, held-out array, test (x, y) or None): MNIST for the LeNets, else N(0, 1)."""
    if name.startswith("lenet"):
        calib = np.load(os.path.join(ROOT, "models", "mnist_calib.npz"))["input"]
        test = np.load(os.path.join(ROOT, "models", "mnist_test.npz"))
        return calib[:samples], calib[-held:], (test["input"], test["labels"])
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return (rng.standard_normal([samples] + dims, dtype=np.float32),
            rng.standard_normal([held] + dims, dtype=np.float32), None)


# ----------------------------------------------------------------------------- measuring

def _run(model, x, batch=64):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = model.graph.input[0].name
    outs = [s.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def rel_l2(dense, pruned, x) -> float:
    a, b = _run(dense, x), _run(pruned, x)
    diff = sum(float(np.sum((p.astype(np.float64) - d) ** 2)) for d, p in zip(a, b))
    return math.sqrt(diff / sum(float(np.sum(d.astype(np.float64) ** 2)) for d in a))


def test_error(model, test) -> float | None:
    if test is None:
        return None
    return float(np.mean(_run(model, test[0], 1000)[0].argmax(1) != test[1]))


def measure(dense, pruned, held, test, seconds) -> dict:
    x32 = np.concatenate([held] * (32 // len(held) + 1))[:32]
    speed = latency(dense, pruned, {dense.graph.input[0].name: x32}, threads=2, budget=3.0)
    return {"params": parameters(pruned), "mflops": count(pruned).total / 1e6,
            "mb": pruned.ByteSize() / 2 ** 20, "b1": speed["batch_1"]["speedup"], "b32": speed["batch_32"]["speedup"],
            "rel_l2": rel_l2(dense, pruned, held), "test_error": test_error(pruned, test), "seconds": seconds}


def onnxsim_at(fn, dense, flops_goal, sparsity_hi=0.95, steps=7, **kw):
    """onnxsim's result whose FLOPs come closest to flops_goal from below, by bisection on its
    channel sparsity; (model, sparsity, seconds of the final call)."""
    lo, hi, best = 0.0, sparsity_hi, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        t = time.perf_counter()
        out = fn(dense, sparsity=mid, **kw)
        secs = time.perf_counter() - t
        f = count(out).total
        if f <= flops_goal:
            best, hi = (out, mid, secs), mid
        else:
            lo = mid
    if best is None:  # the goal is out of its reach: its most pruned result
        t = time.perf_counter()
        out = fn(dense, sparsity=sparsity_hi, **kw)
        best = (out, sparsity_hi, time.perf_counter() - t)
    return best


def row(model, target, tool, m, dense_flops, extra=""):
    err = "" if m["test_error"] is None else f" {100 * m['test_error']:6.2f}%"
    print(f"{model:<11} {target:>5} {tool:<22} {m['params']:>10,} {m['mflops']:>9.1f} "
          f"({m['mflops'] * 1e6 / dense_flops:5.3f}) {m['mb']:>7.2f} {m['b1']:>6.2f}x {m['b32']:>6.2f}x "
          f"{m['rel_l2']:>8.4f}{err} {m['seconds']:>7.1f}s {extra}", flush=True)


def bench(name, targets, args, rng):
    dense = MODELS[name]()
    calib, held, test = data(name, dense, args.samples, args.held_out, rng)
    input_name = dense.graph.input[0].name
    dense_flops = count(dense).total
    base = {"params": parameters(dense), "mflops": dense_flops / 1e6, "mb": dense.ByteSize() / 2 ** 20,
            "b1": 1.0, "b32": 1.0, "rel_l2": 0.0, "test_error": test_error(dense, test), "seconds": 0.0}
    row(name, "1.0", "dense", base, dense_flops)
    try:
        import onnxsim
    except ImportError:
        onnxsim = None
    feeds = [{input_name: calib[i:i + args.batch_size]} for i in range(0, min(len(calib), args.onnxsim_samples),
                                                                         args.batch_size)]
    for target in targets:
        t = time.perf_counter()
        ours = prune(dense, {input_name: calib}, PruneConfig(structured=True, flops=target, method=args.method,
                                                             batch_size=args.batch_size, latency=False,
                                                             allocation=args.allocation))
        m = measure(dense, ours.model, held, test, time.perf_counter() - t)
        a = ours.report.summary["allocation"]
        row(name, target, f"onnx-lobs {args.method}", m, dense_flops,
            f"allocation {a['by']}" + (f", {a['probes']} probes, allocate {ours.report.timings['allocate']:.0f}s"
                                       if a["by"] == "output" else ""))
        if onnxsim is None:
            print("  (onnxsim not installed: pip install onnxsim==0.8.1)")
            continue
        goal = m["mflops"] * 1e6 * 1.001
        for label, fn, kw in (("onnxsim structured_wanda", onnxsim.apply_structured_wanda_pruning,
                               {"calibration_data": feeds}),
                              ("onnxsim structured", onnxsim.apply_structured_pruning, {})):
            try:
                out, s, secs = onnxsim_at(fn, dense, goal, **kw)
            except Exception as e:  # a peer's failure is a figure too
                print(f"{name:<11} {target:>5} {label:<22} failed: {type(e).__name__}: {str(e)[:150]}")
                continue
            row(name, target, label, measure(dense, out, held, test, secs), dense_flops, f"sparsity {s:.3f}")
        if name == "minilm":
            out = onnxsim.apply_attention_head_pruning(dense, sparsity=0.5)
            same = count(out).total == dense_flops
            print(f"{name:<11} {target:>5} onnxsim attention_head  "
                  f"{'matched nothing (no fused Attention node)' if same else 'pruned'}")


def lenet_retrain(args):
    """LeNet-300-100 with 70% of its hidden neurons removed (kept counts rounded to 8, the
    default), before and after one epoch of retrain on the MNIST training set with labels."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from train_mnist import load_mnist
    from onnx_lobs import retrain

    mnist = load_mnist(args.mnist)
    dense = _lenet("lenet300")
    calib = np.load(os.path.join(ROOT, "models", "mnist_calib.npz"))["input"]
    test = (mnist["test_x"].reshape(-1, 1, 28, 28).astype(np.float32), mnist["test_y"])
    train = {"input": mnist["train_x"].reshape(-1, 1, 28, 28).astype(np.float32), "labels": mnist["train_y"]}
    print(f"LeNet-300-100, dense test error {100 * test_error(dense, test):.2f}%")
    for method in ("lobs", "magnitude", "wanda"):
        result = prune(dense, {"input": calib}, PruneConfig(structured=True, sparsity=0.7, method=method,
                                                            latency=False))
        pruned = result.model
        shapes = ", ".join(f"{g.channels}->{g.kept}" for g in result.report.groups if g.kept is not None)
        before = test_error(pruned, test)
        after = retrain(pruned, train, labels="labels", epochs=1, progress=False).model
        print(f"  {method:<10} hidden {shapes}: test error {100 * before:.2f}% before retraining, "
              f"{100 * test_error(after, test):.2f}% after one epoch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--targets", nargs="*", type=float, default=[0.7, 0.5], help="FLOPs kept")
    ap.add_argument("--method", default="lobs")
    ap.add_argument("--allocation", choices=["output", "layer"], help="default: the tool's (output)")
    ap.add_argument("--samples", type=int, default=256, help="calibration samples (MNIST: images)")
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--onnxsim-samples", type=int, default=64, help="calibration samples for onnxsim's Wanda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lenet-retrain", action="store_true")
    ap.add_argument("--mnist", default=os.path.join(ROOT, "..", "shared", "data", "mnist"))
    args = ap.parse_args()
    print(f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}; onnxruntime {ort.__version__}; "
          f"latency: 2 threads, warm, models taking turns after a pause, median over 3 s of runs per batch size")
    if args.lenet_retrain:
        lenet_retrain(args)
        return
    print(f"{'model':<11} {'F':>5} {'tool':<22} {'params':>10} {'MFLOPs':>9} {'(kept)':>7} {'MB':>7} "
          f"{'b1':>7} {'b32':>7} {'rel_l2':>8} {'err':>7} {'time':>8}")
    rng = np.random.default_rng(args.seed)
    for name in args.models:
        bench(name, args.targets, args, rng)


if __name__ == "__main__":
    main()
