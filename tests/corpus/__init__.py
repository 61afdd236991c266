"""The model corpus: small models from many exporters, each with its own calibration generator.

tests/test_corpus.py checks every entry against the four conditions of issue 5, and
tools/corpus_table.py prints the results as the README table. Torch-exported entries are
committed files (tests/corpus/models/, written by tools/build_corpus.py); the others are built
here in code with onnx.helper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from . import exported, handmade


@dataclass(frozen=True)
class Entry:
    name: str
    source: str  # exporter or converter style
    ops: str  # what it covers, for the table
    make: Callable[[np.random.Generator, str], None] | None  # writes the model to a path (None: committed)
    calib: Callable  # (rng, n) -> n valid samples; per-sample entries also get the model's path
    skips: tuple = ()  # expected skips among the weighted ops: (op, reason substring, count)
    samples: int = 160
    per_sample: bool = False  # calibration arrays have one axis more than the inputs: arr[i] is one feed
    slow: bool = False
    needs: str | None = None  # a package feature the entry relies on (see tests/test_corpus.py)

    def model_path(self, folder: str) -> str:
        """The model on disk: the committed file, or one built into folder."""
        if self.make is None:
            return os.path.join(exported.HERE, exported.SPECS[self.name][0])
        path = os.path.join(folder, f"{self.name}.onnx")
        if not os.path.exists(path):
            self.make(np.random.default_rng(seed(self.name)), path)
        return path


    def calibration(self, n: int, path: str) -> dict:
        rng = np.random.default_rng(seed(self.name) + 1)
        return self.calib(rng, n, path) if self.per_sample else self.calib(rng, n)


def seed(name: str) -> int:
    return sum(map(ord, name))


def _saved(builder):
    def make(rng, path):
        onnx.save(builder(rng), path)
    return make


def _exported(name: str, **kw) -> Entry:
    file, source, generator, skips, ops = exported.SPECS[name]
    return Entry(name, source, ops, None, generator, skips, **kw)


ENTRIES = [
    _exported("resnet_blocks", samples=120),
    _exported("mobilenet_v3"),
    _exported("transformer_legacy"),
    _exported("transformer_dynamo"),
    _exported("audio_conv1d"),
    _exported("stft_frontend"),
    _exported("video_conv3d"),
    _exported("unet_decoder", needs="ConvTranspose", samples=100),
    _exported("lstm_gemm"),
    _exported("yolo_head", samples=120),
    _exported("fp16_cnn"),
    Entry("keras_nhwc", "tf2onnx style", "NHWC input, Transpose around Conv, depthwise SAME_UPPER, "
          "Dense as MatMul + Add, Softmax", _saved(handmade.keras_nhwc), handmade.keras_calib),
    Entry("paddle_constants", "paddle2onnx style", "weights in unnamed Constant nodes with unnamed tensors, "
          "MatMul + Add, Gemm transB=1", _saved(handmade.paddle_constants), handmade.paddle_calib),
    Entry("if_outer_weights", "onnx.helper", "If branches using outer-scope weights, one weight shared by "
          "both branches", _saved(handmade.if_outer), handmade.if_calib, samples=288),
    Entry("opset7_legacy", "onnx.helper (IR 3)", "initializers as graph inputs, unfused BatchNormalization, "
          "MaxPool, Flatten, Gemm transB=1", _saved(handmade.opset7), handmade.opset7_calib),
    Entry("quantized_mixed", "ORT quantizer style", "QuantizeLinear, QLinearConv, MatMul on DequantizeLinear "
          "weights, float Gemm head", _saved(handmade.quantized), handmade.quantized_calib,
          skips=(("QLinearConv", "quantized", 1), ("MatMul", "quantized", 1))),
    Entry("streaming_state", "onnx.helper", "no batch axis: frame [1,64], state [2,1,128], int64 scalar "
          "sample rate; Gather, Gemm, MatMul, Concat", _saved(handmade.streaming), handmade.streaming_calib,
          samples=200, per_sample=True),
    Entry("newest_opset", "onnx.helper", "model-local function, fp16 and bf16 weights behind Cast, grouped "
          "dilated Conv1d, Gemm alpha/beta, two inputs and outputs", _saved(handmade.newest_opset),
          handmade.newest_calib),
    Entry("large_external", "onnx.helper", "2.06 GB embedding table in external data, MatMul, Gemm",
          handmade.large_external, handmade.large_calib, samples=300, slow=True,
          skips=(("Gather", "embedding lookup", 1),)),
]

BY_NAME = {e.name: e for e in ENTRIES}
