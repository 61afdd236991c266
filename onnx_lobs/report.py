"""What each layer lost: per-layer records, the whole-model summary, JSON and a text table.

Errors follow the paper: delta E = (1/2n) sum_samples ||Y' - Y||^2 of the layer's linear output
(n counts unfolded rows: samples x output positions for a conv), measured exactly on the data
through H, next to the solver's own prediction. rel_error = delta E / ((1/2n) sum ||Y||^2).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field

import numpy as np

from .memory import size_text


@dataclass
class LayerRecord:
    name: str
    op: str
    weight: str
    rows: int
    cols: int
    groups: int = 1
    params: int = 0
    storage: str = ""
    dtype: str = ""
    target_sparsity: float | None = None
    sparsity: float | None = None  # zeros / params after pruning
    error: float | None = None  # delta E on calibration data (measured)
    predicted_error: float | None = None  # the solver's estimate of delta E
    rel_error: float | None = None
    holdout_error: float | None = None  # delta E on held-out samples
    dense_input_holdout_error: float | None = None  # the same with dense inputs (for the bound)
    propagated_error: float | None = None  # sequential: dense weights on the pruned inputs
    corrected_error: float | None = None  # sequential: the unconstrained optimum W0 = W C H_p^-1
    damp: float | None = None
    seconds: float | None = None  # the layer's whole step: its Hessians, solve, write-back, measurement
    solve_seconds: float | None = None  # the solve alone (solve_groups, the damp grid included)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # reason, when the layer was not pruned
    curve: list | None = None  # --global by output: the levels tried (output_allocation.Curve.record)


@dataclass
class Report:
    layers: list[LayerRecord]
    sparsity: float  # zeros over all prunable weights
    config: dict
    timings: dict
    fidelity: dict | None = None
    bound: dict | None = None
    samples: dict | None = None
    versions: dict = field(default_factory=dict)
    groups: list | None = None  # structured: one record per channel group (structured.GroupRecord)
    summary: dict | None = None  # structured: the whole model before and after
    allocation: dict | None = None  # unstructured --global: how the layers' targets were chosen
    mode: dict | None = None  # --pattern without --sequential/--independent: both modes, the one kept
    memory: dict | None = None  # the Hessian sums against --memory-budget, and the blocks (memory.Plan)

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def json_safe(obj):
    """JSON has no NaN or Inf: write null instead."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def versions() -> dict:
    import onnx
    import onnxruntime
    import scipy

    from .version import __version__

    return {"onnx_lobs": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "python": platform.python_version()}


def overall_sparsity(records: list[LayerRecord], zeros: dict[str, int]) -> float:
    total = sum(r.params for r in records)
    return sum(zeros.get(r.name, 0) for r in records) / total if total else 0.0


def chain_bound(steps: list[tuple[float, float, float]], after: float) -> dict:
    """The paper's bound on the final output's RMS error, for a chain of layers.

    steps: per layer in order, (gain of the path into it, operator norm of its pruned weight,
    RMS of its own output change on the data). e_l = norm_l * gain_l * e_{l-1} + rms_l; the
    final error is at most after * e_L. With Frobenius norms this is the paper's Theorem;
    spectral norms give a tighter bound that is just as valid.
    """
    e = 0.0
    for gain, norm, rms in steps:
        e = norm * gain * e + rms
    return after * e


