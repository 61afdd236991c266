#!/usr/bin/env python3
"""Peak memory of a pruning run against the number of calibration samples.

Hessians are accumulated batch by batch and activations dropped, so the peak should not grow
with the number of samples. Each run is a fresh subprocess; its peak RSS (ru_maxrss) is printed
beside its RSS just before pruning (imports, model and data loaded), and the ratio of the peaks.

    python tools/bench_memory.py                      # LeNet-5, 1,000 vs 10,000 samples
    python tools/bench_memory.py --model models/lenet300.onnx --samples 1000 10000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import json, resource, sys, numpy as np
import onnx_lobs
from onnx_lobs.calibration import open_source
model, data, samples, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
loaded = onnx_lobs.load_model(model)
source = open_source(data, loaded.model, samples=samples)
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss_kib()
result = onnx_lobs.prune(loaded, source, onnx_lobs.PruneConfig(sparsity=0.9, samples=samples, batch_size=batch))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "peak_kib": peak, "samples": result.report.samples,
                  "seconds": result.report.timings["total"]}))
"""


def run(model: str, data: str, samples: int, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model, data, str(samples), str(batch)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"bench_memory: run with {samples} samples failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "lenet5.onnx"))
    ap.add_argument("--data", default=os.path.join(ROOT, "models", "mnist_calib.npz"))
    ap.add_argument("--samples", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    print(f"model {os.path.relpath(args.model)}, data {os.path.relpath(args.data)}, batch {args.batch_size}")
    print(f"{'samples':>8} {'calib+held':>11} {'RSS before':>11} {'peak RSS':>10} {'peak-before':>12} {'seconds':>8}")
    runs = []
    for n in args.samples:
        r = run(args.model, args.data, n, args.batch_size)
        runs.append(r)
        s = r["samples"]
        print(f"{n:>8} {s['calibration']:>6}+{s['held_out']:<4} {r['before_kib'] / 1024:>9.1f}MB "
              f"{r['peak_kib'] / 1024:>8.1f}MB {(r['peak_kib'] - r['before_kib']) / 1024:>10.1f}MB "
              f"{r['seconds']:>8.2f}")
    base = runs[0]["peak_kib"]
    for n, r in zip(args.samples[1:], runs[1:]):
        print(f"peak RSS ratio {n} / {args.samples[0]} samples: {r['peak_kib'] / base:.3f}")


if __name__ == "__main__":
    main()
