"""The memory budget: how many bytes of Hessian sums may be alive at once, and the blocks of
layers, in graph order, whose sums fit in it.

A Hessian sum is [cols, cols] float64 per group, with a held-out twin, and twice the columns in
sequential mode: a 1B Llama's sums over all layers are about 24 GB, on a 24 GB machine. Cut into
blocks (segments.py runs each block's part of the graph once, so every node still runs once per
model and mode), only one block's sums are alive: they are dropped once its layers are solved.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .activations import Collector
from .errors import LobsError
from .hessian import sums_nbytes

# The share of physical memory the sums may take by default: onnxruntime's copy of the weights,
# the model itself and one batch's activations need the rest.
DEFAULT_SHARE = 0.25
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def physical() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on this platform
        return 8 << 30


def default_budget() -> int:
    return int(physical() * DEFAULT_SHARE)


def parse_size(text: str) -> int:
    """'6G', '512M', '1.5GB', '2e9' or a plain number of bytes (units are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if m is None:
        raise LobsError(f"--memory-budget: '{text}' is not a size (for example 6G, 512M or 2000000000)")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise LobsError(f"--memory-budget must be positive, got '{text}'")
    return size


def size_text(n: float) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def sums_bytes(c: Collector) -> int:
    """The bytes of a collector's calibration and held-out sums once filled."""
    g = c.layer.geometry
    return 2 * sums_nbytes(g.groups, g.cols * (2 if c.joint else 1))


@dataclass
class Plan:
    """The blocks (lists of collectors, graph order) and what they need."""

    blocks: list[list[Collector]]
    budget: int
    total: int  # bytes of all distinct sums at once
    peak: int  # bytes of the largest block's
    cut: bool  # the budget split what would otherwise be one pass (or one stage)

    def summary(self) -> dict:
        return {"budget": self.budget, "hessian_bytes": self.total, "block_bytes": self.peak,
                "blocks": len(self.blocks), "cut": self.cut}


def _groups(collectors: list[Collector]) -> list[list[Collector]]:
    """Collectors that will share sums (activations.share), in order of their first member."""
    by_key: dict[tuple, list[Collector]] = {}
    for c in collectors:
        by_key.setdefault(c.input_key(), []).append(c)
    return list(by_key.values())


def pack(stages: list[list[Collector]], budget: int, where: str, across: bool) -> Plan:
    """Blocks of consecutive layers whose distinct sums fit the budget. across=False keeps a block
    inside one stage (sequential mode: a stage's layers do not depend on each other, so any split
    of a stage is valid; two stages in one block are not). A group whose sums alone exceed the
    budget is an error that names it."""
    blocks, block, used, total, peak, cut = [], [], 0, 0, 0, False
    for s, stage in enumerate(stages):
        for group in _groups(stage):
            need = sums_bytes(group[0])
            if need > budget:
                names = ", ".join(c.layer.name for c in group)
                raise LobsError(f"{where}: layer {names} needs {size_text(need)} of Hessian sums "
                                f"(calibration and held-out), more than --memory-budget {size_text(budget)}")
            if block and used + need > budget:
                blocks.append(block)
                block, used, cut = [], 0, True
            block += group
            used += need
            total += need
            peak = max(peak, used)
        if block and not across:
            blocks.append(block)
            block, used = [], 0
    if block:
        blocks.append(block)
    return Plan(blocks, budget, total, peak, cut)
