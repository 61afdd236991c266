#!/usr/bin/env python3
"""The L-OBS paper's MNIST table reproduced with onnx-lobs, retraining included; writes docs/paper_table.md.

For LeNet-300-100 at the paper's keep ratios (fc1/fc2/fc3 5/20/70%, 7% overall) and LeNet-5 at about 8%,
pruned by magnitude, lobs (the paper's algorithm) and obc (sequential, the best method here), it measures
the MNIST test error right after pruning, after a light retraining with labels, and after a distillation
from the dense model that uses no labels. Every row uses the same settings and seed.

    python tools/reproduce_paper.py [--mnist DIR] [--out docs/paper_table.md] [--no-sweep]

Needs the retrain extra (pip install -e '.[retrain]') and the raw MNIST IDX files (default
../shared/data/mnist). The 60,000-image training set is written by tools/train_mnist.py --export-train
into a temporary folder, used, and deleted: it is never committed.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnx_lobs  # noqa: E402
from onnx_lobs.retrain import DEFAULT_LR, require_torch  # noqa: E402

RATIOS = {  # sparsity per layer: the fraction removed
    "lenet300": {"*fc1*": 0.95, "*fc2*": 0.8, "*fc3*": 0.3},
    "lenet5": {"*conv1*": 0.4, "*conv2*": 0.85, "*fc1*": 0.93, "*fc2*": 0.75},
}
LABELS = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
METHODS = [("magnitude", False), ("lobs", False), ("obc", True)]  # (method, sequential)
SWEEP = [3e-4, 1e-3, 2e-3, 5e-3]
PAPER = {  # quoted from Dong, Chen & Pan (NeurIPS 2017), Table 2; not measured here
    "lenet300": {"dense": 1.76, "kept": 7, "before": 3.10, "after": 1.82, "iterations": 510},
    "lenet5": {"dense": 1.27, "kept": 8, "before": 2.07, "after": 0.86, "iterations": 740},
}
GOALS = {"lenet300": ("at most 1.80% (the paper's 1.82% after 510 iterations)", lambda dense: 1.80),
         "lenet5": ("within 0.1 points of the dense error", lambda dense: dense + 0.10)}


def model_path(name):
    return os.path.join(ROOT, "models", f"{name}.onnx")


def test_error(model) -> float:
    result = onnx_lobs.evaluate(model, os.path.join(ROOT, "models", "mnist_test.npz"))
    return 100 * (1 - result["accuracy"])


def export_training_set(mnist: str, folder: str) -> str:
    path = os.path.join(folder, "train.npz")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_mnist.py"), "--mnist", mnist,
                    "--no-train", "--out", folder, "--export-train", path], check=True, stdout=subprocess.DEVNULL)
    return path


def retrained(pruned, train, **kwargs):
    t = time.perf_counter()
    result = onnx_lobs.retrain(pruned, train, epochs=1, seed=0, progress=False, **kwargs)
    return result, time.perf_counter() - t


def rows_for(name, train):
    dense = test_error(model_path(name))
    yield {"model": name, "method": "dense", "kept": 100.0, "before": dense}
    for method, sequential in METHODS:
        t = time.perf_counter()
        config = onnx_lobs.PruneConfig(method=method, layer_sparsity=RATIOS[name], sequential=sequential)
        pruned = onnx_lobs.prune(model_path(name), os.path.join(ROOT, "models", "mnist_calib.npz"), config)
        seconds = time.perf_counter() - t
        row = {"model": name, "method": method, "sequential": sequential, "kept": 100 * (1 - pruned.report.sparsity),
               "before": test_error(pruned.model), "prune_s": seconds, "dense": dense}
        labelled, row["labels_s"] = retrained(pruned, train, labels="labels")
        row["labels"], row["labels_it"] = test_error(labelled.model), labelled.report.iterations
        distilled, row["distil_s"] = retrained(pruned, train, teacher=model_path(name))
        row["distil"], row["distil_it"] = test_error(distilled.model), distilled.report.iterations
        if method == "lobs":  # for the learning-rate sweep
            row["pruned"], row["held_out"] = pruned, labelled.report.after
        print(f"  {name} {method}{' seq' if sequential else ''}: {row['before']:.2f} -> labels {row['labels']:.2f}, "
              f"distillation {row['distil']:.2f}", file=sys.stderr, flush=True)
        yield row


def sweep(rows, train):
    """The learning-rate choice: lobs rows retrained with labels, judged on held-out training images."""
    for row in (r for r in rows if "pruned" in r):
        name = row["model"]
        for lr in SWEEP:
            if lr == DEFAULT_LR:  # the row itself
                after, err = row["held_out"], row["labels"]
            else:
                result = onnx_lobs.retrain(row["pruned"], train, labels="labels", epochs=1, lr=lr, progress=False)
                after, err = result.report.after, test_error(result.model)
            print(f"  sweep {name} lr {lr:g}: held-out loss {after['loss']:.4f}", file=sys.stderr, flush=True)
            yield name, lr, after["loss"], 100 * (1 - after["accuracy"]), err


def calibration(row) -> str:
    return "" if row["method"] == "dense" else "sequential" if row["sequential"] else "independent"


def markdown(rows, sweep_rows, threads, seconds) -> str:
    import torch

    out = ["# The paper's MNIST table, reproduced", "",
           "Test error (%) on the 10,000 MNIST test images of the bundled models, pruned with onnx-lobs, then "
           "retrained lightly. *With labels*: cross-entropy on the training labels. *Distillation*: no labels, "
           "the dense model is the teacher (KL divergence between the softmax outputs). Iterations in brackets, "
           "at batch 128.", "",
           "| model | method | calibration | kept % | before retraining | after retraining with labels "
           "| after distillation, no labels |", "|---|---|---|---|---|---|---|"]
    for name in RATIOS:
        for r in (r for r in rows if r["model"] == name):
            after = ("", "") if r["method"] == "dense" else (f"{r['labels']:.2f} ({r['labels_it']})",
                                                             f"{r['distil']:.2f} ({r['distil_it']})")
            out.append(f"| {LABELS[name]} | {r['method']} | {calibration(r)} | {r['kept']:.1f} | {r['before']:.2f} "
                       f"| {after[0]} | {after[1]} |")
        p = PAPER[name]
        out.append(f"| {LABELS[name]} | dense, *paper* | | 100 | *{p['dense']:.2f}* | | |")
        out.append(f"| {LABELS[name]} | L-OBS, *paper* | | {p['kept']} | *{p['before']:.2f}* "
                   f"| *{p['after']:.2f} ({p['iterations']})* | |")
    out += ["", "Rows marked *paper* are figures quoted from Dong, Chen & Pan, *Learning to Prune Deep Neural "
            "Networks via Layer-wise Optimal Brain Surgeon* (NeurIPS 2017), Table 2, for their own LeNets; they "
            "were not measured here. Our dense models are more accurate than theirs (1.50% and 0.78% against "
            "1.76% and 1.27%), so compare the distances to each dense row as well as the errors. The LeNet-5 "
            "figures could not be checked against the paper's text when this page was generated.", "",
            "## Goals", "", "The goals are set for the OBS methods (lobs, obc); magnitude is the baseline.", ""]
    for name in RATIOS:
        text, limit = GOALS[name]
        for r in (r for r in rows if r["model"] == name and r["method"] != "dense"):
            bound = limit(r["dense"])
            verdict = "met" if r["labels"] <= bound + 1e-9 else f"missed by {r['labels'] - bound:.2f} points"
            mode = " (sequential)" if r["sequential"] else ""
            out.append(f"- {LABELS[name]}, {r['method']}{mode}, {r['kept']:.1f}% kept: {r['labels']:.2f}% after "
                       f"{r['labels_it']} iterations with labels; goal {text}, ≤ {bound:.2f}%: {verdict}.")
    out += ["", "## Keep ratios", "", "| model | layer | sparsity | kept % |", "|---|---|---|---|"]
    for name, ratios in RATIOS.items():
        out += [f"| {LABELS[name]} | {k.strip('*')} | {v} | {100 * (1 - v):.0f} |" for k, v in ratios.items()]
    out += ["", "LeNet-300-100 uses the ratios of the paper's released code. For LeNet-5 the paper gives only the "
            "overall 8%; these per-layer ratios reach 7.7% (the first convolution has few weights and is kept "
            "denser, the wide fc1 sparser).", ""]
    out += ["## Settings", "",
            "- Pruning: `onnx_lobs.prune` with the ratios above, calibrated on the bundled `models/mnist_calib.npz` "
            "(10,000 training images, one in ten held out); `--damp auto`; obc with `--sequential`.",
            f"- Retraining: `onnx_lobs.retrain`, Adam at lr {DEFAULT_LR:g} decayed to 0 by a cosine, batch 128, "
            "one epoch over 59,000 of the 60,000 training images (1,000 are held out for the report's held-out "
            "metrics), seed 0. The same settings for every row; pruned weights stay exactly zero.",
            f"- The learning rate is the default of `onnx-lobs retrain`, {DEFAULT_LR:g}, one setting for every row; "
            "the sweep below shows how it compares.", ""]
    if sweep_rows:
        out += ["## Learning rate", "", "lobs rows, retrained with labels for one epoch at other learning rates. "
                "The held-out loss is measured on the 1,000 held-out *training* images; the test error is shown "
                "for information only.", "",
                "| model | lr | held-out loss | held-out error % | test error % |", "|---|---|---|---|---|"]
        out += [f"| {LABELS[n]} | {lr:g} | {loss:.4f} | {herr:.2f} | {terr:.2f} |" for n, lr, loss, herr, terr in sweep_rows]
        out.append("")
        for name in RATIOS:
            mine = [r for r in sweep_rows if r[0] == name]
            best = min(mine, key=lambda r: r[2])
            default = next(r for r in mine if r[1] == DEFAULT_LR)
            out.append(f"- {LABELS[name]}: the lowest held-out loss is at lr {best[1]:g} (test error {best[4]:.2f}%); "
                       f"at the default {DEFAULT_LR:g} the test error is {default[4]:.2f}%.")
        out.append("")
    out += ["## Commands", "", "The same runs from the command line, for one row (LeNet-5, lobs):", "", "```",
            "python tools/train_mnist.py --mnist ../shared/data/mnist --no-train --out /tmp/mnist "
            "--export-train /tmp/mnist/train.npz",
            "onnx-lobs prune models/lenet5.onnx -o lenet5_lobs.onnx --method lobs " +
            " ".join(f"--layer-sparsity '{k}={v}'" for k, v in RATIOS["lenet5"].items()),
            "onnx-lobs retrain lenet5_lobs.onnx -o lenet5_lobs_labels.onnx --data /tmp/mnist/train.npz --epochs 1",
            "onnx-lobs retrain lenet5_lobs.onnx -o lenet5_lobs_distil.onnx --data /tmp/mnist/train.npz --epochs 1 "
            "--teacher models/lenet5.onnx",
            "onnx-lobs eval lenet5_lobs_labels.onnx --data models/mnist_test.npz", "```", "",
            f"Produced by `python tools/reproduce_paper.py` in {seconds / 60:.0f} min on {platform.machine()}, "
            f"{os.cpu_count()} cores (shared), torch {torch.__version__} with {threads} thread(s), onnx-lobs "
            f"{onnx_lobs.__version__}, Python {platform.python_version()}."]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", default=os.path.join(ROOT, "..", "shared", "data", "mnist"),
                    help="folder with the raw MNIST IDX files")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "paper_table.md"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (results may differ in the last bits)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the learning-rate section")
    args = ap.parse_args()
    try:
        torch, _ = require_torch()
    except onnx_lobs.LobsError as e:
        sys.exit(f"reproduce_paper: {e}")
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnx-lobs-mnist-") as folder:
        train = export_training_set(args.mnist, folder)
        rows = [r for name in RATIOS for r in rows_for(name, train)]
        sweep_rows = [] if args.no_sweep else list(sweep(rows, train))
    text = markdown(rows, sweep_rows, args.threads, time.perf_counter() - t)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
