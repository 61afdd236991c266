"""Light retraining of a pruned model with its zeros held: ONNX -> torch -> train -> ONNX, checked.

The pruned model is converted with onnx2torch, every weight that is exactly zero in a prunable layer
is held at zero (its gradient is zeroed and the mask re-applied after every step), the rest trains
on labels (cross-entropy) or against the original model (distillation), and the result is exported
with torch.onnx.export. Nothing is returned until the exported model has passed three checks: the
same inputs, outputs and opset as the pruned model, every layer's zeros still exactly zero, and
onnxruntime agreeing with torch.

torch and onnx2torch are optional (the `retrain` extra) and imported only inside these functions,
so the rest of the package never loads them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata

import numpy as np
import onnx

from .calibration import ArraySource, input_specs, open_source
from .errors import LobsError, one_line
from .graph import find_layers
from .index import GraphIndex, read_ir
from .modelio import LoadedModel, as_loaded, model_inputs
from .report import json_safe, versions
from .roundtrip import check_conversion, check_export, convert, export, outputs, tensors
from .runtime import make_session, run

INSTALL_HINT = "pip install 'onnx-lobs[retrain]'"
DEFAULT_LR = 2e-3  # Adam, cosine-decayed to 0 over the run: chosen by held-out loss, docs/paper_table.md
HOLDOUT_FRACTION, HOLDOUT_MAX = 10, 1000  # as for calibration: one in ten, at most 1,000
CURVE_POINTS = 50  # loss-curve entries in the report
METADATA_KEY = "onnx_lobs.retrain"


@dataclass
class RetrainReport:
    loss: str  # "cross-entropy" or "distillation"
    iterations: int
    epochs: float  # iterations x batch size / training samples
    batch_size: int
    lr: float
    seed: int
    optimizer: str
    samples: dict  # {"train": n, "held_out": n}
    layers: list[dict]  # per prunable layer: name, op, params, zeros held
    loss_curve: list[tuple[int, float]]  # (iteration, mean training loss since the previous entry)
    before: dict  # held-out metrics of the pruned model
    after: dict  # ... and of the retrained one
    checks: dict  # what was verified on the exported model
    timings: dict
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class RetrainResult:
    model: onnx.ModelProto
    report: RetrainReport


@dataclass(eq=False)
class _Held:
    """A prunable layer's weight as a torch Parameter, with the mask of weights that stay zero."""

    name: str
    op: str
    param: object  # torch.nn.Parameter
    keep: object  # torch tensor: 1 where the weight trains, 0 where it is held at zero


def require_torch():
    """Import torch and onnx2torch, or say in one line how to install them."""
    try:
        import torch
    except Exception as e:
        raise LobsError(f"retraining needs PyTorch, which is not installed ({one_line(e)}): "
                        f"{INSTALL_HINT}") from None
    try:
        import onnx2torch
    except Exception as e:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        raise LobsError(f"retraining needs onnx2torch, which does not import ({one_line(e)}): "
                        f"{INSTALL_HINT}") from None
    return torch, onnx2torch


