"""How many channels each group loses under --flops or --global: over every group's greedy
removals, the counts of least total cost that reach the target (a fraction of all channels, or
of the FLOPs).

The cost is the group's layer-wise OBS cost ("layer"), or that cost rescaled so that it predicts
the group's measured effect on the model's outputs ("output", the default): each group is pruned
alone to its allocated count, the held-out outputs are compared with the dense model's, and the
choice is made again with the rescaled costs until the counts settle. Single-group output
errors add up to the whole model's (ResNet-50 at 70% of the FLOPs: 1.175e-5 summed, 1.166e-5
measured together), which is what makes one sum over them right.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm import tqdm

from .channel_ops import is_depthwise
from .cuts import removed_units
from .flops import Flops
from .groups import Group
from .allocation import allocate_channels, cheapest_choice
from .solvers.channels import kept_count

ALLOCATIONS = ("output", "layer")
MAX_ROUNDS = 4  # choices made again with the costs measured at the counts of the last


@dataclass
class Trial:
    """One group's greedy run to the most it may lose: its channels in the order they go, and
    each removal's layer-wise cost."""

    group: Group
    order: list[int]
    costs: list[float]


@dataclass
class Allocation:
    counts: list[int]
    by: str  # "output" or "layer"
    output_errors: list = field(default_factory=list)  # per group, measured at its count (or None)
    rounds: int = 0
    probes: int = 0
    tried: list = field(default_factory=list)  # the predicted output rel L2 of each choice tried, in order

    def summary(self) -> dict:
        out = {"by": self.by, "rounds": self.rounds, "probes": self.probes, "tried": self.tried}
        if self.output_errors and all(e is not None for e in self.output_errors):
            out["predicted_rel_l2"] = math.sqrt(sum(self.output_errors))  # the sum of single-group errors
        return out


def unit_multiple(g: Group, round_to: int) -> int:
    """The multiple of channels that keeps the producers' kept units a multiple of round_to."""
    return round_to // math.gcd(round_to, g.width)


def touched_nodes(g: Group) -> set[int]:
    """Main-graph positions of the nodes whose FLOPs a group changes: its layers, depthwise
    Convs and activation products (attention's MatMuls)."""
    nodes = {p.layer.uses[0].site.path[-1] for p in g.producers} | set(g.products)
    nodes |= {c.layer.uses[0].site.path[-1] for c in g.consumers}
    return nodes | {e.node[-1] for e in g.edits if e.kind == "depthwise"}


def rounded(g: Group, n: int, round_to: int) -> int:
    """n removals adjusted so that the kept count is a whole multiple (unit_multiple)."""
    c = g.channels
    return c - kept_count(c, n / c, unit_multiple(g, round_to)) if n else 0


def choose_counts(trials: list[Trial], config, dense: Flops, layers,
                  measure: Callable[[int, int], float] | None = None) -> Allocation:
    """Removal counts per group. measure(g, n): the output error of group g alone losing the first
    n channels of its order; without it the layer-wise costs decide."""
    counts = _counts(trials, [t.costs for t in trials], config, dense, layers)
    if measure is None:
        return Allocation(counts, "layer")
    seen: dict[tuple[int, int], float] = {}
    bar = tqdm(desc="allocating by output", unit="probe", disable=None if config.progress else True,
               file=sys.stderr, leave=False)

    def at(g: int, n: int) -> None:
        if n and (g, n) not in seen:
            seen[g, n] = measure(g, n)
            bar.update(1)
    rounds, tried = 0, []
    for rounds in range(1, MAX_ROUNDS + 1):
        for g, t in enumerate(trials):
            at(g, counts[g] or _probe_level(t, config.round_to))
        tried.append(counts)
        costs = [_output_costs(t.costs, {n: e for (k, n), e in seen.items() if k == g})
                 for g, t in enumerate(trials)]
        new = _counts(trials, costs, config, dense, layers, greedy=True)
        if new == counts:
            break
        counts = new
    if counts not in tried:  # the rounds ran out before the counts settled
        for g, n in enumerate(counts):
            at(g, n)
        tried.append(counts)
    bar.close()

    def total(c: list[int]) -> float:
        return sum(seen[g, n] for g, n in enumerate(c) if n)
    # every choice tried meets the target, and each has all its groups measured: the curves are
    # fitted through few points, so the best of the choices measured beats trusting the last one
    counts = min(tried, key=total)
    errors = [seen[g, n] if n else 0.0 for g, n in enumerate(counts)]
    return Allocation(counts, "output", errors, rounds, len(seen), [math.sqrt(total(c)) for c in tried])


