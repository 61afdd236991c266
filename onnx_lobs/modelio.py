"""Models in and out: load with external data (every failure one line naming the file), save
atomically (external data for models over the 2 GB protobuf limit), the callers' inputs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, TensorProto
from onnx.external_data_helper import load_external_data_for_model, set_external_data, uses_external_data

from .atomic import publish
from .errors import LobsError, one_line

PROTOBUF_LIMIT = 2_000_000_000


def over_limit(model: ModelProto) -> bool:
    """Whether the model serialises to 2 GB or more. Its tensors' data alone (dims x item size,
    counted without touching the bytes) settles it both ways for almost every model; only
    between 1 and 2 GB of data does it take ModelProto.ByteSize, which walks every byte (5 s
    at 2 GB)."""
    data = 0
    for g in iter_graphs(model.graph):
        tensors = list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
        for t in tensors:
            data += tensor_bytes(t)
    if data >= PROTOBUF_LIMIT:
        return True
    return data >= PROTOBUF_LIMIT // 2 and model.ByteSize() >= PROTOBUF_LIMIT


def tensor_bytes(t: TensorProto) -> int:
    """The bytes of a tensor's data held in the proto (0 when external), from its dims and type."""
    return 0 if t.data_location == TensorProto.EXTERNAL else math.prod(t.dims) * _ITEM_BYTES.get(t.data_type, 8)


_ITEM_BYTES = {TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
               TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
               TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
               TensorProto.BOOL: 1}


@dataclass
class LoadedModel:
    model: ModelProto
    path: str
    external: set[str] = field(default_factory=set)  # tensors that lived in external data


def load_model(path: str) -> LoadedModel:
    """Load a model with its external data; every failure is one line naming the file."""
    if os.path.isdir(path):
        raise LobsError(f"{path}: is a folder, not a model file")
    if not os.path.isfile(path):
        raise LobsError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except OSError as e:
        raise LobsError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # protobuf raises several unrelated types for garbage input
        raise LobsError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise LobsError(f"{path}: not an ONNX model (no graph)")
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            raise LobsError(f"{path}: opset {op.version} is newer than the newest this onnx knows ({newest})")
    external = {t.name for t in _all_tensors(model) if uses_external_data(t)}
    try:
        load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as e:
        raise LobsError(f"{path}: cannot read its external data ({one_line(e)})") from None
    try:
        onnx.checker.check_model(path if over_limit(model) else model)
    except Exception as e:
        raise LobsError(f"{path}: invalid ONNX model: {one_line(e)}") from None
    for t in _all_tensors(model):
        if t.name not in external:  # (external data was checked against its declared length on loading)
            _check_tensor(t, path)
    return LoadedModel(model, path, external)


# Element types stored several to a byte: their raw size is not count * itemsize.
PACKED_TYPES = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                if hasattr(TensorProto, n)}


def _check_tensor(t: TensorProto, path: str) -> None:
    """The checker accepts a constant whose bytes do not fit its shape and type; say so by name."""
    if t.data_type == TensorProto.STRING or t.data_type in PACKED_TYPES:
        return
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        raise LobsError(f"{path}: tensor '{t.name}' has an unknown element type ({t.data_type})") from None
    if t.HasField("raw_data"):
        have, need = len(t.raw_data), math.prod(t.dims) * itemsize
        if have != need:
            kind = TensorProto.DataType.Name(t.data_type).lower()
            raise LobsError(f"{path}: tensor '{t.name}' holds {have} bytes, but {list(t.dims)} of {kind} takes {need}")


def _all_tensors(model: ModelProto):
    for g in iter_graphs(model.graph):
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t


def iter_graphs(graph: GraphProto):
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from iter_graphs(g)


def save_model(model: ModelProto, path: str, external: bool | None = None) -> None:
    """Write atomically: each file is written out of sight in the target's folder, then renamed
    into place -- the external data (with external=True, the default for models over the 2 GB
    protobuf limit: PATH.data beside it) first, then the model -- with SIGINT, SIGTERM and
    SIGHUP held back from the first rename to the last. Where the system offers anonymous files
    (Linux O_TMPFILE), a write cut short leaves nothing behind even under SIGKILL: the file gets
    a hidden name only just before its rename. Elsewhere it is a hidden temporary file, removed
    on any error or Ctrl-C.
    """
    name = os.path.basename(path)
    big = over_limit(model) if external is None else external
    if not big:
        publish(path, [(name, lambda f: f.write(model.SerializeToString()))])
        return
    copy = ModelProto()  # the weights move to the data file: the caller's model stays intact
    copy.CopyFrom(model)
    publish(path, [(name + ".data", lambda f: _externalize(copy, name + ".data", f)),
                    (name, lambda f: f.write(copy.SerializeToString()))])


EXTERNAL_THRESHOLD = 1024  # initializers of at least this many bytes go to the data file (as onnx does)


def _externalize(model: ModelProto, location: str, out) -> None:
    """Move every initializer's raw bytes of at least EXTERNAL_THRESHOLD, in every graph, into
    the open file `out`, leaving location, offset and length in the tensor."""
    offset = 0
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            data = t.raw_data if t.HasField("raw_data") else b""  # (one copy of the bytes, not two)
            if len(data) >= EXTERNAL_THRESHOLD:
                size = out.write(data)
                del data
                set_external_data(t, location, offset, size)
                t.ClearField("raw_data")
                offset += size


def model_inputs(model: ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller must feed: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def as_loaded(model, private: bool = False) -> LoadedModel:
    """A path, a ModelProto or a LoadedModel as a LoadedModel. private=True: the caller will
    change it, so a model given in memory is copied (a path is loaded afresh anyway)."""
    if isinstance(model, (LoadedModel, onnx.ModelProto)):
        proto = model.model if isinstance(model, LoadedModel) else model
        if private:
            copy = ModelProto()
            copy.CopyFrom(proto)
            proto = copy
        if isinstance(model, LoadedModel):
            return LoadedModel(proto, model.path, set(model.external) if private else model.external)
        return LoadedModel(proto, "<model>")
    return load_model(str(model))
