"""Pictures of a report (`--plot FILE.png`): what a person would rather look at than read.

One PNG, panels stacked: per layer, the sparsity reached and the layer-wise relative error; with
structured pruning, per channel group, the channels kept; with an allocation by output, each
layer's curve (its output error against sparsity, measured and predicted, the level chosen
marked). matplotlib is an optional extra (`pip install 'onnx-lobs[plot]'`), imported here only
when a picture is asked for, and drawn without pyplot, so a caller's own figures are untouched.
"""

from __future__ import annotations

import io
import math

from .atomic import write_atomic
from .errors import LobsError
from .report import Report

CURVE_COLUMNS = 6  # small multiples per row
MAX_CURVES = 96  # beyond this, the layers whose chosen level costs the most output error
BAR_INCH = 0.13  # height per layer or group in a bar panel


def require() -> None:
    """Fail early, before any work, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LobsError("--plot needs matplotlib: pip install 'onnx-lobs[plot]'") from None


def draw(report: Report, path: str) -> None:
    """The report's picture, written to path as a PNG (atomically, like a model)."""
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p in (_layers_panel(report), _groups_panel(report), _curves_panel(report)) if p] or [_empty()]
    heights = [p[0] for p in panels]
    fig = Figure(figsize=(11, sum(heights) + 0.4 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    subs = fig.subfigures(len(panels), 1, height_ratios=heights, squeeze=False)[:, 0]
    for (_, paint), sub in zip(panels, subs):
        paint(sub)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_atomic(path, buf.getvalue())


def _empty():
    """A model with nothing pruned still gets its picture, saying so (the run itself succeeded)."""
    def paint(sub):
        ax = sub.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing was pruned: every layer was skipped or left dense (the report says why)",
                ha="center", va="center", fontsize=10)
    return 1.0, paint


def _pruned(report: Report) -> list:
    return [r for r in report.layers if r.skipped is None and r.sparsity is not None and r.params]


def _layers_panel(report: Report):
    rows = _pruned(report)
    if not rows or report.groups:
        return None

    def paint(sub):
        ax = sub.subplots()
        y = list(range(len(rows)))
        ax.barh(y, [r.sparsity for r in rows], color="#9ecae1", label="sparsity reached")
        ax.set_yticks(y, [r.name[:40] for r in rows], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("sparsity (bars)")
        errs = ax.twiny()
        shown = [(r.rel_error, k) for k, r in enumerate(rows) if r.rel_error]  # a dense layer's 0: no dot
        if shown:
            errs.plot([e for e, _ in shown], [k for _, k in shown], "o", color="#d62728", markersize=3)
            errs.set_xscale("log")
        errs.set_ylim(ax.get_ylim())
        errs.set_xlabel("relative layer-wise error (dots)", color="#d62728")
        ax.set_title(f"{len(rows)} layers pruned, {report.sparsity:.1%} of their weights removed", fontsize=9)
    return max(2.0, BAR_INCH * len(rows) + 1.2), paint


def _groups_panel(report: Report):
    groups = [g for g in report.groups or [] if g.kept is not None]
    if not groups:
        return None

    def paint(sub):
        ax = sub.subplots()
        y = list(range(len(groups)))
        ax.barh(y, [g.channels for g in groups], color="#dddddd", label="channels")
        ax.barh(y, [g.kept for g in groups], color="#31a354", label="kept")
        ax.set_yticks(y, [g.label[:40] for g in groups], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("channels")
        ax.legend(loc="lower right", fontsize=7)
        ax.set_title(f"channels kept in {len(groups)} groups", fontsize=9)
    return max(2.0, BAR_INCH * len(groups) + 1.2), paint


def _curves_panel(report: Report):
    rows = [r for r in report.layers if r.curve]
    if not rows:
        return None
    if len(rows) > MAX_CURVES:
        rows = sorted(rows, key=lambda r: -_chosen(r)["predicted_output_error"])[:MAX_CURVES]
    n_rows = math.ceil(len(rows) / CURVE_COLUMNS)

    def paint(sub):
        axes = sub.subplots(n_rows, CURVE_COLUMNS, squeeze=False, sharex=True)
        for ax in axes.ravel()[len(rows):]:
            ax.set_visible(False)
        for ax, r in zip(axes.ravel(), rows):
            _curve(ax, r)
        shown = "" if len(rows) == len([r for r in report.layers if r.curve]) else \
            f" (the {len(rows)} whose chosen level costs the most)"
        sub.suptitle("output error of each layer alone against its sparsity: measured (filled), predicted "
                     f"(line; hollow where the layer-wise error is estimated), chosen (star){shown}", fontsize=8)
    return 1.6 * n_rows + 0.5, paint


def _chosen(r) -> dict:
    return next(p for p in r.curve if p["chosen"])


def _curve(ax, r) -> None:
    pts = [p for p in r.curve if p["sparsity"] > 0]
    xs = [p["sparsity"] for p in pts]
    ax.plot(xs, [max(p["predicted_output_error"], 1e-12) for p in pts], "-", color="#6baed6", linewidth=1)
    for p in pts:
        if p["output_error"] is not None:
            ax.plot(p["sparsity"], max(p["output_error"], 1e-12), "o", color="#08519c", markersize=3)
        elif p.get("estimated"):
            ax.plot(p["sparsity"], max(p["predicted_output_error"], 1e-12), "o", markersize=3,
                    markerfacecolor="none", markeredgecolor="#6baed6")
    chosen = _chosen(r)
    if chosen["sparsity"] > 0:
        ax.plot(chosen["sparsity"], max(chosen["predicted_output_error"], 1e-12), "*", color="#e6550d",
                markersize=8)
    ax.set_yscale("log")
    ax.set_title(r.name[:28] + (" (left dense)" if chosen["sparsity"] == 0 else ""), fontsize=6)
    ax.tick_params(which="both", labelsize=5)