def format_table(report: Report) -> str:
    if report.groups is not None:
        return format_groups(report)
    head = f"{'layer':<28} {'op':<7} {'rows x cols':>13} {'sparsity':>9} {'dE':>10} {'rel dE':>9} {'sec':>6}"
    lines = [head, "-" * len(head)]
    for r in report.layers:
        if r.skipped:
            continue
        shape = f"{r.rows}x{r.cols}" + (f"/g{r.groups}" if r.groups > 1 else "")
        lines.append(f"{r.name[:28]:<28} {r.op:<7} {shape:>13} {_pct(r.sparsity):>9} "
                     f"{_num(r.error):>10} {_num(r.rel_error):>9} {_num(r.seconds, '.2f'):>6}")
    skipped = [r for r in report.layers if r.skipped]
    if skipped:
        lines.append("skipped:")
        lines += [f"  {r.name} ({r.op}): {r.skipped}" for r in skipped]
    lines.append(f"overall sparsity {_pct(report.sparsity)} of prunable weights")
    f = report.fidelity
    if f:
        parts = [f"rel L2 {_num(f.get('rel_l2'))}", f"cosine {_num(f.get('cosine'), '.6f')}"]
        if f.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {_pct(f['top1_agreement'], 2)}")
        lines.append(f"output fidelity on {f['samples']} held-out samples: " + ", ".join(parts))
    m = report.mode
    if m:
        other = next(k for k in m["rel_l2"] if k != m["kept"])
        lines.append(f"{m['kept']} mode kept: held-out rel L2 {_num(m['rel_l2'][m['kept']])} against "
                     f"{_num(m['rel_l2'][other])} in {other} mode ({_num(m['seconds'][other], '.1f')} s)")
    mem = report.memory
    if mem and mem["cut"]:
        lines.append(f"memory: Hessian sums {size_text(mem['hessian_bytes'])} in {mem['blocks']} blocks of at "
                     f"most {size_text(mem['block_bytes'])} (budget {size_text(mem['budget'])})")
    b = report.bound
    if b:
        if b.get("measured_rms") is not None:
            lines.append(f"final-output RMS error {_num(b['measured_rms'])} <= bound {_num(b['bound_spectral'])} "
                         f"(paper's Frobenius form {_num(b['bound_frobenius'])})")
        elif b.get("reason"):
            lines.append(f"error bound not computed: {b['reason']}")
    return "\n".join(lines)


def _pct(x, digits=1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _num(x, fmt=".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def format_groups(report: Report) -> str:
    head = (f"{'group':<28} {'channels':>12} {'consumers':>9} {'MFLOPs':>15} {'pred dE':>9} {'rel dE':>9} "
            f"{'held dE':>9} {'out dE':>9}")
    lines = [head, "-" * len(head)]
    for g in (g for g in report.groups if g.kept is not None):
        flops = f"{g.flops_before / 1e6:.2f} -> {(g.flops_after or 0) / 1e6:.2f}"
        width = f"x{g.width}" if g.width > 1 else ""
        lines.append(f"{g.label[:28]:<28} {f'{g.channels}{width} -> {g.kept}{width}':>12} {len(g.consumers):>9} "
                     f"{flops:>15} "
                     f"{_num(g.predicted_error):>9} {_num(g.measured_error):>9} {_num(g.holdout_error):>9} "
                     f"{_num(g.output_error):>9}")
    kept = [g for g in report.groups if g.kept is None]
    if kept:
        lines.append("kept whole:")
        lines += [f"  {g.label} ({g.channels} channels{f' of {g.width}' if g.width > 1 else ''}): {g.blocked}"
                  for g in kept]
    s = report.summary or {}
    if s:
        lines.append(f"parameters {s['params_before']:,} -> {s['params_after']:,}, "
                     f"FLOPs {s['flops_before'] / 1e6:.2f}M -> {s['flops_after'] / 1e6:.2f}M "
                     f"({_pct(s['flops_after'] / s['flops_before']) if s['flops_before'] else '-'}), "
                     f"file {s['bytes_before'] / 2**20:.2f} -> {s['bytes_after'] / 2**20:.2f} MiB")
        speed = s.get("latency")
        if speed:
            parts = [f"{k.replace('_', ' ')} {v['before_ms']:.3g} -> {v['after_ms']:.3g} ms ({v['speedup']:.2f}x)"
                     for k, v in speed.items() if k != "threads"]
            lines.append(f"onnxruntime latency, {speed['threads']} threads: " + ", ".join(parts))
        a = s.get("allocation")
        if a:
            if a.get("confirmed"):
                tried = ", ".join(f"{k} {_num(v)}" for k, v in a["confirmed"].items())
                lines.append(f"allocation by output: {a['probes']} probes in {a['rounds']} rounds; whole-model rel L2 "
                             f"of the choices tried: {tried}; kept {a.get('picked')}")
            elif a["by"] == "output":
                lines.append(f"allocation by output: {a['probes']} probes in {a['rounds']} rounds, predicted "
                             f"output rel L2 {_num(a.get('predicted_rel_l2'))}")
            else:
                lines.append(f"allocation by {a['by']} (normalised layer-wise cost)")
    f = report.fidelity
    if f:
        lines.append(f"output fidelity on {f['samples']} held-out samples: rel L2 {_num(f.get('rel_l2'))}, "
                     f"cosine {_num(f.get('cosine'), '.6f')}")
    return "\n".join(lines)
