"""The model corpus (tests/corpus) against the four conditions of issue 5, model by model.

1. inspect finds every Conv/ConvTranspose/Gemm/MatMul with a constant weight, or names why not
   (held against an independent count, tests/corpus/census.py);
2. prune --sparsity 0.5 succeeds with the default method, and with --pattern 2:4;
3. the output passes onnx.checker, runs, and differs from the input only in weight values and
   one added metadata entry;
4. its held-out output fidelity beats magnitude pruning at the same sparsity.

Each model is run once (tests/corpus/run.py) and the results are shared by the tests below.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import numpy as np
import onnx
import pytest

from onnx_lobs import PruneConfig, prune
from onnx_lobs.errors import LobsError
from onnx_lobs.layers import ADAPTERS
from tests.corpus import BY_NAME, ENTRIES, handmade
from tests.corpus.run import Reader, calibration, check_output, cli, run_entry

# (entry, test or "*") -> reason, for failures that wait on a fix elsewhere in the package
# (see /work/notes/bugs_for_lead.md, section corpus); strict, so a fix shows up as a failure here.
KNOWN: dict[tuple[str, str], str] = {}
# Features another change brings: the entry's checks expect them and are strict xfails until then.
FEATURES = {"ConvTranspose": "ConvTranspose" in ADAPTERS}
RUN_TIME = "computed at run time"  # the reason for an activation @ activation MatMul


def params(test: str):
    out = []
    for e in ENTRIES:
        marks = [pytest.mark.slow] if e.slow else []
        reason = KNOWN.get((e.name, test)) or KNOWN.get((e.name, "*"))
        if e.needs and not FEATURES.get(e.needs, True) and test == "inspect":
            reason = f"needs the {e.needs} adapter (issue 5)"
        if reason:
            marks.append(pytest.mark.xfail(reason=reason, strict=True))
        out.append(pytest.param(e.name, marks=marks, id=e.name))
    return out


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            try:
                cache[name] = run_entry(BY_NAME[name], str(tmp_path_factory.mktemp(name)))
            except Exception as e:  # every test of that model reports the same failure
                cache[name] = e
        if isinstance(cache[name], Exception):
            raise cache[name]
        return cache[name]

    return get


@pytest.mark.parametrize("name", params("inspect"))
def test_inspect_accounts_for_every_weighted_op(name, outcome):
    o = outcome(name)
    found = Counter()
    for layer in o.inspect["layers"]:
        found[layer["op"]] += layer["uses"]
    # weighted ops are found or skipped; embedding tables (Gather) are reported beside them
    skipped = Counter(s["op"] for s in o.inspect["skipped"] if s["op"] in o.census.total)
    assert all(s["reason"] for s in o.inspect["skipped"])
    for op, n in o.census.total.items():
        assert found[op] + skipped[op] == n, f"{op}: {found[op]} found + {skipped[op]} skipped, model has {n}"
    assert sum(found.values()) + sum(skipped.values()) == sum(o.census.total.values())
    # The expected skips name the reason; activation @ activation MatMuls are exactly the
    # independent count's non-constant ones, and every constant weight not expected skipped is found.
    run_time = Counter({op: n for op, why, n in o.entry.skips if why == RUN_TIME})
    assert run_time == o.census.total - o.census.constant
    for op, why, n in o.entry.skips:
        hits = [s for s in o.inspect["skipped"] if s["op"] == op and why in s["reason"]]
        assert len(hits) == n, f"expected {n} {op} skipped with '{why}', got {o.inspect['skipped']}"
    assert len(o.inspect["skipped"]) == sum(n for _, _, n in o.entry.skips)


def _check_run(o, run, label, per_layer=True):
    assert run.problems == [], f"{label}: {run.problems}"
    assert run.outputs == o.reference_outputs, f"{label}: outputs differ in name, dtype or shape"
    assert o.input_unchanged
    pruned = run.pruned()
    assert pruned, f"{label}: no layer was pruned"
    done = [r for r in run.report["layers"] if r["skipped"] is None]
    if per_layer:
        for r in done:  # half of each group's row, rounded down (a depthwise 3x3 row keeps 5 of 9)
            assert r["sparsity"] >= (r["cols"] // 2) / r["cols"] - 1e-9, (label, r["name"], r["sparsity"])
    else:  # the CLI's default: half of the pruned layers' weights overall, allocated by output
        removed = sum(r["sparsity"] * r["params"] for r in done)
        assert removed >= 0.5 * sum(r["params"] for r in done) * (1 - 1e-3) - len(done), label
    return pruned


@pytest.mark.parametrize("name", params("prune"))
def test_prune_default_method_keeps_the_model_intact(name, outcome):
    o = outcome(name)
    _check_run(o, o.lobs, "default", per_layer=False)
    inspected = {s["reason"] for s in o.inspect["skipped"]}
    for r in o.lobs.report["layers"]:  # found layers are pruned, or left dense by the default rule
        if r["skipped"]:
            assert "default exclusion" in r["skipped"] or r["skipped"] in inspected, r
    assert o.lobs.report["fidelity"]["samples"] > 0


@pytest.mark.parametrize("name", params("fidelity"))
def test_lobs_beats_magnitude_on_held_out_samples(name, outcome):
    o = outcome(name)
    _check_run(o, o.magnitude, "magnitude")
    assert o.lobs.rel_l2 < o.magnitude.rel_l2, (o.lobs.rel_l2, o.magnitude.rel_l2)


@pytest.mark.parametrize("name", params("nm"))
def test_pattern_2_4(name, outcome):
    o = outcome(name)
    pruned = _check_run(o, o.nm, "2:4")
    assert o.nm_violations == []
    for r in o.nm.report["layers"]:
        if r["skipped"] and "2:4" in r["skipped"]:
            assert "divide" in r["skipped"], r
    assert all(abs(r["sparsity"] - 0.5) < 1e-9 for r in pruned)


# ----------------------------------------------------------------------------- beyond the four conditions

def _per_sample_npz_supported() -> bool:
    model = handmade.streaming(np.random.default_rng(0))
    try:
        from onnx_lobs.calibration import open_source
        open_source({"input": np.zeros((2, 1, 64), np.float32), "state": np.zeros((2, 2, 1, 128), np.float32),
                     "sr": np.full(2, 16000, np.int64)}, model)
    except LobsError:
        return False
    return True


@pytest.mark.xfail(not _per_sample_npz_supported(), strict=True,
                   reason="needs the per-sample .npz layout in calibration.py (issue 5)")
def test_streaming_model_from_a_per_sample_npz_through_the_cli(tmp_path):
    """The streaming model's .npz holds one axis more than each input: the CLI reads arr[i] as one feed."""
    entry = BY_NAME["streaming_state"]
    path = entry.model_path(str(tmp_path))
    _, npz = calibration(entry, path, str(tmp_path))
    out, report = str(tmp_path / "out.onnx"), str(tmp_path / "r.json")
    text = cli("prune", path, "-o", out, "--calib", npz, "--report", report, "--quiet")
    assert "cell0/h" in text
    original = onnx.load(path)
    arrays = np.load(npz)
    feed = {k: np.asarray(arrays[k][0]) for k in arrays.files}
    from tests.corpus import census
    problems, _ = check_output(original, str(tmp_path), out, census.count(original).allowed_keys(), feed)
    assert problems == []


