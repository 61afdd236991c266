"""How much each layer is pruned: uniform, per-layer overrides, default exclusions, or global.

Global allocation ranks every weight of the model by its OBS removal cost, normalised by its
layer's output energy, and removes the cheapest ones: L_q / E_l with L_q = w_q^2 / (2 [H^-1]_qq)
and E_l = (1/2n) sum ||W_l x||^2, i.e. each weight's share of its layer's relative error. The
costs within a layer are sorted, so the summed relative errors are convex in the counts and
taking the globally cheapest weights is the best allocation of the removals for that sum.
"""

from __future__ import annotations

import numpy as np

from .graph import Layer, matches
from .hessian import damped_inverse

FEW_INPUTS = 16  # a first layer reading fewer input channels than this is left dense by default
# Ops that exporters put between the image and the stem (NHWC->NCHW, normalisation, padding, casts):
# a layer reading their output still reads the raw input.
PREPROCESSING = {"Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Pad",
                 "Sub", "Add", "Mul", "Div", "Slice"}
CURVE_DAMP = 0.01


def explicit_sparsity(layer: Layer, layer_sparsity: dict) -> float | None:
    """The last matching --layer-sparsity value, or None."""
    value = None
    for pattern, s in layer_sparsity.items():
        if matches(layer, pattern):
            value = s
    return value


def input_derived(graph) -> set[str]:
    """Names of the graph inputs and of tensors computed from them by preprocessing ops alone."""
    consts = {t.name for t in graph.initializer}  # constants, and shapes of anything (a dynamic Reshape's)
    derived = {i.name for i in graph.input} - consts
    for node in graph.node:  # nodes are stored in topological order
        ins = [x for x in node.input if x]
        if node.op_type in ("Constant", "Shape", "Size") or (ins and all(x in consts for x in ins)
                                                              and not node.op_type.startswith("Random")):
            consts.update(node.output)
        elif (node.op_type in PREPROCESSING and any(x in derived for x in ins)
                and all(x in derived or x in consts for x in ins)):
            derived.update(node.output)
    return derived


def default_exclusion(layer: Layer, raw_inputs: set[str]) -> str | None:
    """Why a layer is left dense unless asked for: a first layer with very few inputs.

    Such layers (an RGB or grayscale stem) hold few weights, and every output depends on each
    of them, so pruning them saves little and costs much. raw_inputs is input_derived()'s set.
    """
    fan_in = layer.shape[1] if layer.op == "Conv" else layer.geometry.cols
    first = all(u.x in raw_inputs and not u.x_scope for u in layer.uses)
    if first and fan_in < FEW_INPUTS:
        return (f"default exclusion: first layer with only {fan_in} input channel(s) "
                f"(--layer-sparsity or --no-default-exclude prunes it)")
    return None


def removal_costs(w: np.ndarray, h: np.ndarray, protect: np.ndarray | None) -> np.ndarray:
    """Every removable weight's OBS cost relative to the layer's output energy, sorted."""
    hinv = damped_inverse(h, CURVE_DAMP).hinv
    keep = np.ones(w.shape[1], bool) if protect is None else ~protect
    costs = (w[:, keep] ** 2 / (2 * np.diagonal(hinv)[keep])).ravel()
    energy = 0.5 * float(np.sum((w @ h) * w))
    return np.sort(costs / energy) if energy > 0 else np.zeros(costs.size)


def allocate(costs: list[np.ndarray], n_remove: int) -> list[int]:
    """Per-layer removal counts that take the n_remove globally cheapest weights."""
    if not costs:
        return []
    flat = np.concatenate(costs)
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(costs)])
    order = np.argsort(flat, kind="stable")[:max(0, min(n_remove, flat.size))]
    return np.bincount(owner[order], minlength=len(costs)).tolist()
