#!/usr/bin/env python3
"""Time two versions of the code on the same benchmark in one run: tools/bench_speed.py of a BASE
revision (a git worktree) and of the work tree (or --head REV), alternately, ROUNDS times each.

Each run is a fresh process of that tree's own bench_speed.py (which imports its own onnx_lobs),
so both see the same machine load over the run. Printed: every run's phase seconds, then per phase
the median of each side and the ratio head / base (below 1: head is faster).

    python tools/bench_versions.py --base 7e97c23                        # ResNet-50, sparsegpt, 3 rounds
    python tools/bench_versions.py --base main~1 --rounds 5 -- --model resnet18 --samples 64
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASE = re.compile(r"^\s*(load|prepare|forward|hessian|solve|verify|total)\s+([0-9.]+)")


def tree(rev: str | None, workdir: str) -> str:
    if rev is None:
        return ROOT
    sha = subprocess.check_output(["git", "-C", ROOT, "rev-parse", rev], text=True).strip()
    path = os.path.join(workdir, sha)
    if not os.path.isdir(path):
        subprocess.check_call(["git", "-C", ROOT, "worktree", "add", "--detach", path, sha],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def run(root: str, args: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_speed.py"), *args],
                         cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_versions: {root}: bench_speed failed:\n{out.stderr[-2000:]}")
    return {m.group(1): float(m.group(2)) for m in map(PHASE.match, out.stdout.splitlines()) if m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--head", help="revision (default: the work tree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/work/bench/trees")
    ap.add_argument("bench_args", nargs="*", help="arguments for bench_speed.py (after --)")
    args = ap.parse_args()
    sides = {"base": tree(args.base, args.workdir), "head": tree(args.head, args.workdir)}
    times: dict[str, list[dict]] = {"base": [], "head": []}
    for r in range(args.rounds):
        for side in ("base", "head") if r % 2 == 0 else ("head", "base"):
            t = run(sides[side], args.bench_args)
            times[side].append(t)
            print(f"round {r + 1} {side}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)
    print(f"\n{'phase':>10} {'base s':>9} {'head s':>9} {'head/base':>10}   (medians of {args.rounds} runs)")
    for phase in times["base"][0]:
        b = statistics.median(t[phase] for t in times["base"])
        h = statistics.median(t[phase] for t in times["head"])
        print(f"{phase:>10} {b:9.2f} {h:9.2f} {h / b if b else float('nan'):10.3f}")


if __name__ == "__main__":
    main()
