"""The ONNX <-> torch round trip of retraining, and the checks that it changed nothing but weights.

onnx2torch converts the pruned model, torch.onnx.export writes the trained one back; neither is
trusted: the conversion must compute what onnxruntime computes before training, and the export
must keep the interface, the opset and every layer's zeros, and agree with torch in onnxruntime.
Kept apart from retrain.py, which owns the training itself.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx

from .errors import LobsError, one_line
from .graph import find_layers
from .index import GraphIndex
from .modelio import LoadedModel, model_inputs
from .runtime import make_session, run

MIN_OPSET, MAX_OPSET = 7, 20  # what the TorchScript exporter writes
TOLERANCE = 1e-4  # torch against onnxruntime, relative to 1 + the largest output


def convert(loaded: LoadedModel):
    """onnx2torch's graph module, after listing in one line every op it has no converter for."""
    from onnx2torch import convert as onnx_to_torch
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain or "": o.version for o in loaded.model.opset_import}
    missing = {}
    for site in GraphIndex(loaded.model).main():
        node = site.node
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(node.domain or "", 1),
                          domain=node.domain or "")
        except NotImplementedError:
            key = node.op_type + (f" (domain {node.domain})" if node.domain else "")
            missing[key] = missing.get(key, 0) + 1
    if missing:
        ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(missing.items()))
        raise LobsError(f"{loaded.path}: onnx2torch cannot convert these ops: {ops}; "
                        "retraining needs a model it can convert")
    copy = onnx.ModelProto()
    copy.CopyFrom(loaded.model)
    try:
        gm = onnx_to_torch(copy, attach_onnx_mapping=True)
    except Exception as e:
        raise LobsError(f"{loaded.path}: onnx2torch cannot convert it ({type(e).__name__}: "
                        f"{one_line(e)})") from None
    gm.eval()  # an inference graph: no dropout, batch-norm statistics stay as exported
    return gm


def tensors(arrays: dict, idx) -> list:
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a[idx])) for a in arrays.values()]


def outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _torch_outputs(gm, arrays, idx) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [o.numpy() for o in outputs(gm(*tensors(arrays, idx)))]


def _max_diff(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """max |out - ref| relative to the outputs' scale, over every output; inf on a shape mismatch."""
    worst = 0.0
    for r, o in zip(ref, out):
        if r.shape != o.shape:
            return math.inf
        scale = 1.0 + float(np.max(np.abs(r))) if r.size else 1.0
        worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - o))) / scale if r.size else 0.0)
    return worst if len(ref) == len(out) else math.inf


def check_conversion(gm, loaded: LoadedModel, arrays, idx) -> None:
    """onnx2torch's model must compute what onnxruntime computes, before any training."""
    idx = idx[:256]
    sess = make_session(loaded.model)
    ref = run(sess, [o.name for o in loaded.model.graph.output], {k: a[idx] for k, a in arrays.items()},
              loaded.path)
    diff = _max_diff(ref, _torch_outputs(gm, arrays, idx))
    if not diff <= TOLERANCE:
        raise LobsError(f"{loaded.path}: onnx2torch's conversion does not compute what onnxruntime does "
                        f"(relative difference {diff:.3g}); it cannot be retrained faithfully")


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)


def export(gm, pruned: onnx.ModelProto, arrays, idx) -> onnx.ModelProto:
    """torch.onnx.export with the TorchScript exporter, at the pruned model's opset and names.

    The TorchScript exporter writes any opset from 7 to 20, initializers and Gemm/Conv nodes like
    the exporters that made most models we see; the dynamo exporter starts at opset 18 and needs
    onnxscript, so it would change the opset of older models.
    """
    import torch

    dynamic = {}
    for vi in list(model_inputs(pruned)) + list(pruned.graph.output):
        dims = vi.type.tensor_type.shape.dim
        axes = {k: d.dim_param or f"{vi.name}_dim{k}" for k, d in enumerate(dims) if not d.HasField("dim_value")}
        if axes:
            dynamic[vi.name] = axes
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notes: the choice is deliberate
            torch.onnx.export(gm, tuple(tensors(arrays, idx[:2])), buffer,
                              input_names=[i.name for i in model_inputs(pruned)],
                              output_names=[o.name for o in pruned.graph.output], dynamic_axes=dynamic or None,
                              opset_version=min(max(_opset(pruned), MIN_OPSET), MAX_OPSET),
                              do_constant_folding=True, dynamo=False)
    except Exception as e:
        raise LobsError(f"torch.onnx.export failed: {type(e).__name__}: {one_line(e)}") from None
    return onnx.load_from_string(buffer.getvalue())