def retrain(pruned, data, *, labels: str | None = None, teacher=None, iterations: int | None = None,
            epochs: float | None = None, batch_size: int = 128, lr: float = DEFAULT_LR, seed: int = 0,
            progress: bool = True) -> RetrainResult:
    """Fine-tune a pruned model (path, ModelProto, LoadedModel or PruneResult) with its zeros held.

    `data` is an .npz file or a dict of arrays keyed by the model's input names. With `labels` (a key
    in the data) the loss is cross-entropy; with `teacher` (the original model) it is distillation.
    The default is one epoch over the training part of the data.
    """
    torch, _ = require_torch()
    t0 = time.perf_counter()
    loaded = _loaded(pruned)
    if (labels is None) == (teacher is None):
        raise LobsError("give either labels (a key in the data) or a teacher model, not both and not neither")
    if iterations is not None and epochs is not None:
        raise LobsError("give either iterations or epochs, not both")
    if batch_size < 1 or (iterations is not None and iterations < 1) or (epochs is not None and not epochs > 0):
        raise LobsError("batch size, iterations and epochs must be positive")
    if not (lr > 0 and math.isfinite(lr)):
        raise LobsError(f"learning rate must be a positive number, got {lr}")
    teacher_loaded = None if teacher is None else _loaded(teacher)
    arrays, targets = _training_data(data, loaded.model, labels)
    n = len(next(iter(arrays.values())))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    h = min(max(n // HOLDOUT_FRACTION, 1), HOLDOUT_MAX) if n >= HOLDOUT_FRACTION else 0
    held_idx, train_idx = np.sort(order[:h]), order[h:]
    if iterations is None:
        iterations = max(1, math.ceil((epochs or 1.0) * len(train_idx) / batch_size))

    torch.manual_seed(seed)
    gm = convert(loaded)
    held = _hold_zeros(gm, loaded)
    timings = {"convert": time.perf_counter() - t0}
    check_idx = held_idx if h else train_idx[:256]
    check_conversion(gm, loaded, arrays, check_idx)
    teach = _Teacher(teacher_loaded, loaded.model) if teacher_loaded else None
    loss_fn = _Loss(loaded.model, targets, teach)

    before = _metrics(gm, arrays, held_idx, loss_fn)
    t = time.perf_counter()
    curve = _train(gm, held, arrays, train_idx, loss_fn, iterations, batch_size, lr, seed, progress)
    timings["train"] = time.perf_counter() - t
    after = _metrics(gm, arrays, held_idx, loss_fn)

    t = time.perf_counter()
    model = export(gm, loaded.model, arrays, check_idx)
    timings["export"] = time.perf_counter() - t
    t = time.perf_counter()
    checks = check_export(loaded, model, gm, held, arrays, check_idx)
    timings["check"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    layers = [{"name": k.name, "op": k.op, "params": int(k.param.numel()),
               "zeros": int((k.keep == 0).sum())} for k in held]
    report = RetrainReport(loss_fn.kind, iterations, iterations * batch_size / max(len(train_idx), 1),
                           batch_size, lr, seed, "Adam, cosine decay to 0",
                           {"train": int(len(train_idx)), "held_out": int(h)}, layers, curve, before, after,
                           checks, timings, {**versions(), "torch": torch.__version__,
                                             "onnx2torch": metadata.version("onnx2torch")})
    _stamp(model, loaded.model, report)
    return RetrainResult(model, report)


# ----------------------------------------------------------------------------- inputs

def _loaded(model) -> LoadedModel:
    if hasattr(model, "model") and hasattr(model, "masks"):  # a PruneResult
        model = model.model
    return as_loaded(model)


def _training_data(data, model, labels):
    """The data's input arrays, and the label array when labels are asked for."""
    fixed = [s.name for s in input_specs(model) if s.shape and s.shape[0] is not None]
    if fixed:
        raise LobsError(f"input '{fixed[0]}' has a fixed batch size; retraining needs a dynamic batch axis")
    extra = (labels, "labels") if labels else ("labels",)  # a labelled file also serves distillation
    source = open_source(data, model, extra_ok=extra)
    if not isinstance(source, ArraySource):
        raise LobsError(f"{getattr(source, 'origin', data)}: retraining reads one .npz file or a dict of "
                        "arrays (not a folder or a reader): it needs random access to shuffle")
    if getattr(source, "per_sample", False):
        raise LobsError(f"{source.origin}: retraining needs every input batched on axis 0 (rank as the model's)")
    y = None
    if labels:
        y = source.extra.get(labels)
        if y is None:
            raise LobsError(f"{source.origin}: has no labels under key '{labels}'")
        if y.dtype.kind not in "iu" or y.ndim < 1 or y.shape[0] != source.n:
            raise LobsError(f"{source.origin}: labels '{labels}' must be integers with one entry per sample, "
                            f"got {y.dtype} {list(y.shape)} for {source.n} samples")
    return source.arrays, y


# ----------------------------------------------------------------------------- torch side

def _hold_zeros(gm, loaded: LoadedModel) -> list[_Held]:
    """Make every prunable layer's weight (and a bias held in a buffer) a Parameter, with its mask.

    onnx2torch turns Gemm and Conv into Linear/Conv modules whose weight is a Parameter, but a
    MatMul's constant operand (and a Gemm it cannot map onto Linear) stays a buffer, which would
    not train. Initializer names do not survive, so each layer is found through its node's output.
    """
    by_output = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mapping = getattr(gm.get_submodule(n.target), "onnx_mapping", None)
            for o in getattr(mapping, "outputs", ()):
                by_output[o] = n
    layers, _ = find_layers(loaded)
    index = GraphIndex(loaded.model)
    held, seen = [], set()
    for layer in layers:
        if layer.dtype not in ("float32", "float64"):
            raise LobsError(f"layer {layer.name}: weight is stored as {layer.dtype}; retraining supports "
                            "float32 and float64 weights")
        owners = []
        for use in layer.uses:
            node = use.node
            fx = by_output.get(node.output[0])
            if fx is None:
                raise LobsError(f"layer {layer.name}: not found in the converted model (inside a subgraph?)")
            owners.append(_parameter(gm, fx, node, 1, layer.name))
            if len(node.input) > 2 and node.input[2]:
                _parameter(gm, fx, node, 2, layer.name)
            # MatMul + Add: the Add's constant is a bias
            for usage in index.at(use.site.path).node.outputs[0].uses():
                add = index.site(usage.node).proto
                if add.op_type == "Add" and add.output[0] in by_output:
                    k = 1 - usage.idx
                    if usage.node.inputs[k] is not None and usage.node.inputs[k].is_initializer():
                        _parameter(gm, by_output[add.output[0]], add, k, layer.name, required=False)
        p = owners[0][2]
        for o, a, _ in owners[1:]:  # one weight used by several nodes: tie the copies onnx2torch made
            delattr(o, a)
            o.register_parameter(a, p)
        if id(p) in seen:
            continue
        seen.add(id(p))
        keep = (p.detach() != 0).to(p.dtype)
        if int((keep == 0).sum()) != int(np.sum(layer.read() == 0)):
            raise AssertionError(f"layer {layer.name}: zeros differ after conversion")
        held.append(_Held(layer.name, layer.op, p, keep))
    return held


def _parameter(gm, fx, node, index: int, layer: str, required: bool = True):
    """(owner, attribute, Parameter) holding input `index` of a converted node; a buffer becomes a Parameter."""
    import torch
    from torch import nn

    module = gm.get_submodule(fx.target)
    core = module[-1] if isinstance(module, nn.Sequential) else module  # a Conv after a Pad (auto_pad)
    if isinstance(core, (nn.Linear, nn.modules.conv._ConvNd)):
        attr = "weight" if index == 1 else "bias"
        return core, attr, getattr(core, attr)
    inputs = list(module.onnx_mapping.inputs)
    pos = inputs.index(node.input[index]) if node.input[index] in inputs else len(fx.args)
    arg = fx.args[pos] if pos < len(fx.args) else None
    while getattr(arg, "op", None) == "call_module" and type(gm.get_submodule(arg.target)).__name__.endswith(
            "Identity"):  # an Identity node between the constant and its user
        arg = arg.args[0]
    if getattr(arg, "op", None) == "get_attr":
        owner_name, _, attr = arg.target.rpartition(".")
        owner = gm.get_submodule(owner_name)
    elif getattr(arg, "op", None) == "call_module" and hasattr(gm.get_submodule(arg.target), "value"):
        owner, attr = gm.get_submodule(arg.target), "value"  # a Constant node
    elif required:
        raise LobsError(f"layer {layer}: its weight reaches torch through {getattr(arg, 'target', arg)}; "
                        "retraining cannot hold its zeros")
    else:
        return None
    value = getattr(owner, attr)
    if not isinstance(value, nn.Parameter) and torch.is_floating_point(value):
        delattr(owner, attr)
        value = nn.Parameter(value.detach().clone())
        owner.register_parameter(attr, value)
    return owner, attr, value


# ----------------------------------------------------------------------------- loss

class _Teacher:
    """The original model in onnxruntime: its outputs are the distillation targets."""

    def __init__(self, teacher: LoadedModel, student: onnx.ModelProto):
        names = [i.name for i in model_inputs(teacher.model)]
        want = [i.name for i in model_inputs(student)]
        if sorted(names) != sorted(want):
            raise LobsError(f"{teacher.path}: teacher inputs {names} differ from the pruned model's {want}")
        if len(teacher.model.graph.output) != len(student.graph.output):
            raise LobsError(f"{teacher.path}: teacher has {len(teacher.model.graph.output)} outputs, the pruned "
                            f"model {len(student.graph.output)}")
        self.path, self.inputs = teacher.path, names
        self.outputs = [o.name for o in teacher.model.graph.output]
        self.session = make_session(teacher.model)
        self.kinds = _output_kinds(teacher.model)

    def __call__(self, arrays, idx) -> list[np.ndarray]:
        return run(self.session, self.outputs, {k: arrays[k][idx] for k in self.inputs}, self.path)


def _output_kinds(model: onnx.ModelProto) -> list[str]:
    """Per output: 'probs' or 'logprobs' when a Softmax / LogSoftmax makes it, else 'scores'."""
    kinds = {"Softmax": "probs", "LogSoftmax": "logprobs"}
    return [kinds.get(getattr(v.producer(), "op_type", ""), "scores") for v in read_ir(model).graph.outputs]


def _log_probs(out, kind: str):
    import torch

    if kind == "logprobs":
        return out
    if kind == "probs":
        return torch.log(out.clamp_min(1e-12))
    return torch.log_softmax(out, 1)


def _is_class_scores(out) -> bool:
    return out.ndim >= 2 and out.shape[1] > 1 and out.is_floating_point()


class _Loss:
    """Cross-entropy against labels on the first output, or distillation on every output: KL on
    softmax for class scores (axis 1), MSE for anything else."""

    def __init__(self, model: onnx.ModelProto, labels, teacher: _Teacher | None):
        self.labels, self.teacher = labels, teacher
        self.kinds = _output_kinds(model)
        self.first_output = model.graph.output[0].name
        self.kind = "cross-entropy" if labels is not None else "distillation"

    def target(self, arrays, idx):
        import torch

        if self.teacher is None:
            return torch.from_numpy(self.labels[idx].astype(np.int64))
        return [torch.from_numpy(t) for t in self.teacher(arrays, idx)]

    def __call__(self, outs, target):
        import torch.nn.functional as F

        if self.teacher is None:
            out = outs[0]
            if not _is_class_scores(out) or tuple(target.shape) != (out.shape[0],) + tuple(out.shape[2:]):
                raise LobsError(f"labels of shape {list(target.shape)} do not fit output '{self.first_output}' "
                                f"{list(out.shape)}: cross-entropy needs class scores on axis 1")
            if int(target.min()) < 0 or int(target.max()) >= out.shape[1]:
                raise LobsError(f"labels must lie in [0, {out.shape[1]}) for output '{self.first_output}'")
            return F.nll_loss(_log_probs(out, self.kinds[0]), target)
        total = 0.0
        for out, ref, kind, tkind in zip(outs, target, self.kinds, self.teacher.kinds):
            if tuple(out.shape) != tuple(ref.shape):
                raise LobsError(f"{self.teacher.path}: teacher output {list(ref.shape)} and pruned model output "
                                f"{list(out.shape)} differ in shape")
            if _is_class_scores(out):
                total = total + F.kl_div(_log_probs(out, kind), _log_probs(ref, tkind), log_target=True,
                                         reduction="batchmean")
            else:
                total = total + F.mse_loss(out, ref.to(out.dtype))
        return total

    def metrics(self, outs, target) -> dict:
        """Summed loss and correct counts for one batch."""
        out, n = outs[0], outs[0].shape[0]
        m = {"loss": float(self(outs, target)) * n}
        if _is_class_scores(out):
            ref = target if self.teacher is None else target[0].argmax(1)
            key = "accuracy" if self.teacher is None else "top1_agreement"
            m[key] = int((out.argmax(1) == ref).sum())
        return m


def _metrics(gm, arrays, idx, loss_fn: _Loss, chunk: int = 1000) -> dict:
    """Loss, and accuracy (labels) or top-1 agreement with the teacher, on the held-out samples."""
    import torch

    if len(idx) == 0:
        return {}
    sums = {}
    with torch.no_grad():
        for i in range(0, len(idx), chunk):
            b = idx[i:i + chunk]
            for k, v in loss_fn.metrics(outputs(gm(*tensors(arrays, b))), loss_fn.target(arrays, b)).items():
                sums[k] = sums.get(k, 0) + v
    return {k: v / len(idx) for k, v in sums.items()}


# ----------------------------------------------------------------------------- training

def _train(gm, held: list[_Held], arrays, idx, loss_fn: _Loss, iterations, batch_size, lr, seed, progress):
    """Adam with a cosine decay to 0; masked gradients zeroed and masks re-applied after every step."""
    import torch
    from tqdm import tqdm

    params = [p for p in gm.parameters() if p.requires_grad]
    if not params:
        raise LobsError("the converted model has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / iterations)))
    gen = torch.Generator().manual_seed(seed)
    every = max(1, iterations // CURVE_POINTS)
    curve, window, count, it = [], 0.0, 0, 0
    bar = tqdm(total=iterations, desc="retraining", unit="it", disable=None if progress else True, file=sys.stderr, leave=False)
    try:
        while it < iterations:
            for batch in torch.randperm(len(idx), generator=gen).split(batch_size):
                if it == iterations:
                    break
                b = idx[batch.numpy()]
                loss = loss_fn(outputs(gm(*tensors(arrays, b))), loss_fn.target(arrays, b))
                if not torch.isfinite(loss):
                    raise LobsError(f"retraining diverged at iteration {it + 1} (loss {float(loss)}): "
                                    "use a lower learning rate")
                opt.zero_grad()
                loss.backward()
                for k in held:
                    if k.param.grad is not None:
                        k.param.grad.mul_(k.keep)
                opt.step()
                sched.step()
                with torch.no_grad():
                    for k in held:
                        k.param.mul_(k.keep)
                it += 1
                window, count = window + loss.item(), count + 1
                if it % every == 0 or it == iterations:
                    curve.append((it, window / count))
                    bar.set_postfix(loss=f"{window / count:.4f}")
                    window, count = 0.0, 0
                bar.update(1)
    finally:
        bar.close()
    for k in held:
        if bool((k.param.detach()[k.keep == 0] != 0).any()):
            raise AssertionError(f"layer {k.name}: a held weight moved")
    return curve


def _stamp(model: onnx.ModelProto, pruned: onnx.ModelProto, report: RetrainReport) -> None:
    """Keep the pruned model's metadata and add one entry for the retraining."""
    from .version import __version__

    del model.metadata_props[:]
    for p in pruned.metadata_props:
        if p.key != METADATA_KEY:
            model.metadata_props.add(key=p.key, value=p.value)
    value = {"version": __version__, "loss": report.loss, "iterations": report.iterations,
             "batch_size": report.batch_size, "lr": report.lr, "seed": report.seed}
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(value, sort_keys=True))

