#!/usr/bin/env python3
"""onnx-lobs against onnxsim's SparseGPT on the same model and data, in one process.

onnxsim (0.8.1, `pip install onnxsim==0.8.1`) is a dev-only install for this script, never a
dependency of the package. Both tools get the same model (built by tools/bench_speed.py, random
He-initialised weights), the same calibration images and the same target (50% of every layer's
weights, or an N:M pattern), with the same dampening (1% of mean diag H) and block size (128).
Printed: wall and process-CPU seconds of each, their ratio, the sparsity each reached, and the
fidelity of each pruned model to the dense one on held-out images that neither saw.

    python tools/bench_onnxsim.py                                  # MobileNetV2, 8 images
    python tools/bench_onnxsim.py --model resnet18 --samples 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import onnx_lobs  # noqa: E402
from bench_speed import MODELS  # noqa: E402
from onnx_lobs.evaluate import Fidelity  # noqa: E402
from onnx_lobs.graph import find_layers  # noqa: E402
from onnx_lobs.modelio import load_model  # noqa: E402


def sparsity_of(model: onnx.ModelProto, names: set[str]) -> float:
    zeros = total = 0
    for t in model.graph.initializer:
        if t.name in names:
            a = numpy_helper.to_array(t)
            zeros += int(np.sum(a == 0))
            total += a.size
    return zeros / max(total, 1)


def fidelity(dense: onnx.ModelProto, pruned: onnx.ModelProto, images: np.ndarray) -> dict:
    opts = ort.SessionOptions()
    a = ort.InferenceSession(dense.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(pruned.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fid = Fidelity()
    for i in range(0, len(images), 8):
        feed = {"input": images[i:i + 8]}
        fid.add(a.run(None, feed), b.run(None, feed))
    return fid.result()


def timed(f):
    wall, cpu = time.perf_counter(), time.process_time()
    out = f()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="mobilenetv2")
    ap.add_argument("--samples", type=int, default=8, help="calibration images (224x224)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (default: 50%% unstructured)")
    ap.add_argument("--held-out", type=int, default=32, help="images for the fidelity comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        import onnxsim
    except ImportError:
        sys.exit("onnxsim is not installed: pip install onnxsim==0.8.1")
    nm = tuple(int(v) for v in args.pattern.split(":")) if args.pattern else None

    model = MODELS[args.model]().model()
    rng = np.random.default_rng(args.seed)
    calib = rng.standard_normal((args.samples, 3, 224, 224), dtype=np.float32)
    held = rng.standard_normal((args.held_out, 3, 224, 224), dtype=np.float32)
    batches = [{"input": calib[i:i + args.batch_size]} for i in range(0, args.samples, args.batch_size)]
    print(f"model {args.model}, {args.samples} calibration images, batch {args.batch_size}, "
          f"{'pattern ' + args.pattern if nm else 'sparsity 0.5'}; onnxsim {getattr(onnxsim, '__version__', '?')}, "
          f"onnx-lobs {onnx_lobs.__version__}; {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")

    # onnx-lobs: every sample calibrates (samples=None keeps a 1-in-10 held-out split, so the
    # calibration array is passed as an iterable of feeds, which ReaderSource also splits; to
    # give both tools exactly the same images, the held-out split is the separate `held` set).
    config = onnx_lobs.PruneConfig(method="sparsegpt", sparsity=0.5, damp=0.01, default_exclude=False,
                                   pattern=nm, batch_size=args.batch_size, progress=False)
    ours, ours_wall, ours_cpu = timed(lambda: onnx_lobs.prune(model, {"input": calib}, config))
    theirs, their_wall, their_cpu = timed(lambda: onnxsim.apply_sparsegpt_pruning(
        model, calibration_data=batches, sparsity=0.5, n=nm[0] if nm else None, m=nm[1] if nm else None,
        percdamp=0.01, proc_block_size=128))

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-onnxsim-{os.getpid()}.onnx")
    onnx.save_model(model, path)
    try:
        names = {layer.weight_name for layer in find_layers(load_model(path))[0]}
    finally:
        os.remove(path)
    print(f"{'tool':>10} {'wall s':>8} {'cpu s':>8} {'sparsity':>9} {'rel_l2':>9} {'top1':>6}")
    for tool, result, wall, cpu in (("onnx-lobs", ours.model, ours_wall, ours_cpu),
                                    ("onnxsim", theirs, their_wall, their_cpu)):
        f = fidelity(model, result, held)
        print(f"{tool:>10} {wall:8.1f} {cpu:8.1f} {sparsity_of(result, names):9.4f} {f['rel_l2']:9.4f} "
              f"{f['top1_agreement']:6.3f}")
    print(f"onnxsim / onnx-lobs: wall {their_wall / ours_wall:.1f}x, cpu {their_cpu / ours_cpu:.1f}x")
    print(f"onnx-lobs calibrated on {ours.report.samples} (its held-out split is not used here)")


if __name__ == "__main__":
    main()
