"""onnxruntime in one place: sessions (models over 2 GB through a temporary external-data file)
and runs, each failure one line naming the model or the data."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from .errors import LobsError, one_line
from .modelio import PROTOBUF_LIMIT

ort.set_default_logger_severity(4)  # fatal only: our own one-line errors say what failed


def make_session(model: onnx.ModelProto, origin: str | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session; models over 2 GB go through a temporary file with external data.
    origin (the model's file) starts the error message when onnxruntime refuses the model."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # run-time errors too (level 3 still prints them, in colour)
    if threads:  # a fixed thread count, for timings that say what they used
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
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


def run(session: ort.InferenceSession, names: list[str], feed: dict, origin: str) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as e:
        raise LobsError(f"{origin}: onnxruntime failed: {one_line(e)}") from None


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]
