#!/usr/bin/env python3
"""Check that a refactor changes no result: prune a fixed set of models under every configuration
with two versions of the code and compare the outputs byte for byte and the reports exactly.

    python tools/check_unchanged.py --base 7e97c23                  # BASE against the work tree
    python tools/check_unchanged.py --base 7e97c23 --head 7e97c23   # a revision against itself
    python tools/check_unchanged.py --base main~3 --only 'lenet*' --jobs 2 --json out.json

Cases: every model x method (lobs, obc, sparsegpt, wanda, magnitude) x pattern (--sparsity 0.5,
--pattern 2:4) x mode (independent, --sequential), each run as `onnx-lobs prune ... --quiet
--report report.json`, everything else default. Models: every entry of tests/corpus (its own
`samples` calibration samples, as tests/corpus/run.py makes them), both bundled LeNets with
models/mnist_calib.npz and `--samples 640`, and `resnet18s`: ResNet-18's topology as
tools/bench_speed.py builds it (7x7 stride-2 stem, max-pool, 4 stages of 2 basic blocks, 1x1
stride-2 shortcuts, global pool, Gemm head with 1000 classes; bench_speed's `Net`), reduced so that
obc finishes in minutes: channel widths divided by 4 (16/32/64/128), a 64x64 input, and 32
standard-normal images (seed 0) as calibration data.

Inputs are generated once, with the work tree's code, into <workdir>/inputs/ (manifest.json holds
their sha256), so both sides prune the same files. Each side runs each case in a subprocess
(`python -c "... from onnx_lobs.cli import main; main()"`) with PYTHONPATH=<tree root> (BASE: a
`git worktree add --detach` under <workdir>/trees/<sha>), cwd a fresh scratch folder that becomes
the case's result folder, and OMP/OPENBLAS/MKL_NUM_THREADS=1 on both sides. Results of a revision
are cached in <workdir>/results/<sha>/<case>/ (keyed by command line and input digests;
--force-base reruns BASE); the work tree always reruns, into <workdir>/results/head/. When --head
names the same revision as --base it still runs separately (results/<sha>.head/), so the check is
a real determinism test. Output files over 256 MB (the corpus's 2 GB external-data model) are
hashed and then deleted, to save disk; their sha256 stays in result.json. On that model (10 GB
peak RSS, minutes a run, mostly I/O) only lobs runs unless --all-heavy; heavy cases run one at a
time and wait for 12 GB of free memory; a run killed by a signal (the OOM killer on a shared
machine) is retried once. One instance per workdir (<workdir>/.lock).

A case is identical when the .onnx and any .data have equal sha256 and the reports are equal
(exact floats) after dropping `timings`, `versions` and every layer's `seconds`. A case failing on
both sides with the same exit code and last stderr line (object addresses, 0x... or 12+ digit
numbers as id() prints them, masked) counts as "fails on both". Exit code 1 if any case differs.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("lobs", "obc", "sparsegpt", "wanda", "magnitude")
PATTERNS = {"s0.5": ["--sparsity", "0.5"], "2of4": ["--pattern", "2:4"]}
MODES = {"independent": [], "sequential": ["--sequential"]}
THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
KEEP_LIMIT = 256 << 20  # output files larger than this are hashed, then deleted
HEAVY_AT_ONCE = 1  # cases on an external-data model (large_external: 10 GB peak RSS) running at once
HEAVY_GB = 12  # memory available before a heavy case starts (waiting at most 10 minutes)
SHOWN = 5  # differences printed per case
COSTS = {"resnet18": 80, "large_external": 60, "resnet18s": 40, "lenet5": 20, "lenet300": 10}  # slowest first


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True, text=True).stdout.strip()


# ----------------------------------------------------------------------------- inputs

def resnet18_small(seed: int = 0):
    """ResNet-18 (bench_speed.resnet((2, 2, 2, 2), False)) at a quarter of the widths, 64x64 input."""
    import math
    from onnx import TensorProto, checker, helper
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench_speed import Net

    net, side = Net(seed), 64
    x, hw = net.conv("input", (side, side), 3, 16, 7, stride=2)
    x = net.op("MaxPool", [net.relu(x)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    hw, cin, gain = tuple((s + 2 - 3) // 2 + 1 for s in hw), 16, 1.0 / math.sqrt(8)
    for stage, width in enumerate((16, 32, 64, 128)):
        for i in range(2):
            stride = 2 if stage > 0 and i == 0 else 1
            y, h2 = net.conv(x, hw, cin, width, 3, stride)
            y, h2 = net.conv(net.relu(y), h2, width, width, 3, gain=gain)
            skip = x if stride == 1 and cin == width else net.conv(x, hw, cin, width, 1, stride)[0]
            x, hw, cin = net.relu(net.op("Add", [y, skip])), h2, width
    net.head(x, cin)
    graph = helper.make_graph(net.nodes, "resnet18s",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, side, side])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    checker.check_model(model)
    return model


def full_resnet18(folder: str) -> dict:
    """The full-size ResNet-18 of tools/bench_speed.py (224x224, 32 random-normal images, seed 0),
    built once into folder; an opt-in model (--full-resnet18): exact OBS takes hours on it."""
    import numpy as np
    import onnx
    path, calib = os.path.join(folder, "resnet18.onnx"), os.path.join(folder, "resnet18.npz")
    if not os.path.exists(calib):
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        from bench_speed import resnet
        onnx.save_model(resnet((2, 2, 2, 2), False).model(), path)
        x = np.random.default_rng(0).standard_normal((32, 3, 224, 224), dtype=np.float32)
        np.savez(calib, input=x)
    return {"model": path, "calib": calib, "args": [], "digest": [sha256(path), sha256(calib)]}


def make_inputs(folder: str) -> dict:
    """name -> {model, calib, args, digest}; built once, then read from manifest.json (names relative)."""
    manifest = os.path.join(folder, "manifest.json")
    if not os.path.exists(manifest):
        build_inputs(folder, manifest)
    with open(manifest) as f:
        models = json.load(f)
    for m in models.values():
        m["model"], m["calib"] = (os.path.join(folder, m[k]) for k in ("model", "calib"))
    return models


def build_inputs(folder: str, manifest: str) -> None:
    import numpy as np
    import onnx
    sys.path.insert(0, ROOT)
    from tests.corpus import ENTRIES

    os.makedirs(folder, exist_ok=True)
    models = {}
    for e in ENTRIES:
        print(f"inputs: {e.name}", file=sys.stderr)
        path = e.model_path(folder)
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):  # a committed file
            path = shutil.copy(path, os.path.join(folder, f"{e.name}.onnx"))
        np.savez(os.path.join(folder, f"{e.name}.npz"), **e.calibration(e.samples, path))
        models[e.name] = {"model": f"{e.name}.onnx", "calib": f"{e.name}.npz", "args": []}
    shutil.copy(os.path.join(ROOT, "models", "mnist_calib.npz"), folder)
    for name in ("lenet300", "lenet5"):
        shutil.copy(os.path.join(ROOT, "models", f"{name}.onnx"), folder)
        models[name] = {"model": f"{name}.onnx", "calib": "mnist_calib.npz", "args": ["--samples", "640"]}
    try:
        model = resnet18_small()
    except ImportError as e:  # bench_speed imports onnx_lobs: a work tree mid-refactor may not import
        sys.exit(f"check_unchanged: cannot build resnet18s with tools/bench_speed.py: {e}")
    onnx.save(model, os.path.join(folder, "resnet18s.onnx"))
    np.savez(os.path.join(folder, "resnet18s.npz"),
             input=np.random.default_rng(0).standard_normal((32, 3, 64, 64), dtype=np.float32))
    models["resnet18s"] = {"model": "resnet18s.onnx", "calib": "resnet18s.npz", "args": []}
    for m in models.values():
        files = [m["model"], m["model"] + ".data", m["calib"]]
        m["digest"] = [sha256(os.path.join(folder, p)) for p in files if os.path.exists(os.path.join(folder, p))]
    with open(manifest + ".tmp", "w") as f:
        json.dump(models, f, indent=1)
    os.replace(manifest + ".tmp", manifest)


HEAVY_METHODS = ("lobs",)  # an external-data model costs minutes a run, all in I/O: one method by default


def make_cases(models: dict, all_heavy: bool = False) -> list[dict]:
    cases = []
    for model, m in models.items():
        heavy = os.path.exists(m["model"] + ".data")
        full = model == "resnet18"
        for method in (METHODS if all_heavy or not heavy else HEAVY_METHODS):
            if full and method == "obc" and not all_heavy:
                continue
            for pattern, pargs in PATTERNS.items():
                for mode, margs in MODES.items():
                    argv = ["prune", m["model"], "-o", "pruned.onnx", "--calib", m["calib"], *pargs,
                            "--method", method, *margs, *m["args"], "--report", "report.json", "--quiet"]
                    cost = COSTS.get(model, 1)
                    cost *= (4 if method == "obc" else 1) * (2 if mode == "sequential" else 1)
                    cases.append({"name": f"{model}-{method}-{pattern}-{mode}", "argv": argv, "cost": cost,
                                  "heavy": int(heavy),
                                  "key": {"argv": argv, "inputs": m["digest"], "env": THREADS}})
    return cases


# ----------------------------------------------------------------------------- running one side

def side(rev: str | None, workdir: str, base_sha: str | None = None) -> dict:
    """A version of the code: where it lives, where its results go, whether they are cached."""
    if rev is None:
        return {"label": "worktree", "sha": None, "root": ROOT, "results": os.path.join(workdir, "results", "head"),
                "cached": False}
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = os.path.join(workdir, "trees", sha)
    if not os.path.isdir(tree):
        os.makedirs(os.path.dirname(tree), exist_ok=True)
        git("worktree", "add", "--detach", tree, sha)
    if git("-C", tree, "rev-parse", "HEAD") != sha:
        sys.exit(f"check_unchanged: {tree} is not at {sha}")
    results = os.path.join(workdir, "results", sha + (".head" if sha == base_sha else ""))
    return {"label": f"{rev} ({sha[:10]})", "sha": sha, "root": tree, "results": results, "cached": True}


def environment(root: str) -> dict:
    return dict(os.environ, PYTHONPATH=root, **THREADS)


def check_import(s: dict, scratch: str) -> None:
    """The subprocess must import onnx_lobs from the intended tree (the venv has an editable install)."""
    p = subprocess.run([sys.executable, "-c", "import onnx_lobs; print(onnx_lobs.__file__)"], cwd=scratch,
                       env=environment(s["root"]), capture_output=True, text=True)
    where = p.stdout.strip()
    print(f"{s['label']}: onnx_lobs from {where or (p.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
    if p.returncode == 0 and not os.path.realpath(where).startswith(os.path.realpath(s["root"]) + os.sep):
        sys.exit(f"check_unchanged: {s['label']} imports onnx_lobs from {where}, not from {s['root']}")


def cached(case: dict, s: dict) -> dict | None:
    result = read_json(os.path.join(s["results"], case["name"], "result.json"))
    return result if result and result.get("key") == case["key"] else None


def read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_case(case: dict, s: dict) -> dict:
    final = os.path.join(s["results"], case["name"])
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    code = f"import sys; sys.argv = {['onnx-lobs', *case['argv']]!r}; from onnx_lobs.cli import main; main()"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=environment(s["root"]),
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t
    for name, text in (("stdout.txt", p.stdout), ("stderr.txt", p.stderr)):
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    files = {}
    for name in ("pruned.onnx", "pruned.onnx.data"):
        path = os.path.join(tmp, name)
        if os.path.exists(path):
            files[name] = sha256(path)
            if os.path.getsize(path) > KEEP_LIMIT:
                os.remove(path)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    result = {"key": case["key"], "rc": p.returncode, "seconds": round(seconds, 2), "files": files,
              "last_stderr": lines[-1] if lines else ""}
    with open(os.path.join(tmp, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return result


def run_all(tasks: list, sides: tuple, finish, jobs: int) -> None:
    """Run (case, side index) tasks in order, `jobs` at a time, at most HEAVY_AT_ONCE heavy ones."""
    queue, cond, busy = list(tasks), threading.Condition(), [0]

    def worker():
        while True:
            with cond:
                while True:
                    task = next((t for t in queue if not (t[0]["heavy"] and busy[0] >= HEAVY_AT_ONCE)), None)
                    if task or not queue:
                        break
                    cond.wait()
                if task is None:
                    return
                queue.remove(task)
                busy[0] += task[0]["heavy"]
            for attempt in range(2):  # a run killed by a signal (OOM killer) is retried once
                if task[0]["heavy"]:
                    wait_for_memory(HEAVY_GB)
                try:
                    result = run_case(task[0], sides[task[1]])
                except Exception as e:  # the tool's own failure (disk, git): recorded as a failed run
                    result = {"rc": "tool error", "seconds": 0.0, "files": {}, "last_stderr": repr(e)}
                if not (isinstance(result["rc"], int) and result["rc"] < 0):
                    break
            with cond:
                busy[0] -= task[0]["heavy"]
                finish(task, result)
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_for_memory(gb: float, limit: float = 600) -> None:
    t = time.time()
    while time.time() - t < limit:
        with open("/proc/meminfo") as f:
            if next(int(v.split()[1]) for v in f if v.startswith("MemAvailable:")) >= gb * 2 ** 20:
                return
        time.sleep(10)


# ----------------------------------------------------------------------------- comparing

def stripped(report: dict) -> dict:
    report = {k: v for k, v in report.items() if k not in ("timings", "versions")}
    report["layers"] = [{k: v for k, v in r.items() if k != "seconds"} for r in report.get("layers", [])]
    return report


def differences(a, b, path: str = "$") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: {'missing' if k not in a else repr(a[k])} != "
                           f"{'missing' if k not in b else repr(b[k])}")
            else:
                out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = [f"{path}: length {len(a)} != {len(b)}"] if len(a) != len(b) else []
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]")
        return out
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]


def report_of(case: dict, s: dict) -> dict | None:
    report = read_json(os.path.join(s["results"], case["name"], "report.json"))
    return None if report is None else stripped(report)


def compare(case: dict, base: dict, head: dict, sides: tuple) -> dict:
    out = {"name": case["name"], "seconds": [base["seconds"], head["seconds"]], "rc": [base["rc"], head["rc"]],
           "model_identical": None, "report_identical": None, "differences": []}
    if base["rc"] or head["rc"]:
        same = base["rc"] == head["rc"] and unaddressed(base["last_stderr"]) == unaddressed(head["last_stderr"])
        out["status"] = "fails on both" if same else "differs"
        out["differences"] = [f"{s['label']}: exit {r['rc']}: {r['last_stderr']}" for s, r in zip(sides, (base, head))
                              if r["rc"] or not same]
        return out
    out["model_identical"] = base["files"] == head["files"] and bool(base["files"])
    if not out["model_identical"]:
        out["differences"].append(f"files: {base['files']} != {head['files']}")
    a, b = (report_of(case, s) for s in sides)
    diffs = differences(a, b) if a is not None and b is not None else ["report.json missing"]
    out["report_identical"] = not diffs
    out["differences"] += diffs
    out["status"] = "identical" if out["model_identical"] and out["report_identical"] else "differs"
    return out


def unaddressed(text: str) -> str:
    """An error line without object addresses (`KeyError: 140505823575104` from a dict keyed by id())."""
    return re.sub(r"0x[0-9a-fA-F]{6,}|\b\d{12,}\b", "<address>", text)


def line(c: dict) -> str:
    yes = {True: "yes", False: "no", None: "-"}
    text = (f"{c['name']:<44} model {yes[c['model_identical']]:<3} report {yes[c['report_identical']]:<3} "
            f"{c['seconds'][0]:7.1f} / {c['seconds'][1]:7.1f} s  {c['status']}")
    return "\n".join([text] + [f"    {d}" for d in c["differences"][:SHOWN]] +
                     ([f"    ... {len(c['differences']) - SHOWN} more"] if len(c["differences"]) > SHOWN else []))


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--head", help="git revision (default: the work tree of this checkout)")
    ap.add_argument("--workdir", default="/work/bench/unchanged")
    ap.add_argument("--only", action="append", metavar="GLOB", help="case names to run (repeatable)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--force-base", action="store_true", help="rerun BASE even where its results are cached")
    ap.add_argument("--json", metavar="OUT", help="write a machine-readable summary")
    ap.add_argument("--full-resnet18", action="store_true",
                    help="also the full-size ResNet-18 (every method but obc unless --all-heavy)")
    ap.add_argument("--all-heavy", action="store_true",
                    help="every method on external-data models too (default: %s only)" % ", ".join(HEAVY_METHODS))
    args = ap.parse_args()
    start = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(f"check_unchanged: another instance is running on {workdir}")
    base = side(args.base, workdir)
    head = side(args.head, workdir, base_sha=base["sha"])
    models = make_inputs(os.path.join(workdir, "inputs"))
    if args.full_resnet18:
        models["resnet18"] = full_resnet18(os.path.join(workdir, "inputs"))
    cases = make_cases(models, args.all_heavy)
    if args.only:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c["name"], g) for g in args.only)]
    if not cases:
        sys.exit("check_unchanged: no case matches --only")

    done = {}  # (case name, side index) -> result
    tasks = []  # heaviest first; a case's two sides one after the other
    for c in sorted(cases, key=lambda c: -c["cost"]):
        for i, s in enumerate((base, head)):
            hit = None if (i == 0 and args.force_base) or not s["cached"] else cached(c, s)
            tasks += [(c, i)] if hit is None else []
            done.update({(c["name"], i): hit} if hit else {})
    scratch = os.path.join(workdir, "scratch")
    os.makedirs(scratch, exist_ok=True)
    for i, s in enumerate((base, head)):
        os.makedirs(s["results"], exist_ok=True)
        if any(j == i for _, j in tasks):
            check_import(s, scratch)
    print(f"{len(cases)} cases, {len(tasks)} runs ({len(done)} cached), {args.jobs} at a time", file=sys.stderr)

    finished = []

    def finish(task, r):
        (c, i), note = task, ""
        done[c["name"], i] = r
        finished.append(c["name"])
        if (c["name"], 1 - i) in done:
            note = f" -> {compare(c, done[c['name'], 0], done[c['name'], 1], (base, head))['status']}"
        print(f"[{len(finished)}/{len(tasks)} {time.perf_counter() - start:6.0f} s] {('base', 'head')[i]} "
              f"{c['name']}: exit {r['rc']}, {r['seconds']:.1f} s{note}", file=sys.stderr, flush=True)

    run_all(tasks, (base, head), finish, max(1, args.jobs))
    ordered = [compare(c, done[c["name"], 0], done[c["name"], 1], (base, head)) for c in cases]
    print(f"base {base['label']}, head {head['label']}")
    for c in ordered:
        print(line(c))
    n = {k: sum(1 for c in ordered if test(c)) for k, test in (
        ("models", lambda c: c["model_identical"] is True), ("reports", lambda c: c["report_identical"] is True),
        ("differ", lambda c: c["status"] == "differs"), ("both", lambda c: c["status"] == "fails on both"))}
    total = time.perf_counter() - start
    print(f"{len(ordered)} cases: {n['models']} identical models, {n['reports']} identical reports, "
          f"{n['differ']} differ, {n['both']} fail on both  ({total:.0f} s)")
    if args.json:
        summary = {"base": {k: base[k] for k in ("label", "sha", "root")},
                   "head": {k: head[k] for k in ("label", "sha", "root")},
                   "cases": ordered, "summary": {"cases": len(ordered), **n}, "seconds": round(total, 1)}
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if n["differ"] else 0


if __name__ == "__main__":
    sys.exit(main())
