#!/usr/bin/env python3
"""LLM-scale pruning: Llama-shaped decoders with random weights, built through transformers and
torch's dynamo exporter, pruned with sparsegpt; wall time by phase, peak RSS and held-out rel L2
of the logits, each run in a fresh subprocess.

Dev-only installs (never runtime dependencies): torch, transformers, onnxscript; onnxsim==0.8.1
for the peer.

    python tools/bench_llm.py build --shape 138m --out /tmp/llm138       # model.onnx + calib.npz
    python tools/bench_llm.py build --shape 138m --layers 16 --out /tmp/llm138x2
    python tools/bench_llm.py build --shape 1b --out /tmp/llm1b             # external data
    python tools/bench_llm.py run /tmp/llm138 --targets 2:4 0.5 --modes independent sequential
    python tools/bench_llm.py run /tmp/llm138 --targets 2:4 --onnxsim

Figures are printed as a table and written as JSON lines (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "138m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def build(args) -> None:
    """Export a random-weight LlamaForCausalLM (no KV cache) with dynamic batch and sequence."""
    import numpy as np
    import torch
    import transformers

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(**shape, tie_word_embeddings=args.tied, max_position_embeddings=4096,
                                      use_cache=False)
    model = transformers.LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.onnx")
    ids = torch.randint(0, shape["vocab_size"], (2, 16))

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    t = time.perf_counter()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(Logits(model), (ids,), dynamo=True, input_names=["input_ids"],
                                output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                                external_data=True, optimize=True)
    program.save(path, external_data=True)
    seconds = time.perf_counter() - t
    rng = np.random.default_rng(args.seed)
    calib = rng.integers(0, shape["vocab_size"], (args.sequences, args.tokens), dtype=np.int64)
    np.savez(os.path.join(args.out, "calib.npz"), input_ids=calib)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out) if f != "calib.npz")
    info = dict(shape=args.shape, **shape, tied=args.tied, params=params, file_bytes=size,
                export_seconds=round(seconds, 1), sequences=args.sequences, tokens=args.tokens)
    with open(os.path.join(args.out, "info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info))


CHILD = r"""
import json, resource, sys, time, warnings
import onnx_lobs
from onnx_lobs.cli import main
args = json.loads(sys.argv[1])
t = time.perf_counter()
code = 0
try:
    main(args["argv"])
except SystemExit as e:
    code = e.code
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
json.dump({"code": code, "peak_kib": peak, "wall": time.perf_counter() - t}, open(args["out"], "w"))
"""

ONNXSIM = r"""
import json, resource, sys, time
import numpy as np, onnx, onnxsim
args = json.loads(sys.argv[1])
model = onnx.load(args["model"])
ids = np.load(args["calib"])["input_ids"]
calib = [{"input_ids": ids[i:i + 1]} for i in range(len(ids))]
nm = {"n": args["n"], "m": args["m"]} if args.get("n") else {"sparsity": args["sparsity"]}
t = time.perf_counter()
out = onnxsim.apply_sparsegpt_pruning(model, calibration_data=calib, num_samples=len(calib), **nm)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
json.dump({"code": 0, "peak_kib": peak, "wall": wall}, open(args["out"], "w"))
"""


def _child(script: str, payload: dict) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    payload = dict(payload, out=out)
    try:
        subprocess.run([sys.executable, "-c", script, json.dumps(payload)], check=False, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)


def run(args) -> None:
    info = json.load(open(os.path.join(args.model, "info.json")))
    model = os.path.join(args.model, "model.onnx")
    calib = os.path.join(args.model, "calib.npz")
    rows = []
    for target in args.targets:
        for mode in args.modes:
            for workers, executor in [(w, "local") for w in args.workers] + [(1, "ray")] * args.ray:
                with tempfile.TemporaryDirectory() as tmp:
                    out, report = os.path.join(tmp, "out.onnx"), os.path.join(tmp, "report.json")
                    argv = ["prune", model, "-o", out, "--calib", calib, "--method", "sparsegpt", "--quiet",
                            f"--{mode}", "--report", report, "--batch-size", str(args.batch_size)]
                    argv += ["--pattern", target] if ":" in target else ["--sparsity", target, "--allocation",
                                                                         "uniform"]
                    if args.memory_budget:
                        argv += ["--memory-budget", args.memory_budget]
                    if workers != 1:
                        argv += ["--workers", str(workers)]
                    if executor == "ray":  # a local cluster of this machine's CPUs, started by the run
                        argv += ["--executor", "ray"]
                    got = _child(CHILD, {"argv": argv})
                    rep = json.load(open(report)) if got["code"] == 0 else {}
                row = dict(model=info["shape"], layers=info["num_hidden_layers"], file_mb=info["file_bytes"] / 2 ** 20,
                           target=target, mode=mode, workers=workers, executor=executor, code=got["code"],
                           wall=got["wall"],
                           peak_mb=got["peak_kib"] / 1024, peak_ratio=got["peak_kib"] * 1024 / info["file_bytes"],
                           rel_l2=(rep.get("fidelity") or {}).get("rel_l2"),
                           timings={k: round(v, 1) for k, v in (rep.get("timings") or {}).items()},
                           memory=rep.get("memory"))
                rows.append(row)
                _show(row)
    if args.onnxsim:
        for target in args.targets:
            n, m = (int(x) for x in target.split(":")) if ":" in target else (None, None)
            got = _child(ONNXSIM, {"model": model, "calib": calib, "n": n, "m": m,
                                   "sparsity": None if n else float(target)})
            row = dict(model=info["shape"], layers=info["num_hidden_layers"], file_mb=info["file_bytes"] / 2 ** 20,
                       target=target, mode="onnxsim", workers=1, executor="onnxsim", code=got["code"],
                       wall=got["wall"],
                       peak_mb=got["peak_kib"] / 1024, peak_ratio=got["peak_kib"] * 1024 / info["file_bytes"],
                       rel_l2=None, timings={}, memory=None)
            rows.append(row)
            _show(row)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def _show(row: dict) -> None:
    t = row["timings"]
    phases = " ".join(f"{k} {v}" for k, v in t.items() if k != "total")
    rel = "-" if row["rel_l2"] is None else f"{row['rel_l2']:.4f}"
    print(f"{row['model']} x{row['layers']} {row['target']:>4} {row['mode']:<11} w{row['workers']} {row['executor']} "
          f"exit {row['code']}: "
          f"{row['wall']:.1f} s, peak {row['peak_mb']:.0f} MB{' (driver)' if row['executor'] == 'ray' else ''} ({row['peak_ratio']:.2f}x file), rel L2 {rel}; "
          f"{phases}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--shape", choices=sorted(SHAPES), default="138m")
    b.add_argument("--layers", type=int, help="override the layer count")
    b.add_argument("--tied", action="store_true", help="tie lm_head to the embedding")
    b.add_argument("--sequences", type=int, default=32)
    b.add_argument("--tokens", type=int, default=256)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("model", help="a folder made by build")
    r.add_argument("--targets", nargs="+", default=["2:4", "0.5"])
    r.add_argument("--modes", nargs="*", default=["independent", "sequential"], help="none: only the peer")
    r.add_argument("--workers", nargs="+", type=int, default=[1])
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--ray", type=int, default=0, metavar="0|1", help="also run on a local Ray cluster")
    r.add_argument("--memory-budget")
    r.add_argument("--onnxsim", action="store_true")
    r.add_argument("--json")
    args = p.parse_args()
    build(args) if args.cmd == "build" else run(args)


if __name__ == "__main__":
    main()
