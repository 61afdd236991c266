"""The torch-exported half of the corpus: committed .onnx files and their calibration generators.

The files in models/ are written by tools/build_corpus.py (torch, seeded) and read here without
torch. The constants below are shared with that script, so the generators here produce inputs
the exported graphs accept (token ids below the vocabulary size, masks with real lengths, ...).
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from .signals import features, images, smooth

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")

VOCAB, SEQ = 50, 12  # transformer token ids are in [0, VOCAB); 0 is padding
IMAGE = 16
AUDIO = 256
STFT_SAMPLES = 320
VIDEO = (4, 12, 12)  # frames, height, width
STEPS, FEATURES = 8, 6  # LSTM sequence


def image(rng, n):
    return {"image": images(rng, n, 3, IMAGE)}


def tokens(rng, n):
    """Token ids in range, padded after a random length; the mask marks the real tokens."""
    lengths = rng.integers(4, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, (n, SEQ)) * mask
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask}


def audio(rng, n):
    """Noise plus a few random tones, so the filters see structured, band-limited input."""
    t = np.arange(AUDIO) / AUDIO
    f = rng.uniform(2, 60, (n, 3, 1))
    tones = np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3, (n, 3, 1))).sum(1)
    return {"waveform": (tones + 0.3 * rng.standard_normal((n, AUDIO)))[:, None, :].astype(np.float32)}


def stft_audio(rng, n):
    t = np.arange(STFT_SAMPLES) / STFT_SAMPLES
    f = rng.uniform(5, 120, (n, 2, 1))
    x = np.sin(2 * np.pi * f * t).sum(1) + 0.2 * rng.standard_normal((n, STFT_SAMPLES))
    return {"samples": x.astype(np.float32)}


def video(rng, n):
    """Smooth in time as in space: frames of one clip differ little."""
    shared = smooth(rng, (n, 1) + VIDEO, axes=(-3, -2, -1))
    return {"clip": (shared + 0.4 * smooth(rng, (n, 3) + VIDEO, axes=(-3, -2, -1))).astype(np.float32)}


def sequence(rng, n):
    """A smooth random walk per feature: recurrent nets see correlated steps, not white noise."""
    return {"sequence": np.cumsum(rng.standard_normal((n, STEPS, FEATURES)) * 0.5, axis=1).astype(np.float32)}


def pyramid(rng, n):
    return {"p3": features(rng, n, 16, 8), "p4": features(rng, n, 32, 4)}


def image_fp16(rng, n):
    return {"image": images(rng, n, 3, IMAGE).astype(np.float16)}


ATTENTION = ("MatMul", "computed at run time", 4)  # q @ k^T and att @ v in each of 2 blocks
EMBEDDING = ("Gather", "embedding lookup", 1)  # the token table: reported, not a layer

# name -> (file, exporter, calibration generator, expected skips (op, reason substring, count), what it covers)
SPECS = {
    "resnet_blocks": ("resnet_blocks.onnx", "torch legacy", image, (),
                      "Conv+BN folded, residual Add, 1x1 stride-2 shortcut, GlobalAveragePool, Gemm transB=1"),
    "mobilenet_v3": ("mobilenet_v3.onnx", "torch legacy", image, (),
                     "depthwise Conv, squeeze-excite (1x1 Conv, Mul), HardSwish, HardSigmoid, Clip (ReLU6)"),
    "transformer_legacy": ("transformer_legacy.onnx", "torch legacy", tokens, (ATTENTION, EMBEDDING),
                           "int64 token ids + mask, Gather, MatMul [in,out] + Add, attention MatMuls, "
                           "Softmax, LayerNormalization, two outputs"),
    "transformer_dynamo": ("transformer_dynamo.onnx", "torch dynamo", tokens, (ATTENTION, EMBEDDING),
                           "the same network as transformer_legacy, dynamo exporter"),
    "audio_conv1d": ("audio_conv1d.onnx", "torch legacy", audio, (),
                     "Conv1d with strides, dilation, groups=4, depthwise"),
    "stft_frontend": ("stft_frontend.onnx", "torch legacy", stft_audio, (),
                      "fixed (non-learned) STFT basis as Conv1d, log power, Conv1d, Gemm"),
    "video_conv3d": ("video_conv3d.onnx", "torch legacy", video, (),
                     "Conv3d, grouped Conv3d with anisotropic strides, temporal Conv3d"),
    "unet_decoder": ("unet_decoder.onnx", "torch legacy", image, (),
                     "ConvTranspose (stride 2 and grouped), Resize (bilinear), Concat skips"),
    "lstm_gemm": ("lstm_gemm.onnx", "torch legacy", sequence,
                  (("LSTM", "recurrent layer (LSTM)", 1), ("GRU", "recurrent layer (GRU)", 1)),
                  "MatMul + Add on [N,T,F], LSTM, GRU, Gemm head on the last step"),
    "yolo_head": ("yolo_head.onnx", "torch legacy", pyramid, (),
                  "two inputs, per-scale heads, Reshape/Transpose, Concat, Split, three outputs"),
    "fp16_cnn": ("fp16_cnn.onnx", "torch legacy (.half())", image_fp16, (),
                 "float16 inputs, weights and outputs; grouped Conv; Gemm"),
}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(os.path.join(HERE, SPECS[name][0]))
