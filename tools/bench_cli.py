#!/usr/bin/env python3
"""Every method, unstructured and N:M, through the command line on the benchmark CNN.

Builds the model of tools/bench_speed.py (ResNet-50 by default, random He weights), writes it
with random calibration images and a separate held-out set, then for each method and pattern
runs `onnx-lobs prune` and `onnx-lobs eval --reference` as a user would (separate processes),
and prints one row each: wall seconds of the prune command, its solve phase, its peak RSS,
the sparsity reached, layers pruned / skipped, and the held-out fidelity from `eval`.
The rows are also written as JSON when --json is given.

    python tools/bench_cli.py                                    # ResNet-50, all 5 methods, 50% and 2:4
    python tools/bench_cli.py --model resnet18 --methods obc --patterns 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_speed import MODELS  # noqa: E402

METHODS = ("magnitude", "wanda", "lobs", "sparsegpt", "obc")


class _Popen(subprocess.Popen):
    """Popen that keeps its child's own peak RSS: wait4 gives each child's rusage, where
    RUSAGE_CHILDREN would give the largest child so far."""

    peak_mb = float("nan")

    def _try_wait(self, wait_flags):
        pid, status, usage = os.wait4(self.pid, wait_flags)
        if pid == self.pid:
            self.peak_mb = usage.ru_maxrss / 1024  # Linux: KB
        return pid, status


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one command; stops the script on failure."""
    t = time.perf_counter()
    proc = _Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.strip()}")
    return wall, proc.peak_mb, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--patterns", default="0.5,2:4", help="comma-separated sparsities and/or N:M patterns")
    ap.add_argument("--samples", type=int, default=128, help="calibration images")
    ap.add_argument("--held-out", type=int, default=64, help="held-out images for eval")
    ap.add_argument("--extra", default="", help="more prune options, e.g. '--sequential'")
    ap.add_argument("--workdir", help="keep the model, data and outputs here (default: a temp dir)")
    ap.add_argument("--json", dest="json_path", help="also write the rows here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        model = os.path.join(work, f"{args.model}.onnx")
        calib, held = os.path.join(work, "calib.npz"), os.path.join(work, "held.npz")
        onnx.save_model(MODELS[args.model]().model(), model)
        for path, n, seed in ((calib, args.samples, 0), (held, args.held_out, 1)):
            x = np.random.default_rng(seed).standard_normal((n, 3, 224, 224), dtype=np.float32)
            np.savez(path, input=x)
        cli = [sys.executable, "-m", "onnx_lobs"]
        print(f"model {args.model}, {args.samples} calibration + {args.held_out} held-out random images, "
              f"{os.cpu_count()} cpus, {args.extra or 'independent'}")
        print(f"{'method':>10} {'pattern':>7} {'prune s':>8} {'solve s':>8} {'peak MB':>8} {'sparsity':>8} "
              f"{'layers':>7} {'rel_l2':>7} {'cosine':>7} {'top1 agr':>8}")
        rows = []
        for method in args.methods.split(","):
            for pattern in args.patterns.split(","):
                out = os.path.join(work, f"{method}-{pattern.replace(':', 'of')}.onnx")
                rep = out[:-5] + ".json"
                how = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
                wall, peak, _ = run(cli + ["prune", model, "-o", out, "--calib", calib, "--method", method,
                                           "--report", rep, "--quiet", *how, *args.extra.split()])
                _, _, text = run(cli + ["eval", out, "--data", held, "--reference", model, "--json"])
                fid = json.loads(text)
                with open(rep) as f:
                    report = json.load(f)
                pruned = sum(1 for r in report["layers"] if r["skipped"] is None)
                row = {"method": method, "pattern": pattern, "prune_seconds": wall,
                       "solve_seconds": report["timings"].get("solve"), "peak_mb": peak,
                       "sparsity": report["sparsity"], "layers_pruned": pruned,
                       "layers_skipped": len(report["layers"]) - pruned, **{k: fid[k] for k in
                                                                            ("rel_l2", "cosine", "top1_agreement")}}
                rows.append(row)
                print(f"{method:>10} {pattern:>7} {wall:8.1f} {row['solve_seconds']:8.1f} {peak:8.0f} "
                      f"{row['sparsity']:8.4f} {pruned:>3}/{len(report['layers']):<3} {fid['rel_l2']:7.4f} "
                      f"{fid['cosine']:7.4f} {fid['top1_agreement']:8.3f}", flush=True)
                if not args.workdir:
                    os.remove(out)
                if args.json_path:  # after every row: an obc run on a big model can take hours
                    with open(args.json_path, "w") as f:
                        json.dump({"model": args.model, "samples": args.samples, "held_out": args.held_out,
                                   "extra": args.extra, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
