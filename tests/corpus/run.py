"""Run one corpus entry through the tool and gather everything the four conditions look at.

Shared by tests/test_corpus.py (which asserts) and tools/corpus_table.py (which prints). The
default method goes through the command line (inspect --json, prune --report), magnitude and
2:4 through the Python API, so both faces of the tool are exercised on every model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lobs import PruneConfig, prune, save_model
from onnx_lobs.cli import main

from . import Entry, census


@dataclass
class Run:
    """One pruning run: its report and what the independent checks found in its output."""

    report: dict
    problems: list[str]  # structure: anything beyond weights and one metadata entry
    outputs: list[tuple]  # (name, dtype, shape) of the output model on a few inputs

    @property
    def rel_l2(self) -> float | None:
        return (self.report.get("fidelity") or {}).get("rel_l2")

    def pruned(self) -> list[dict]:
        return [r for r in self.report["layers"] if not r["skipped"] and (r["sparsity"] or 0) > 0]


@dataclass
class Outcome:
    entry: Entry
    path: str
    opset: int
    census: census.Census
    inspect: dict  # the CLI's inspect --json
    lobs: Run
    magnitude: Run
    nm: Run
    nm_violations: list[str]
    reference_outputs: list[tuple]
    input_unchanged: bool
    seconds: float


def cli(*args: str) -> str:
    """The command line in-process; its stdout, or an AssertionError with its stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code
    if code:
        raise AssertionError(f"onnx-lobs {' '.join(args[:2])} exited {code}: {err.getvalue().strip()}")
    return out.getvalue()


class Reader:
    """onnxruntime's CalibrationDataReader protocol over per-sample arrays: arr[i] is one feed."""

    def __init__(self, arrays: dict):
        self.arrays, self.i = arrays, 0

    def get_next(self):
        n = len(next(iter(self.arrays.values())))
        if self.i >= n:
            return None
        self.i += 1
        return {k: np.asarray(v[self.i - 1]) for k, v in self.arrays.items()}


def digest(path: str) -> str:
    h = hashlib.sha256()
    for p in (path, path + ".data"):
        if os.path.exists(p):
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def calibration(entry: Entry, model: str, folder: str):
    """(arrays, .npz path) of the entry's calibration samples."""
    arrays = entry.calibration(entry.samples, model)
    path = os.path.join(folder, f"{entry.name}.npz")
    np.savez(path, **arrays)
    return arrays, path


def sample_feed(entry: Entry, arrays: dict) -> dict:
    if entry.per_sample:
        return {k: np.asarray(v[0]) for k, v in arrays.items()}
    return {k: v[:3] for k, v in arrays.items()}


def run_outputs(model, feed: dict) -> list[tuple]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    outs = sess.run(None, feed)
    return [(o.name, a.dtype.str, a.shape) for o, a in zip(sess.get_outputs(), outs)]


def check_output(original: onnx.ModelProto, original_dir: str, pruned, allowed: set,
                 feed: dict) -> tuple[list[str], list[tuple]]:
    """The independent checks of condition 3 on one written model (a path, or a ModelProto in memory).

    Models are read without their external data; values are compared through their files.
    """
    model = onnx.load(pruned, load_external_data=False) if isinstance(pruned, str) else pruned
    problems = []
    try:
        onnx.checker.check_model(pruned if isinstance(pruned, str) else model)
    except Exception as e:  # the checker raises several types
        problems.append(f"onnx.checker: {str(e).splitlines()[0]}")
    folder = os.path.dirname(os.path.abspath(pruned)) if isinstance(pruned, str) else None
    problems += census.structure_problems(original, model, allowed, original_dir, folder)
    outputs = run_outputs(pruned if isinstance(pruned, str) else model, feed)
    return problems, outputs


def run_entry(entry: Entry, folder: str) -> Outcome:
    t0 = time.perf_counter()
    path = entry.model_path(folder)
    before = digest(path)
    original = onnx.load(path, load_external_data=False)
    where = os.path.dirname(os.path.abspath(path))
    counted = census.count(original)
    allowed = counted.allowed_keys()
    arrays, npz = calibration(entry, path, folder)
    feed = sample_feed(entry, arrays)
    reference = run_outputs(path, feed)

    inspect = json.loads(cli("inspect", path, "--json"))

    def data():  # a fresh source per run
        return Reader(arrays) if entry.per_sample else npz

    out = os.path.join(folder, f"{entry.name}.lobs.onnx")
    if entry.per_sample:  # here through the reader protocol; test_corpus reads their .npz through the CLI
        result = prune(path, data(), PruneConfig(seed=0))
        save_model(result.model, out, external=True if result.external_data else None)
        report = result.report.to_dict()
    else:
        rpath = os.path.join(folder, f"{entry.name}.lobs.json")
        cli("prune", path, "-o", out, "--calib", npz, "--sparsity", "0.5", "--report", rpath, "--quiet", "--seed", "0")
        with open(rpath) as f:
            report = json.load(f)
    lobs = Run(report, *check_output(original, where, out, allowed, feed))
    _remove(out)

    runs = {}
    for label, config in (("magnitude", PruneConfig(method="magnitude", seed=0)),
                          ("nm", PruneConfig(pattern=(2, 4), seed=0))):
        result = prune(path, data(), config)
        runs[label] = Run(result.report.to_dict(), *check_output(original, where, result.model, allowed, feed))
        if label == "nm":
            violations = census.nm_violations(result.model, counted)
        del result
    opset = next(o.version for o in original.opset_import if o.domain in ("", "ai.onnx"))
    unchanged = digest(path) == before
    if entry.slow:  # gigabytes: do not leave them in the test's temporary folders
        _remove(path)
    return Outcome(entry, path, opset, counted, inspect, lobs, runs["magnitude"], runs["nm"], violations, reference,
                   unchanged, time.perf_counter() - t0)


def _remove(path: str) -> None:
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)
