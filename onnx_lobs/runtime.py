"""onnxruntime in one place: sessions (models over 2 GB through a temporary external-data file)
and runs, each failure one line naming the model or the data."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import LobsError, one_line
from .modelio import over_limit, tensor_bytes

ort.set_default_logger_severity(4)  # fatal only: our own one-line errors say what failed


def make_session(model: onnx.ModelProto, origin: str | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session; models over 2 GB go through a temporary file with external data.
    origin (the model's file) starts the error message when onnxruntime refuses the model."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # run-time errors too (level 3 still prints them, in colour)
    # No spin-waiting between runs: our runs alternate with BLAS work (Hessian sums, solves) on the
    # same cores, and spinning threads made its small factorisations several times slower.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:  # a fixed thread count, for timings that say what they used
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    try:
        if not over_limit(model):
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        light, names, arrays = _without_large_initializers(model)
        if not over_limit(light):  # the large tensors handed over from memory
            opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
            session = ort.InferenceSession(light.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            session.lobs_arrays = arrays  # they back the session's initializers: keep them alive
            return session
        with tempfile.TemporaryDirectory(prefix="onnx-lobs-") as folder:
            # onnx externalises tensors in place: save a copy so the caller's model is untouched.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            path = os.path.join(folder, "model.onnx")
            onnx.save_model(copy, path, save_as_external_data=True, location="model.onnx.data")
            del copy
            return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise LobsError(f"{origin + ': ' if origin else ''}onnxruntime cannot load the model: {one_line(e)}") \
            from None


def _without_large_initializers(model: onnx.ModelProto, limit: int = 1 << 20):
    """(the model with each main-graph initializer over limit bytes left as a placeholder, their
    names, their arrays): a model over 2 GB that onnxruntime can take without a disk copy."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    names, arrays = [], []
    for t in model.graph.initializer:
        if tensor_bytes(t) > limit:
            names.append(t.name)
            arrays.append(numpy_helper.to_array(t))
            stub = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                               data_location=onnx.TensorProto.EXTERNAL)
            stub.external_data.add(key="location", value="in-memory")
        else:
            light.graph.initializer.append(t)
    return light, names, arrays


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend") and not isinstance(value, (str, bytes)):  # a repeated field
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def run(session: ort.InferenceSession, names: list[str], feed: dict, origin: str) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as e:
        raise LobsError(f"{origin}: onnxruntime failed: {one_line(e)}") from None


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]
