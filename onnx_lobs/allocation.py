"""How much each layer is pruned: uniform, per-layer overrides, default exclusions, or global.

Global allocation ranks every weight of the model by its OBS removal cost, normalised by its
layer's output energy, and removes the cheapest ones: L_q / E_l with L_q = w_q^2 / (2 [H^-1]_qq)
and E_l = (1/2n) sum ||W_l x||^2, i.e. each weight's share of its layer's relative error. The
costs within a layer are sorted, so the summed relative errors are convex in the counts and
taking the globally cheapest weights is the best allocation of the removals for that sum.
"""

from __future__ import annotations

import heapq

import numpy as np

from .graph import Layer, matches
from .index import read_ir
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


def input_derived(model) -> set[str]:
    """Names of the graph inputs and of tensors computed from them by preprocessing ops alone."""
    graph = read_ir(model).graph
    # constants, and shapes of anything (a dynamic Reshape's)
    consts = set(graph.initializers.values())
    derived = set(graph.inputs) - consts
    for node in graph:  # nodes are stored in topological order
        ins = [v for v in node.inputs if v is not None and v.name]
        if node.op_type in ("Constant", "Shape", "Size") or (ins and all(v in consts for v in ins)
                                                              and not node.op_type.startswith("Random")):
            consts.update(node.outputs)
        elif (node.op_type in PREPROCESSING and any(v in derived for v in ins)
                and all(v in derived or v in consts for v in ins)):
            derived.update(node.outputs)
    return {v.name for v in derived}


def default_exclusion(layer: Layer, raw_inputs: set[str]) -> str | None:
    """Why a layer is left dense unless asked for: a first layer with very few inputs.

    Such layers (an RGB or grayscale stem) hold few weights, and every output depends on each
    of them, so pruning them saves little and costs much. raw_inputs is input_derived()'s set.
    """
    fan_in = layer.adapter.fan_in(layer.uses[0].node, layer.shape)
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


def allocate_channels(costs: list[list[float]], savings: list[float], target: float) -> list[int]:
    """Per-group removal counts: the cheapest next removal per unit saved, over all groups, until
    `target` is saved. costs[g] are group g's successive removal costs (its greedy order: a group
    only ever removes a prefix); savings[g] what one of its channels saves (1 for a channel count,
    its FLOPs for a FLOPs target). It follows each group's order, so it never jumps to a far count
    that a fitted cost curve promises cheap."""
    taken = [0] * len(costs)
    heap = [(c[0] / s, g) for g, (c, s) in enumerate(zip(costs, savings)) if c and s > 0]
    heapq.heapify(heap)
    saved = 0.0
    while heap and saved < target:
        _, g = heapq.heappop(heap)
        taken[g] += 1
        saved += savings[g]
        if taken[g] < len(costs[g]):
            heapq.heappush(heap, (costs[g][taken[g]] / savings[g], g))
    return taken


def cheapest_choice(options: list[list[tuple[float, float]]], target: float, bins: int = 2000) -> list[int]:
    """One option per group, (saving, cost) each, with the least total cost whose savings reach
    target: a multiple-choice knapsack by dynamic programming over the savings, counted in
    target/bins steps and rounded down (so the choice never saves less than it counts). A
    greedy by cost per unit saved would take a group's big step (half of a 16-channel layer, when
    kept counts are multiples of 8) that passes the target far, where smaller steps elsewhere
    would do. Out of reach: every group's largest saving."""
    if target <= 0:
        return [0] * len(options)
    if sum(max(s for s, _ in opts) for opts in options) < target:
        return [max(range(len(opts)), key=lambda j: opts[j][0]) for opts in options]
    scale = bins / target
    best = np.full(bins + 1, np.inf)
    best[0] = 0.0
    picks, prevs = [], []
    for opts in options:
        new, pick, prev = np.full(bins + 1, np.inf), np.zeros(bins + 1, np.int64), np.zeros(bins + 1, np.int64)
        states = np.arange(bins + 1)
        for j, (saving, cost) in enumerate(opts):
            step = min(bins, int(saving * scale + 1e-9))
            cand, source = np.full(bins + 1, np.inf), np.zeros(bins + 1, np.int64)
            cand[step:bins] = best[:bins - step] + cost
            source[step:bins] = states[:bins - step]
            tail = bins - step + int(np.argmin(best[bins - step:]))  # every state from here on reaches the cap
            cand[bins], source[bins] = best[tail] + cost, tail
            better = cand < new
            new[better], pick[better], prev[better] = cand[better], j, source[better]
        best = new
        picks.append(pick)
        prevs.append(prev)
    if not np.isfinite(best[bins]):
        # Reachable only in exact counts, lost to the rounding down (the target is every group's
        # largest saving, or within a few steps of it: --global with --pattern N:M, where every
        # layer must take the pattern): every group's largest saving does reach it.
        return [max(range(len(opts)), key=lambda j: opts[j][0]) for opts in options]
    chosen, state = [0] * len(options), bins
    for g in range(len(options) - 1, -1, -1):
        chosen[g], state = int(picks[g][state]), int(prevs[g][state])
    return chosen
