"""One adapter per prunable op, one module per family of ops; the registry finds them.

Each module of this package ends with `ADAPTERS = (...)`, instances that satisfy
base.Adapter; they are collected here by op type. Adding an op is adding such a module: no
list elsewhere names the ops.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Iterator

import numpy as np

from ..errors import LobsError
from .base import Adapter, Geometry, node_attrs  # noqa: F401  (the package's public names)
from .conv import conv_pads  # noqa: F401


def _collect() -> dict[str, Adapter]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for adapter in getattr(module, "ADAPTERS", ()):
            if not isinstance(adapter, Adapter):
                raise TypeError(f"{info.name}: {type(adapter).__name__} does not implement layers.base.Adapter")
            found[adapter.op] = adapter
    return found


ADAPTERS: dict[str, Adapter] = _collect()

# Ops that carry weights we do not prune, so inspect() explains why it leaves them: quantized
# ones always, the others only when they hold a constant (an Einsum of two activations holds none).
QUANTIZED_WEIGHTED = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")
WEIGHTED_OPS = set(ADAPTERS) | set(QUANTIZED_WEIGHTED)


def not_prunable(op: str) -> str:
    """Why a weighted op without an adapter is not pruned."""
    return "quantized operator" if op in QUANTIZED_WEIGHTED else f"{op} is not supported yet"


UNSUPPORTED_WEIGHTED = {"LSTM": "recurrent layer (LSTM) is not supported yet",
                        "GRU": "recurrent layer (GRU) is not supported yet",
                        "RNN": "recurrent layer (RNN) is not supported yet",
                        "Einsum": "Einsum is not supported yet; export the layer as MatMul or Gemm"}


def unfold(adapter: Adapter, node, x: np.ndarray, weight_shape) -> Iterator[np.ndarray]:
    """Columns [groups, n, cols] of one input batch, in chunks of bounded size.

    float64 inputs give float64 columns, any other float type float32 ones (no rounding either
    way: the accumulator decides the precision of the products). Chunks may be views of x, or
    Fortran-ordered per group (conv); treat them as read-only.

    Inputs gathered from Loop/Scan iterations arrive stacked with extra leading axes; those are
    more samples, so they are merged into the op's own sample axis first.
    """
    if x.size == 0:
        return iter(())
    if not np.isfinite(x).all():  # one NaN would poison the whole Hessian, then every weight
        raise LobsError(f"layer {node.name or node.op_type}: its input contains NaN or Inf on the calibration data")
    rank = adapter.input_rank(weight_shape)
    if rank is not None and x.ndim > rank:
        x = x.reshape((-1,) + x.shape[x.ndim - rank + 1:])
    return adapter.unfold(node, x, weight_shape)
