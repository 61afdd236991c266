"""The adapter seam: what every prunable op must say about its weight and its input.

Every solver works on W[g] (rows x cols) and H[g] = mean x x^T per group g. An adapter is the
only place that knows how an op's weight tensor and input tensor map onto that picture, and how
whole channels map onto matrix rows and columns (what structured pruning removes), so adding an
op means adding one adapter module to this package, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
from onnx import NodeProto, helper

from ..hessian import FAST_ROWS

# Upper bound on the column data materialised at once while unfolding an input. Adapters read
# these at call time (base.CHUNK_BYTES), so a test can shrink them.
CHUNK_BYTES = 64 << 20
# At most this many rows (samples x output positions) per conv chunk: the accumulator's float32
# products take FAST_ROWS rows at a time, which it reads from such a chunk without copying.
CHUNK_ROWS = FAST_ROWS


@dataclass(frozen=True)
class Geometry:
    groups: int
    rows: int  # output units per group
    cols: int  # inputs per group, without the bias column


@runtime_checkable
class Adapter(Protocol):
    """How one op's weight is a stack of matrices [groups, rows, cols] and its input a stack of
    unfolded columns [groups, n, cols], so that each group's output is cols @ W[g].T (+ bias)."""

    op: str  # the ONNX op type
    weight_input: int  # which node input holds the weight
    bias_input: int | None  # which holds the bias (None: the op has none)
    family: str  # "conv" or "dense": how a layer is recognised after a round trip through torch

    def skip_reason(self, node: NodeProto, weight_shape: tuple) -> str | None:
        """Why this node's weight cannot be pruned, or None."""

    def geometry(self, node: NodeProto, weight_shape: tuple) -> Geometry: ...

    def view_key(self, node: NodeProto) -> tuple:
        """The attributes that decide the matrix view: nodes sharing a weight must agree on it."""

    def columns_key(self, node: NodeProto, weight_shape: tuple) -> tuple:
        """What, besides the input tensor, decides the unfolded columns: layers that read one
        tensor with equal keys have one Hessian (activations.share)."""

    def input_rank(self, weight_shape: tuple) -> int | None:
        """The rank the op's activation input has (None: any, leading axes are samples)."""

    def fan_in(self, node: NodeProto, weight_shape: tuple) -> int:
        """The input width the default exclusion of first layers compares with its threshold."""

    def to_matrices(self, node: NodeProto, w: np.ndarray) -> np.ndarray: ...

    def from_matrices(self, node: NodeProto, m: np.ndarray, like: np.ndarray) -> np.ndarray: ...

    def bias_vector(self, node: NodeProto, c: np.ndarray, rows: int) -> np.ndarray | None:
        """The bias as [groups, rows] in float64, or None when it is not one value per output."""

    def bias_from_vector(self, node: NodeProto, b: np.ndarray, like: np.ndarray) -> np.ndarray: ...

    def unfold(self, node: NodeProto, x: np.ndarray, weight_shape: tuple) -> Iterator[np.ndarray]:
        """Columns [groups, n, cols] of one input batch, in chunks of bounded size."""

    def lipschitz_factor(self, node: NodeProto, weight_shape: tuple) -> float:
        """|op(x)| <= factor * |W| * |x| for the matrix norm |W| (for the paper's bound)."""

    def nm_groups(self, node: NodeProto, weight_shape: tuple, m: int) -> np.ndarray | str:
        """Column indices [n_groups, m] of the N:M groups along the reduction axis, or why not."""

    def channels(self, node: NodeProto, weight_shape: tuple) -> tuple[int, int]:
        """(input channels, output channels) of the op: what structured pruning removes."""

    def input_columns(self, node: NodeProto, weight_shape: tuple, channels) -> np.ndarray:
        """Bool [groups, cols]: the matrix columns that read the given input channels."""

    def drop_outputs(self, node: NodeProto, w: np.ndarray, keep) -> np.ndarray:
        """The weight with only the output channels `keep` (sorted indices)."""

    def drop_inputs(self, node: NodeProto, w: np.ndarray, keep) -> np.ndarray:
        """The weight reading only the input channels `keep` (sorted indices)."""

    def drop_bias(self, node: NodeProto, b: np.ndarray, keep) -> np.ndarray:
        """The bias input with only the output channels `keep`."""


def node_attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def column_dtype(x: np.ndarray) -> np.dtype:
    """float64 inputs unfold to float64 columns, every other float type to float32 (exactly)."""
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def channel_groups(cg: int, k: int, m: int):
    """Groups of m input channels at one kernel position; columns are ordered (channel, position)."""
    if cg % m:
        return f"{cg} input channels per group do not divide into groups of {m}"
    channels = np.arange(cg).reshape(-1, m)
    return (channels[:, None, :] * k + np.arange(k)[None, :, None]).reshape(-1, m)


def contiguous_groups(cols: int, m: int):
    if cols % m:
        return f"reduction size {cols} does not divide into groups of {m}"
    return np.arange(cols).reshape(-1, m)


def checked_keep(keep, total: int, groups: int, what: str) -> np.ndarray:
    """keep (sorted distinct channel indices out of total, split into equal groups) as an index
    array, each group keeping as many as the others (the group attribute needs equal groups)."""
    keep = np.asarray(keep, dtype=np.int64)
    if keep.ndim != 1 or (keep.size and (keep.min() < 0 or keep.max() >= total)) \
            or np.any(np.diff(keep) <= 0):
        raise ValueError(f"{what}: keep must be sorted distinct indices below {total}")
    counts = np.bincount(keep // (total // groups), minlength=groups)
    if np.any(counts != counts[0]):
        raise ValueError(f"{what}: with group={groups}, every group must keep as many channels")
    return keep


def kept_per_group(keep, total: int, groups: int, what: str) -> np.ndarray:
    """keep (sorted channel indices out of total, split into equal groups) as local indices
    [groups, kept]; every group must keep the same positions when they share a weight axis."""
    keep = checked_keep(keep, total, groups, what)
    per = total // groups
    local = [keep[(keep >= g * per) & (keep < (g + 1) * per)] - g * per for g in range(groups)]
    if any(len(l) != len(local[0]) or np.any(l != local[0]) for l in local):
        raise ValueError(f"{what}: with group={groups}, every group must keep the same channels")
    return np.stack(local)