def test_if_with_outer_weights_before_opset_11():
    """If-1 merges its branches' output shapes strictly: the exposed layer inputs must still load and prune."""
    model = handmade.if_outer(np.random.default_rng(0), opset=7)
    arrays = handmade.if_calib(np.random.default_rng(1), 288)
    lobs, magnitude = (prune(model, arrays, PruneConfig(method=m)) for m in ("lobs", "magnitude"))
    done = {r.name for r in lobs.report.layers if r.sparsity and not r.skipped}
    assert done == {"then/MatMul", "else/Gemm", "else/out"}  # else/out: W_out, shared with then/out
    assert lobs.report.fidelity["rel_l2"] < magnitude.report.fidelity["rel_l2"]


def test_corpus_files_are_small_and_span_the_opsets(tmp_path):
    folder = os.path.join(os.path.dirname(__file__), "corpus", "models")
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert total < 4 << 20, f"committed corpus is {total / 1e6:.1f} MB"
    fast = [e for e in ENTRIES if not e.slow]
    assert len(fast) >= 15
    opsets = {o.version for e in fast for o in onnx.load(e.model_path(str(tmp_path))).opset_import if o.domain == ""}
    assert min(opsets) == 7 and max(opsets) == 26  # 26: the newest onnxruntime 1.31 runs


# Why a structured group may be kept whole: an op named with its node, or where the channels go.
KEPT_WHOLE = re.compile(r"^(\w+ '[^']*': .+|channels reach the graph output '.+'|channels come from the graph "
                        r"input '.+'|'.+' is read inside a subgraph \(\w+\)|.+ is inside a subgraph|'.+' carries the "
                        r"channels .+|nothing to remove at this sparsity|the channels reach no layer)$")


@pytest.mark.parametrize("name", params("structured"))
def test_structured_prunes_every_channel_group_or_names_what_keeps_it_whole(name, tmp_path):
    entry = BY_NAME[name]
    path = entry.model_path(str(tmp_path))
    arrays = entry.calibration(48, path)
    config = PruneConfig(structured=True, sparsity=0.5, round_to=1, latency=False, default_exclude=False)
    try:
        report = prune(path, Reader(arrays) if entry.per_sample else arrays, config).report
    except LobsError as e:  # nothing to prune: the reasons are listed
        assert "no channel group can be pruned" in str(e), e
        return
    for g in report.groups:
        assert (g.kept is None) == (g.blocked is not None)
        assert g.kept is not None or KEPT_WHOLE.match(g.blocked), g.blocked
    assert any(g.kept is not None for g in report.groups)
    assert report.summary["flops_after"] < report.summary["flops_before"]