def _probe_level(t: Trial, round_to: int) -> int:
    """Where a group the allocation left alone is measured: a quarter of what it may lose, rounded."""
    n = rounded(t.group, max(1, len(t.costs) // 4), round_to)
    return n if 0 < n <= len(t.costs) else (len(t.costs) if t.costs else 0)


def _output_costs(costs: list[float], points: dict[int, float]) -> list[float]:
    """Successive removal costs whose running sum passes through the measured output errors:
    the layer-wise running sum times a gain interpolated between the measured counts."""
    if not points or not costs:
        return costs
    total = np.maximum(np.cumsum(np.maximum(costs, 0.0)), 1e-300)
    ns = sorted(points)
    gains = [points[n] / total[n - 1] for n in ns]
    gain = np.interp(np.arange(1, len(costs) + 1), ns, gains)
    curve = gain * total
    return list(np.diff(np.r_[0.0, curve]))


def _counts(trials: list[Trial], costs: list[list[float]], config, dense: Flops, layers,
            greedy: bool = False) -> list[int]:
    """Counts over all groups that keep whole multiples (--round-to): the least total cost that
    reaches the target (allocation.cheapest_choice), or with greedy the cheapest next removal per
    unit saved, rounded (allocation.allocate_channels; for fitted output curves, see
    choose_counts). A FLOPs target is met exactly: a layer between two pruned groups saves less
    than both estimates together, so the target is raised until the FLOPs the choice leaves
    (exact: every counted op is bilinear in its input and output channels) are within it."""
    levels = [_levels(t, config.round_to) for t in trials]
    if config.flops is None:
        per = [1.0] * len(trials)
        target = config.global_sparsity * sum(t.group.channels for t in trials)
    else:
        per = [sum(dense.per_node.get(p, 0) for p in touched_nodes(t.group)) / t.group.channels for t in trials]
        goal = config.flops * dense.total
        target = dense.total - goal
    totals = [np.r_[0.0, np.cumsum(c)] for c in costs]
    options = [[(n * s, float(total[n])) for n in ns] for ns, s, total in zip(levels, per, totals)]

    def pick(target: float) -> list[int]:
        if greedy:
            return [rounded(t.group, n, config.round_to) for t, n in zip(trials, allocate_channels(costs, per, target))]
        return [ns[j] for ns, j in zip(levels, cheapest_choice(options, target))]
    for _ in range(20):
        counts = pick(target)
        if config.flops is None:
            return counts
        left = flops_left(layers, [t.group for t in trials], [t.order for t in trials], counts, dense)
        if left <= goal or all(n == ns[-1] for n, ns in zip(counts, levels)):
            break
        target += left - goal
    if left > goal and greedy:  # rounding each count to its multiple can keep the greedy off the target
        return _counts(trials, costs, config, dense, layers)
    if left > goal:
        warnings.warn(f"--flops {config.flops}: the groups that can be pruned leave "
                      f"{left / dense.total:.3f} of the FLOPs at most")
    return counts


def _levels(t: Trial, round_to: int) -> list[int]:
    """The removal counts a group may take: none, or any that keeps a whole multiple of channels."""
    c, m = t.group.channels, unit_multiple(t.group, round_to)
    return [0] + [n for n in range(1, len(t.costs) + 1) if (c - n) % m == 0 and c - n >= m]


def flops_left(layers, groups: list[Group], orders, counts, dense: Flops) -> float:
    """The model's FLOPs after removing each group's first counts[g] channels of its order:
    a layer's FLOPs scale with the kept fraction of its input and of its output units."""
    removed = removed_units([(g, order[:n]) for g, order, n in zip(groups, orders, counts)])
    total = float(dense.total)
    for layer in layers:
        site = layer.uses[0].site
        if site.scope:
            continue
        n_in, n_out = layer.adapter.channels(site.proto, layer.shape)
        kept_out = 1 - len(removed.get(site.node.outputs[0].name, ())) / n_out
        kept_in = 1.0 if is_depthwise(layer) else 1 - len(removed.get(site.node.inputs[0].name, ())) / n_in
        total -= dense.per_node.get(site.path[-1], 0) * (1 - kept_in * kept_out)
    products = {pos: out for g in groups for pos, out in g.products.items()}
    for pos, (name, size) in products.items():  # attention's MatMuls scale with their output
        if size and name in removed:
            total -= dense.per_node.get(pos, 0) * len(removed[name]) / size
    return total
