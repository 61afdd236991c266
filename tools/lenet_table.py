#!/usr/bin/env python3
"""Test error of the bundled LeNets pruned by every method, before any retraining.

Runs every method of onnx_lobs.solvers.METHODS in independent and sequential mode at the paper's
keep ratios (LeNet-300-100: 5/20/70% of fc1/fc2/fc3 kept, about 7% overall; LeNet-5: about 8%
overall), then uniform and --global allocation at the same overall sparsity, and prints a
markdown table. With --readme it also replaces the table between the markers in README.md.

    python tools/lenet_table.py [--readme] [--methods lobs,obc] [--samples N]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnx_lobs  # noqa: E402
from onnx_lobs.solvers import METHODS  # noqa: E402

RATIOS = {
    "lenet300": {"*fc1*": 0.95, "*fc2*": 0.8, "*fc3*": 0.3},
    "lenet5": {"*conv1*": 0.4, "*conv2*": 0.85, "*fc1*": 0.93, "*fc2*": 0.75},
}
LABELS = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
BEGIN, END = "<!-- lenet-table:begin -->", "<!-- lenet-table:end -->"


def test_error(model, test) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"input": test["input"]})[0].argmax(1)
    return 100 * float(np.mean(pred != test["labels"]))


def run(name, config, test):
    t = time.perf_counter()
    result = onnx_lobs.prune(os.path.join(ROOT, "models", f"{name}.onnx"),
                             os.path.join(ROOT, "models", "mnist_calib.npz"), config)
    return test_error(result.model, test), result.report.sparsity, time.perf_counter() - t


def rows_for(name, methods, samples, test):
    dense = test_error(onnx_lobs.load_model(os.path.join(ROOT, "models", f"{name}.onnx")).model, test)
    yield (LABELS[name], "dense", "", "", f"{dense:.2f}", "100", "")
    ratios = ", ".join(f"{k.strip('*')} {100 * (1 - v):.0f}%" for k, v in RATIOS[name].items())
    overall = None
    for method in methods:
        for sequential in (False, True):
            cfg = onnx_lobs.PruneConfig(method=method, layer_sparsity=RATIOS[name], sequential=sequential,
                                        samples=samples)
            err, sparsity, secs = run(name, cfg, test)
            overall = sparsity
            yield (LABELS[name], method, "sequential" if sequential else "independent",
                   f"paper ratios ({ratios} kept)", f"{err:.2f}", f"{100 * (1 - sparsity):.1f}", f"{secs:.1f}")
            print(f"  {name} {method} {'seq' if sequential else 'ind'}: {err:.2f}%", file=sys.stderr, flush=True)
    for method in [m for m in ("auto", "lobs", "obc") if m in methods]:
        for sequential in (False, True):
            for how in ("uniform", "global by output"):
                cfg = onnx_lobs.PruneConfig(method=method, sequential=sequential, samples=samples,
                                            default_exclude=False,
                                            sparsity=overall if how == "uniform" else 0.5,
                                            global_sparsity=None if how == "uniform" else overall)
                err, sparsity, secs = run(name, cfg, test)
                yield (LABELS[name], method, "sequential" if sequential else "independent",
                       f"{how} at the same overall sparsity", f"{err:.2f}", f"{100 * (1 - sparsity):.1f}",
                       f"{secs:.1f}")
                print(f"  {name} {method} {how} {'seq' if sequential else 'ind'}: {err:.2f}%", file=sys.stderr,
                      flush=True)


def table(methods, samples) -> str:
    with np.load(os.path.join(ROOT, "models", "mnist_test.npz")) as z:
        test = {"input": z["input"], "labels": z["labels"]}
    head = ["model", "method", "calibration", "allocation", "test error %", "kept %", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in RATIOS:
        lines += ["| " + " | ".join(row) + " |" for row in rows_for(name, methods, samples, test)]
    cmd = "python tools/lenet_table.py" + (f" --samples {samples}" if samples else "")
    lines.append("")
    lines.append(f"Before any retraining; 10,000-image MNIST test set; calibration on the bundled "
                 f"`mnist_calib.npz` (one in ten held out). Produced by `{cmd}` on {platform.machine()}, "
                 f"{os.cpu_count()} cores, onnx-lobs {onnx_lobs.__version__}. Seconds (wall, calibration included) are indicative: the machine may be shared.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int)
    ap.add_argument("--readme", action="store_true", help="replace the table in README.md")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    text = table(methods, args.samples)
    print(text)
    if args.readme:
        path = os.path.join(ROOT, "README.md")
        readme = open(path).read()
        if BEGIN not in readme:
            sys.exit("README.md has no lenet-table markers")
        readme = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}",
                        readme, flags=re.S)
        open(path, "w").write(readme)


if __name__ == "__main__":
    main()