def check_export(pruned: LoadedModel, model: onnx.ModelProto, gm, held: list, arrays, idx) -> dict:
    """Interface and opset, every layer's zeros, onnxruntime against torch; a failure is one line."""
    def fail(why):
        raise LobsError(f"the retrained model fails its check: {why}; nothing written")

    try:
        onnx.checker.check_model(model)
    except Exception as e:
        fail(f"onnx.checker: {one_line(e)}")
    for what, a, b in (("input", model_inputs(pruned.model), model_inputs(model)),
                       ("output", pruned.model.graph.output, model.graph.output)):
        if [v.name for v in a] != [v.name for v in b]:
            fail(f"{what}s {[v.name for v in b]} differ from the pruned model's {[v.name for v in a]}")
        for va, vb in zip(a, b):
            why = _interface_difference(va, vb)
            if why:
                fail(f"{what} '{va.name}' {why}")
    if _opset(model) > _opset(pruned.model):
        fail(f"opset {_opset(model)} is newer than the pruned model's {_opset(pruned.model)}")
    kept, new = _check_zeros(pruned, model, fail)
    idx = idx[:256]
    diff = _max_diff(_torch_outputs(gm, arrays, idx),
                     run(make_session(model), [o.name for o in model.graph.output],
                         {k: a[idx] for k, a in arrays.items()}, "retrained model"))
    if not diff <= TOLERANCE:
        fail(f"onnxruntime differs from torch by {diff:.3g} (relative)")
    return {"inputs_outputs": "same names, types and shapes", "opset": [_opset(pruned.model), _opset(model)],
            "layers": len(held), "zeros_kept": kept, "new_zeros": new, "samples_compared": int(len(idx)),
            "onnxruntime_vs_torch": diff}


def _interface_difference(a: onnx.ValueInfoProto, b: onnx.ValueInfoProto) -> str | None:
    ta, tb = a.type.tensor_type, b.type.tensor_type
    if ta.elem_type != tb.elem_type:
        return f"has type {tb.elem_type}, the pruned model {ta.elem_type}"
    if not ta.HasField("shape") or not tb.HasField("shape"):
        return None
    da, db = list(ta.shape.dim), list(tb.shape.dim)
    if len(da) != len(db):
        return f"has rank {len(db)}, the pruned model {len(da)}"
    for k, (x, y) in enumerate(zip(da, db)):
        fixed_a, fixed_b = x.HasField("dim_value"), y.HasField("dim_value")
        if fixed_a != fixed_b or (fixed_a and x.dim_value != y.dim_value):
            return (f"axis {k} is {y.dim_value if fixed_b else 'dynamic'}, "
                    f"the pruned model's {x.dim_value if fixed_a else 'dynamic'}")
    return None


def _check_zeros(pruned: LoadedModel, model: onnx.ModelProto, fail) -> tuple[int, int]:
    """Every prunable layer's zeros, found again in the exported model by order, kind and shape.

    Weights are compared as the adapters' matrices (rows = outputs), so a Gemm weight that became
    a Linear (transposed) or a MatMul still lines up.
    """
    ours, _ = find_layers(pruned)
    theirs, _ = find_layers(LoadedModel(model, "<retrained>"))
    kept = new = j = 0
    for layer in ours:
        want = _matrices(layer) == 0
        while j < len(theirs) and not (_kind(theirs[j]) == _kind(layer)
                                       and _matrices(theirs[j]).shape == want.shape):
            j += 1
        if j == len(theirs):
            fail(f"layer {layer.name} ({layer.op} {list(layer.shape)}) not found in the exported model")
        have = _matrices(theirs[j]) == 0
        if not have[want].all():
            fail(f"layer {layer.name}: {int(np.sum(want & ~have))} of its zeros are no longer zero")
        kept, new, j = kept + int(want.sum()), new + int(np.sum(have & ~want)), j + 1
    return kept, new


def _matrices(layer) -> np.ndarray:
    return layer.adapter.to_matrices(layer.uses[0].node, layer.read())


def _kind(layer) -> str:
    return layer.adapter.family
