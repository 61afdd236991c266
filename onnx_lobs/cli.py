"""The onnx-lobs command: parse, call the library, print. No pruning logic lives here."""

from __future__ import annotations

import json
import os
import sys
import warnings

import click

from .version import __version__
from .errors import LobsError
from .solvers import AUTO, SOLVERS

CALIBRATION_KEY = "onnx_lobs.calibration"  # metadata: a model's bundled calibration file


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-lobs")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def cli(ctx, debug):
    """Prune exported ONNX models with layer-wise Optimal Brain Surgeon."""
    ctx.obj = {"debug": debug}


def main(argv=None):
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="onnx-lobs", standalone_mode=False)
    except LobsError as e:
        if debug:
            raise
        click.echo(f"onnx-lobs: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("onnx-lobs: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("onnx-lobs: interrupted", err=True)
        sys.exit(130)
    sys.exit(0)


# ----------------------------------------------------------------------------- inspect

@cli.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--structured", is_flag=True, help="List the channel groups instead, and why any is kept whole.")
def inspect(model, as_json, structured):
    """List prunable layers, and the weighted ops that will not be pruned, with the reason."""
    from .graph import find_layers
    from .modelio import load_model

    loaded = load_model(model)
    if structured:
        return _inspect_groups(model, loaded, as_json)
    layers, skipped = find_layers(loaded)
    data = {
        "model": model,
        "layers": [{"name": l.name, "op": l.op, "weight": l.weight_name, "shape": list(l.shape),
                    "rows": l.geometry.rows * l.geometry.groups, "cols": l.geometry.cols,
                    "groups": l.geometry.groups, "dtype": l.dtype, "storage": l.storage,
                    "bias": l.bias is not None, "uses": len(l.uses),
                    "sparsity": l.present_sparsity()} for l in layers],
        "skipped": [{"name": s.name, "op": s.op, "weight": s.weight, "reason": s.reason} for s in skipped],
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{'layer':<28} {'op':<7} {'weight shape':<16} {'rows x cols':>12} {'g':>3} "
               f"{'dtype':<8} {'zeros':>6}  storage")
    for l in data["layers"]:
        click.echo(f"{l['name'][:28]:<28} {l['op']:<7} {str(l['shape']):<16} "
                   f"{l['rows']}x{l['cols']:<{12 - len(str(l['rows'])) - 1}} {l['groups']:>3} "
                   f"{l['dtype']:<8} {100 * l['sparsity']:>5.1f}%  {l['storage']}"
                   + (f", {l['uses']} uses" if l["uses"] > 1 else ""))
    for s in data["skipped"]:
        click.echo(f"skipped {s['name']} ({s['op']}): {s['reason']}")
    click.echo(f"{len(layers)} prunable layers, {len(skipped)} skipped")


def _inspect_groups(model, loaded, as_json):
    from .structured import inspect_groups

    groups = inspect_groups(loaded)
    from .flops import count
    total = count(loaded.model).total
    if as_json:
        click.echo(json.dumps({"model": model, "groups": [
            {"group": g.label, "channels": g.channels, "width": g.width, "producers": g.producers,
             "consumers": g.consumers,
             "flops": g.flops_before, "flops_share": g.flops_before / total if total else None,
             "blocked": g.blocked} for g in groups]}, indent=2))
        return
    click.echo(f"{'group':<28} {'channels':>8} {'FLOPs':>6}  producers -> consumers")
    for g in groups:
        share = f"{100 * g.flops_before / total:.1f}%" if total else "-"
        channels = f"{g.channels}x{g.width}" if g.width > 1 else str(g.channels)
        click.echo(f"{g.label[:28]:<28} {channels:>8} {share:>6}  {', '.join(g.producers)} -> "
                   f"{', '.join(g.consumers) or '-'}" + (f"\n{'':<38}kept whole: {g.blocked}" if g.blocked else ""))
    free = sum(g.blocked is None for g in groups)
    click.echo(f"(FLOPs: the share of the model's {total / 1e6:.3g} MFLOPs at batch 1 in the layers a group touches;"
               " HxD: H channels of D units each, e.g. attention heads)")
    click.echo(f"{len(groups)} channel groups, {free} prunable, {len(groups) - free} kept whole")


# ----------------------------------------------------------------------------- prune

def _layer_sparsity(values) -> dict:
    out = {}
    for v in values:
        glob, sep, s = v.rpartition("=")
        try:
            if not sep or not glob:
                raise ValueError
            out[glob] = float(s)
        except ValueError:
            raise LobsError(f"--layer-sparsity '{v}': expected GLOB=S, e.g. '*fc1*=0.95'") from None
    return out


def _pattern(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        n, m = (int(v) for v in value.split(":"))
    except ValueError:
        raise LobsError(f"--pattern '{value}': expected N:M, e.g. 2:4") from None
    return n, m


def _budget(sparsity, global_sparsity, allocation, structured, pattern, max_error):
    """(per-layer sparsity, overall sparsity, allocation) for PruneConfig. Unstructured --sparsity
    S is the overall fraction, allocated by output, unless --allocation uniform asks for S of
    each layer: the result for the same S is far better on real models (README: defaults)."""
    if sparsity is not None and not 0 <= sparsity < 1:
        raise LobsError(f"--sparsity: sparsity must be in [0, 1), got {sparsity}")
    s = 0.5 if sparsity is None else sparsity
    if allocation == "uniform":
        if structured or global_sparsity is not None:
            raise LobsError("--allocation uniform gives every layer --sparsity: not with --global or --structured")
        return s, None, None
    if sparsity is not None and global_sparsity is not None:
        raise LobsError("--sparsity and --global say the same thing (the overall fraction): give one")
    if structured or pattern is not None or max_error is not None or global_sparsity is not None:
        return s, global_sparsity, allocation
    return 0.5, s, allocation


def _damp(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise LobsError(f"--damp '{value}': expected 'auto' or a number") from None


def _default_calibration(model_path: str):
    """A bundled model names its calibration file in its metadata, relative to itself."""
    import onnx

    try:
        m = onnx.load(model_path, load_external_data=False)
    except Exception:
        return None  # load_model reports it properly later
    for p in m.metadata_props:
        if p.key == CALIBRATION_KEY:
            path = os.path.join(os.path.dirname(os.path.abspath(model_path)), p.value)
            return path if os.path.exists(path) else None
    return None


def _check_output(path: str, model: str) -> None:
    if os.path.abspath(path) == os.path.abspath(model):
        raise LobsError(f"{path}: refusing to overwrite the input model; choose another -o")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LobsError(f"{path}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise LobsError(f"{path}: output folder is not writable")
    if os.path.isdir(path):
        raise LobsError(f"{path}: is a folder")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Pruned model to write.")
@click.option("--calib", help="Calibration data: .npz, folder of .npz, module:callable, or 'random'.")
@click.option("--sparsity", type=float, metavar="S",
              help="Fraction of all prunable weights removed [default: 0.5], allocated across the layers by "
                   "their measured effect on the outputs (--allocation uniform: S of each layer, the meaning "
                   "before 0.2); with --structured, the fraction of each channel group's channels.")
@click.option("--structured", is_flag=True,
              help="Remove whole channels, neurons and their coupled groups: the graph shrinks "
                   "(methods lobs, wanda, magnitude).")
@click.option("--round-to", type=int, default=8, show_default=True, metavar="K",
              help="With --structured: keep a multiple of K channels in every group (onnxruntime's fast "
                   "kernels take blocks of 8; 1 keeps exact fractions).")
@click.option("--flops", type=float, metavar="F",
              help="With --structured: keep at most F of the dense model's FLOPs, removing the channels "
                   "of least cost per FLOP saved across the model.")
@click.option("--no-latency", is_flag=True, help="With --structured: do not time the models for the report.")
@click.option("--layer-sparsity", multiple=True, metavar="GLOB=S",
              help="Per-layer sparsity by layer or weight name; repeatable, the last match wins.")
@click.option("--max-error", type=float, help="Prune each layer until its relative error would pass this.")
@click.option("--method", default=AUTO, show_default=True,
              help=f"{AUTO}: obc where it is cheap, sparsegpt elsewhere (with --structured: lobs); "
                   + "; ".join(f"{s.name}: {s.summary}" for s in SOLVERS.values()) + ".")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave matching layers dense (with --structured: keep their output channels); repeatable.")
@click.option("--samples", type=int, help="Read at most this many calibration samples.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--damp", default="auto", show_default=True,
              help="Dampening added to H, as a fraction of its mean diagonal; 'auto' picks, per layer, "
                   "the value of 0.01/0.1/1/10 with the lowest layer-wise error.")
@click.option("--pattern", metavar="N:M", help="Structured sparsity: at most N non-zeros in every M "
              "weights along the reduction axis (e.g. 2:4); replaces --sparsity.")
@click.option("--global", "global_sparsity", type=float, metavar="S",
              help="Remove S of all prunable weights (what --sparsity now does; with --structured: of all "
                   "channels of the prunable groups), allocated across the model by each layer's measured "
                   "effect on the outputs (see --allocation). With --pattern: which layers take the pattern.")
@click.option("--allocation", type=click.Choice(["output", "layer", "uniform"]),
              help="How --sparsity (or --global, or --structured --flops) is spread: by each layer's or "
                   "group's measured effect on the model's outputs (output, the default; each layer at S "
                   "when nothing is held out to measure on), by normalised layer-wise cost (layer: faster, "
                   "no probes), or S of every layer (uniform, unstructured only).")
@click.option("--no-default-exclude", is_flag=True,
              help="Also prune first layers with very few input channels (left dense by default).")
@click.option("--sequential/--independent", default=None,
              help="Calibrate each stage of layers on the model as pruned so far (error-correcting), or "
                   "every layer on the dense model. Default: independent, except with --pattern, where "
                   "both run and the one whose outputs are closer to the dense model's is kept.")
@click.option("--memory-budget", metavar="SIZE",
              help="At most this much memory for the Hessian sums at once (e.g. 6G, 512M): layers are "
                   "calibrated and solved block by block in graph order to stay within it. Default: a "
                   "quarter of this machine's memory.")
@click.option("--workers", type=int, default=1, show_default=True, metavar="N",
              help="Solve layers in N processes side by side (BLAS threads shared out, never "
                   "oversubscribed); the output is identical to one process's.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: run the calibration shards and the solves on a Ray cluster (the 'distributed' "
                   "extra; see README, Distributed).")
@click.option("--address", metavar="ADDR",
              help="With --executor ray: the cluster to join (default: RAY_ADDRESS, else a local one).")
@click.option("--shards", type=int, metavar="N",
              help="With --executor ray: calibration shards, one Ray actor each (default: the cluster's CPUs).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw the report as a PNG: per layer its sparsity and error (per group the channels kept), "
                   "and with an allocation by output each layer's curve. Needs matplotlib (the 'plot' extra).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prune(model, output, calib, sparsity, structured, round_to, flops, no_latency, layer_sparsity, max_error, method, exclude, samples,
          batch_size, damp, pattern, global_sparsity, allocation, no_default_exclude, sequential, memory_budget,
          workers, executor, address, shards, report_path, plot_path, seed, quiet):
    """Prune MODEL and write the result to OUTPUT."""
    from .atomic import write_atomic
    from .modelio import save_model
    from .memory import parse_size
    from .pruning import PruneConfig, prune as run_prune
    from .report import format_table

    _check_output(output, model)
    if report_path:
        _check_output(report_path, model)
    if plot_path:
        from . import pictures
        _check_output(plot_path, model)
        if os.path.abspath(plot_path) in {os.path.abspath(p) for p in (output, report_path) if p}:
            raise LobsError(f"{plot_path}: --plot must name a file of its own, not the output or the report")
        pictures.require()
    if calib is None:
        calib = _default_calibration(model)
        if calib is None:
            raise LobsError(f"{model}: no calibration data given: use --calib DATA "
                            "(or --calib random to accept random data)")
        if not quiet:
            click.echo(f"using bundled calibration data {os.path.relpath(calib)}", err=True)
    sparsity, global_sparsity, allocation = _budget(sparsity, global_sparsity, allocation, structured, pattern,
                                                    max_error)
    config = PruneConfig(method=method, sparsity=sparsity, layer_sparsity=_layer_sparsity(layer_sparsity),
                         max_error=max_error, exclude=list(exclude), samples=samples,
                         batch_size=batch_size, seed=seed, damp=_damp(damp), sequential=sequential,
                         pattern=_pattern(pattern), global_sparsity=global_sparsity,
                         default_exclude=not no_default_exclude, structured=structured, round_to=round_to,
                         flops=flops, allocation=allocation, latency=not no_latency,
                         memory_budget=None if memory_budget is None else parse_size(memory_budget), workers=workers,
                         executor=executor, address=address, shards=shards,
                         progress=not quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_prune(model, calib, config)
    for w in caught:
        click.echo(f"onnx-lobs: warning: {w.message}", err=True)
    save_model(result.model, output, external=True if result.external_data else None)
    if report_path:
        write_atomic(report_path, (result.report.to_json() + "\n").encode())
    if plot_path:
        pictures.draw(result.report, plot_path)
    click.echo(format_table(result.report))
    click.echo(f"wrote {output}")


# ----------------------------------------------------------------------------- eval

@cli.command("eval")
@click.argument("model", type=click.Path())
@click.option("--data", required=True, help="Inputs (and labels): .npz, folder of .npz or module:callable.")
@click.option("--reference", type=click.Path(dir_okay=False), help="Original model to compare against.")
@click.option("--labels", help="Key of the labels in the data (default: 'labels' when present).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model, data, reference, labels, batch_size, as_json):
    """Accuracy with labels, and fidelity against a reference model."""
    from .evaluate import evaluate

    result = evaluate(model, data, reference=reference, labels=labels, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"samples: {result['samples']}")
    if result["accuracy"] is not None:
        click.echo(f"accuracy: {100 * result['accuracy']:.2f}% (error {100 * (1 - result['accuracy']):.2f}%)")
    if reference:
        if result["top1_agreement"] is not None:
            click.echo(f"top-1 agreement with reference: {100 * result['top1_agreement']:.2f}%")
        click.echo(f"relative L2 error vs reference: {result['rel_l2']:.4g}")
        click.echo(f"cosine similarity vs reference: {result['cosine']:.6f}")
    if result["accuracy"] is None and not reference:
        click.echo("(no labels and no --reference: nothing to compare)")


# ----------------------------------------------------------------------------- retrain

@cli.command("retrain")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Retrained model to write.")
@click.option("--data", required=True, help="Training inputs, and labels unless --teacher: one .npz file.")
@click.option("--labels", help="Key of the labels in the data (default: 'labels'); loss = cross-entropy.")
@click.option("--teacher", type=click.Path(dir_okay=False),
              help="The original model: distil from its outputs instead of using labels.")
@click.option("--iterations", type=int, help="Training steps (default: one epoch of the data).")
@click.option("--epochs", type=float, help="Passes over the data, instead of --iterations.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, help="Adam learning rate, decayed to 0 by a cosine (default 0.002).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def retrain_cmd(model, output, data, labels, teacher, iterations, epochs, batch_size, lr, report_path, seed,
                quiet):
    """Retrain a pruned MODEL with its zeros held, check it, and write it to OUTPUT."""
    from .atomic import write_atomic
    from .modelio import save_model
    from .retrain import require_torch, retrain

    require_torch()  # before anything else: without the extra, say how to install it
    _check_output(output, model)
    if report_path:
        _check_output(report_path, model)
    if labels and teacher:
        raise LobsError("--labels and --teacher exclude each other: labels train with cross-entropy, "
                        "a teacher by distillation")
    kwargs = {} if lr is None else {"lr": lr}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes are not the user's business
        result = retrain(model, data, labels=None if teacher else (labels or "labels"), teacher=teacher,
                         iterations=iterations, epochs=epochs, batch_size=batch_size, seed=seed,
                         progress=not quiet, **kwargs)
    save_model(result.model, output)
    if report_path:
        write_atomic(report_path, (result.report.to_json() + "\n").encode())
    click.echo(_retrain_summary(result.report))
    click.echo(f"wrote {output}")


def _retrain_summary(r) -> str:
    def held(m):
        parts = [f"loss {m['loss']:.4g}"] if m else []
        for key, label in (("accuracy", "accuracy"), ("top1_agreement", "top-1 agreement with teacher")):
            if m.get(key) is not None:
                parts.append(f"{label} {100 * m[key]:.2f}%")
        return ", ".join(parts)

    c = r.checks
    lines = [f"retrained {r.iterations} iterations ({r.epochs:.2f} epochs of {r.samples['train']} samples, "
             f"batch {r.batch_size}), {r.loss}, lr {r.lr:g}, {r.timings['total']:.1f} s"]
    if r.loss_curve:
        lines.append(f"training loss {r.loss_curve[0][1]:.4g} (first {r.loss_curve[0][0]} iterations) -> "
                     f"{r.loss_curve[-1][1]:.4g} (last)")
    if r.before:
        lines.append(f"held out ({r.samples['held_out']} samples): {held(r.before)} -> {held(r.after)}")
    lines.append(f"zeros held exactly: {c['zeros_kept']} in {c['layers']} layers; inputs, outputs and opset "
                 f"{c['opset'][1]} as the pruned model; onnxruntime matches torch ({c['onnxruntime_vs_torch']:.1e})")
    return "\n".join(lines)
