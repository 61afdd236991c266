#!/usr/bin/env python3
"""Time each phase of pruning an ImageNet-sized CNN, against a floor estimated from FLOPs.

A ResNet-50-shaped model (or ResNet-18, MobileNetV2) is built with onnx.helper and random
He-initialised weights (batch norm folded away: every conv has a bias), then pruned at 50% with
standard-normal calibration images. Printed: each phase's seconds from the report, the peak RSS,
the output fidelity on the held-out samples, and the "floor": the FLOPs of the forward pass and
of the Hessian accumulation (n_rows * cols^2 per layer: syrk computes half of X^T X) divided by
numpy's measured fp32 / fp64 matmul rate on this machine.

    python tools/bench_speed.py                              # ResNet-50, 128 samples
    python tools/bench_speed.py --model resnet18 --samples 64 --profile
    python tools/bench_speed.py --default                    # the CLI default (allocation by output)
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnx_lobs  # noqa: E402
from onnx_lobs import pruning  # noqa: E402
try:
    from onnx_lobs import activations  # noqa: E402  (where the calibration pass lives now)
except ImportError:
    activations = None
from onnx_lobs.solvers import METHODS  # noqa: E402


class Net:
    """Builds a graph op by op, tracking spatial sizes so each conv's FLOPs are known."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.convs = [], [], []  # convs: (name, groups, cols, positions, cout)
        self.k = 0

    def _name(self, op):
        self.k += 1
        return f"{op}{self.k}"

    def _init(self, name, a):
        self.inits.append(numpy_helper.from_array(a.astype(np.float32), name))
        return name

    def conv(self, x, hw, cin, cout, k, stride=1, group=1, gain=1.0):
        name = self._name("conv")
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * (gain * math.sqrt(2.0 / fan_in))
        b = 0.01 * self.rng.standard_normal(cout)
        pad = k // 2
        self.nodes.append(helper.make_node(
            "Conv", [x, self._init(name + ".W", w), self._init(name + ".B", b)], [name], name=name,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group))
        out = tuple((s + 2 * pad - k) // stride + 1 for s in hw)
        self.convs.append((name, group, fan_in, out[0] * out[1], cout))
        return name, out

    def op(self, op, inputs, **attrs):
        name = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def relu(self, x):
        return self.op("Relu", [x])

    def relu6(self, x):
        if not any(i.name == "zero" for i in self.inits):
            self._init("zero", np.array(0.0)), self._init("six", np.array(6.0))
        return self.op("Clip", [x, "zero", "six"])

    def head(self, x, cin, classes=1000):
        x = self.op("Flatten", [self.op("GlobalAveragePool", [x])])
        w = self.rng.standard_normal((classes, cin)) * math.sqrt(1.0 / cin)
        self.nodes.append(helper.make_node(
            "Gemm", [x, self._init("fc.W", w), self._init("fc.B", np.zeros(classes))], ["logits"],
            name="fc", transB=1))
        self.convs.append(("fc", 1, cin, 1, classes))

    def model(self):
        graph = helper.make_graph(
            self.nodes, "bench",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        onnx.checker.check_model(m)
        return m


def resnet(blocks, bottleneck, seed=0):
    net = Net(seed)
    x, hw = net.conv("input", (224, 224), 3, 64, 7, stride=2)
    x = net.op("MaxPool", [net.relu(x)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    hw = tuple((s + 2 - 3) // 2 + 1 for s in hw)
    cin, expansion = 64, (4 if bottleneck else 1)
    gain = 1.0 / math.sqrt(sum(blocks))  # keeps the residual stream's variance from doubling per block
    for stage, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            cout = width * expansion
            if bottleneck:
                y, h2 = net.conv(x, hw, cin, width, 1)
                y, h2 = net.conv(net.relu(y), h2, width, width, 3, stride)
                y, h2 = net.conv(net.relu(y), h2, width, cout, 1, gain=gain)
            else:
                y, h2 = net.conv(x, hw, cin, width, 3, stride)
                y, h2 = net.conv(net.relu(y), h2, width, cout, 3, gain=gain)
            skip = x if stride == 1 and cin == cout else net.conv(x, hw, cin, cout, 1, stride)[0]
            x, hw, cin = net.relu(net.op("Add", [y, skip])), h2, cout
    net.head(x, cin)
    return net


def mobilenetv2(seed=0):
    net = Net(seed)
    x, hw = net.conv("input", (224, 224), 3, 32, 3, stride=2)
    x, cin = net.relu6(x), 32
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride, hidden = (s if i == 0 else 1), cin * t
            y, h2 = x, hw
            if t != 1:
                y, h2 = net.conv(y, h2, cin, hidden, 1)
                y = net.relu6(y)
            y, h2 = net.conv(y, h2, hidden, hidden, 3, stride, group=hidden)
            y, h2 = net.conv(net.relu6(y), h2, hidden, c, 1, gain=0.5)
            x = net.op("Add", [x, y]) if stride == 1 and cin == c else y
            hw, cin = h2, c
    x, hw = net.conv(x, hw, cin, 1280, 1)
    net.head(net.relu6(x), 1280)
    return net


MODELS = {"resnet50": lambda: resnet((3, 4, 6, 3), True), "resnet18": lambda: resnet((2, 2, 2, 2), False),
          "mobilenetv2": mobilenetv2}


def matmul_rate(dtype, n=1536, reps=3) -> float:
    """GFLOP/s of numpy's (threaded BLAS) square matmul: the best of a few runs."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    b = a.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def profile_hooks(stats):
    """Time, per layer, the unfold (im2col) and the accumulator's add, by wrapping pruning.unfold:
    the time between yielding a chunk and being asked for the next is the add."""
    module = activations
    original = module.unfold

    def timed(adapter, node, x, weight_shape):
        s = stats[node.name]
        it = iter(original(adapter, node, x, weight_shape))
        while True:
            t = time.perf_counter()
            cols = next(it, None)
            s[0] += time.perf_counter() - t
            if cols is None:
                return
            t = time.perf_counter()
            yield cols
            s[1] += time.perf_counter() - t
    module.unfold = timed


def main() -> None:
    default_method = next((m for m in ("sparsegpt", "lobs") if m in METHODS), METHODS[0])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    ap.add_argument("--method", default=default_method, choices=METHODS)
    ap.add_argument("--default", action="store_true",
                    help="the CLI's default instead: --sparsity 0.5 overall, allocated by output, method auto "
                         "(--method is then ignored)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--damp", type=float, default=None, help="default: chosen per layer by the library")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="per-layer unfold/add seconds of the hessian phase")
    ap.add_argument("--modes", default="independent",
                    help="comma-separated: independent,sequential (both: run in turn, ratio printed)")
    args = ap.parse_args()
    totals = {}
    for mode in args.modes.split(","):
        if mode not in ("independent", "sequential"):
            ap.error(f"unknown mode {mode!r}")
        print(f"=== {mode} ===")
        totals[mode] = run(args, mode == "sequential")
        print()
    if len(totals) == 2:
        print(f"sequential / independent total time: {totals['sequential'] / totals['independent']:.2f}")


def run(args, sequential: bool) -> float:
    """One pruning run; prints its phases and returns its total seconds. In sequential mode the
    floor counts two forward passes (dense and pruned) and the joint Hessian of [x_d, x_p],
    four times the work of H."""
    net = MODELS[args.model]()
    fp32, fp64 = matmul_rate(np.float32), matmul_rate(np.float64)
    x = np.random.default_rng(args.seed).standard_normal((args.samples, 3, 224, 224), dtype=np.float32)
    stats = defaultdict(lambda: [0.0, 0.0])
    if args.profile:
        profile_hooks(stats)
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as folder:
        path = os.path.join(folder, f"{args.model}.onnx")
        onnx.save_model(net.model(), path)
        budget = dict(global_sparsity=0.5, method="auto") if args.default else dict(sparsity=0.5, method=args.method)
        config = onnx_lobs.PruneConfig(**budget, batch_size=args.batch_size, damp=args.damp, seed=args.seed,
                                       sequential=sequential)
        wall, cpu = time.perf_counter(), time.process_time()
        result = onnx_lobs.prune(path, {"input": x}, config)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rep = result.report
    # Hessian rows: every sample (calibration and held out) goes through one accumulator; layers
    # left dense (e.g. the RGB stem, by default) accumulate nothing.
    done = {r.name for r in rep.layers if r.skipped is None}
    rows = {name: args.samples * pos for name, _, _, pos, _ in net.convs}
    hess_flops = sum(g * rows[name] * c ** 2 for name, g, c, _, _ in net.convs if name in done)
    fwd_flops = sum(2 * pos * cout * c for _, _, c, pos, cout in net.convs)  # per sample
    if sequential:
        hess_flops, fwd_flops = 4 * hess_flops, 2 * fwd_flops
    n_fwd = rep.samples["calibration"] + rep.samples["held_out"]
    floor = {"forward": n_fwd * fwd_flops / (fp32 * 1e9), "hessian": hess_flops / (fp32 * 1e9)}
    env = os.environ.get("OPENBLAS_CORETYPE", "(unset)")
    method = "default (auto, allocated by output)" if args.default else args.method
    print(f"model {args.model}: {len(net.convs)} layers ({len(done)} pruned), method {method}, "
          f"samples {rep.samples}, batch {args.batch_size}, damp {'auto' if args.damp is None else args.damp}")
    print(f"machine: {os.cpu_count()} cpus, OPENBLAS_CORETYPE={env}, numpy matmul fp32 {fp32:.0f} GFLOP/s, "
          f"fp64 {fp64:.0f} GFLOP/s")
    print(f"floor: forward {n_fwd * fwd_flops / 1e9:.0f} GFLOP, hessian {hess_flops / 1e9:.0f} GFLOP "
          f"(fp32 {floor['hessian']:.2f} s, fp64 {hess_flops / (fp64 * 1e9):.2f} s)")
    print(f"{'phase':>10} {'seconds':>9} {'x floor':>8}")
    for phase in ("load", "prepare", "forward", "hessian", "allocate", "solve", "verify", "total"):
        if phase in rep.timings:
            ratio = f"{rep.timings[phase] / floor[phase]:8.2f}" if phase in floor else ""
            print(f"{phase:>10} {rep.timings[phase]:9.2f} {ratio}")
    print(f"peak RSS {peak:.0f} MB; process CPU {cpu:.0f} s over {wall:.0f} s wall "
          f"({cpu / wall:.2f} cores busy); load average {os.getloadavg()[0]:.1f} (above that: other processes)")
    f = rep.fidelity or {}
    print("fidelity (held out): " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in f.items()))
    if args.profile:
        by_name = {name: (g, c, pos) for name, g, c, pos, _ in net.convs}
        print(f"\nhessian profile (top 15 by time; floor = g*n*c^2 at fp32 {fp32:.0f} GFLOP/s)")
        print(f"{'layer':>8} {'groups':>6} {'cols':>5} {'rows':>8} {'unfold s':>9} {'add s':>7} {'x floor':>8}")
        total = [0.0, 0.0]
        for name, (u, a) in sorted(stats.items(), key=lambda kv: -sum(kv[1]))[:15]:
            g, c, pos = by_name[name]
            fl = g * rows[name] * c ** 2 / (fp32 * 1e9)
            print(f"{name:>8} {g:>6} {c:>5} {rows[name]:>8} {u:9.3f} {a:7.3f} {(u + a) / fl:8.2f}")
        for u, a in stats.values():
            total[0] += u
            total[1] += a
        print(f"{'all':>8} {'':>6} {'':>5} {'':>8} {total[0]:9.3f} {total[1]:7.3f} "
              f"{sum(total) / floor['hessian']:8.2f}")
    return rep.timings["total"]


if __name__ == "__main__":
    main()
