"""Export the torch half of the model corpus into tests/corpus/models/ (seeded, deterministic).

Run with a torch environment (torch 2.13 CPU, onnx, onnxscript for the dynamo exporter):

    python tools/build_corpus.py            # writes every model
    python tools/build_corpus.py yolo_head  # only the named ones

The weights are random but not arbitrary: batch-norm statistics are randomised before export so
folded convolutions carry realistic scales. Shapes, vocabulary sizes and input generators come
from tests/corpus/exported.py, which the tests read without torch. The nets are kept narrow:
the whole corpus stays small enough to commit.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
import onnx
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.corpus import exported as spec  # noqa: E402


def conv_bn(cin, cout, k, stride=1, groups=1, act=nn.ReLU, dims=2):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    return nn.Sequential(conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout), act())


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride)
        self.b = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, image):
        return self.fc(self.blocks(self.stem(image)).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.down, self.up = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.up(torch.relu(self.down(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expand, stride, se, act):
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn(cin, mid, 1, act=act)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid, act=act)
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=nn.Hardswish)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 3, 1, True, nn.Hardswish),
                                    InvertedResidual(16, 24, 4, 2, False, nn.ReLU6),
                                    InvertedResidual(24, 24, 3, 1, True, nn.Hardswish))
        self.head = conv_bn(24, 64, 1, act=nn.Hardswish)
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.Hardswish(), nn.Linear(32, 10))

    def forward(self, image):
        return self.classifier(self.head(self.blocks(self.stem(image))).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, bias):
        n, t, d = x.shape
        split = lambda y: y.reshape(n, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.h) + bias, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.att, self.ln1, self.ln2 = Attention(d, heads), nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x, bias):
        x = self.ln1(x + self.att(x, bias))
        return self.ln2(x + self.ff(x))


class Encoder(nn.Module):
    """Token ids and a padding mask in; per-token features and pooled class scores out."""

    def __init__(self, d=32, heads=2, ff=64, classes=5):
        super().__init__()
        self.tok = nn.Embedding(spec.VOCAB, d)
        self.pos = nn.Parameter(torch.randn(spec.SEQ, d) * 0.1)
        self.blocks = nn.ModuleList(EncoderBlock(d, heads, ff) for _ in range(2))
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        x = self.tok(input_ids) + self.pos
        m = attention_mask.to(torch.float32)
        bias = (1.0 - m[:, None, None, :]) * -1e4
        for b in self.blocks:
            x = b(x, bias)
        pooled = (x * m[:, :, None]).sum(1) / m.sum(1, keepdim=True)
        return x, self.head(pooled)


class AudioNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 16, 9, 2, 4), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 32, 5, 1, 4, dilation=2, groups=4), nn.ReLU(),
            nn.Conv1d(32, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv1d(32, 32, 3, 1, 1, groups=32), nn.ReLU(),
            nn.Conv1d(32, 32, 1))
        self.fc = nn.Linear(32, 8)

    def forward(self, waveform):
        return self.fc(self.net(waveform).amax(2))


class StftNet(nn.Module):
    """A fixed windowed-DFT basis as a strided Conv1d (a buffer, never trained), then a small CNN."""

    def __init__(self, n_fft=64, hop=16):
        super().__init__()
        bins = n_fft // 2 + 1
        n, f = torch.arange(n_fft, dtype=torch.float64), torch.arange(bins, dtype=torch.float64)[:, None]
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)
        basis = torch.cat([torch.cos(2 * math.pi * f * n / n_fft), -torch.sin(2 * math.pi * f * n / n_fft)]) * window
        self.register_buffer("stft_basis", basis[:, None, :].float())
        self.hop, self.bins = hop, bins
        self.conv = nn.Sequential(nn.Conv1d(bins, 32, 3, padding=1), nn.ReLU(), nn.Conv1d(32, 32, 3, padding=1))
        self.fc = nn.Linear(32, 6)

    def forward(self, samples):
        spec_ = nn.functional.conv1d(samples[:, None, :], self.stft_basis, stride=self.hop)
        re, im = spec_[:, :self.bins], spec_[:, self.bins:]
        logpow = torch.log(re * re + im * im + 1e-6)
        return self.fc(torch.relu(self.conv(logpow)).mean(2))


class VideoNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(3, 16, 3, 1, 1), nn.ReLU(),
            nn.Conv3d(16, 16, (1, 3, 3), (1, 2, 2), (0, 1, 1), groups=4), nn.ReLU(),
            nn.Conv3d(16, 32, (3, 1, 1), (2, 1, 1), (1, 0, 0)), nn.ReLU())
        self.fc = nn.Linear(32, 5)

    def forward(self, clip):
        return self.fc(self.net(clip).mean((2, 3, 4)))


class UNetDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = conv_bn(3, 16, 3), conv_bn(16, 32, 3, 2)
        self.bottom = conv_bn(32, 32, 3, 2)
        self.up1 = nn.ConvTranspose2d(32, 32, 2, 2)
        self.dec1 = conv_bn(64, 32, 3)
        self.refine = nn.ConvTranspose2d(32, 32, 3, 1, 1, groups=2)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = conv_bn(48, 16, 3)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, image):
        e1 = self.enc1(image)
        e2 = self.enc2(e1)
        d = self.dec1(torch.cat([self.up1(self.bottom(e2)), e2], 1))
        d = torch.relu(self.refine(d))
        return self.out(self.dec2(torch.cat([self.up2(d), e1], 1)))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(spec.FEATURES, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.gru = nn.GRU(24, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, sequence):
        h, _ = self.lstm(torch.tanh(self.proj(sequence)))
        h, _ = self.gru(h)
        return self.head(h[:, -1])


class YoloHead(nn.Module):
    """Two pyramid levels in; boxes, objectness and class scores out, anchors concatenated."""

    def __init__(self, anchors=2, classes=3):
        super().__init__()
        self.a, self.c = anchors, classes
        self.stems = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 32, 3, 1, 1), nn.SiLU()) for c in (16, 32))
        self.preds = nn.ModuleList(nn.Conv2d(32, anchors * (5 + classes), 1) for _ in range(2))

    def forward(self, p3, p4):
        outs = []
        for x, stem, pred in zip((p3, p4), self.stems, self.preds):
            y = pred(stem(x))
            n, _, h, w = y.shape
            outs.append(y.reshape(n, self.a, 5 + self.c, h * w).permute(0, 1, 3, 2).reshape(n, -1, 5 + self.c))
        boxes, obj, cls = torch.split(torch.cat(outs, 1), [4, 1, self.c], dim=2)
        return boxes, torch.sigmoid(obj), torch.softmax(cls, -1)


class SmallCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16, 3), conv_bn(16, 32, 3, 2), conv_bn(32, 32, 3, groups=2))
        self.fc = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, image):
        return self.fc(self.features(image).mean((2, 3)))


def randomise_batchnorm(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


# name -> (module factory, input names, output names, opset, exporter)
BUILDS = {
    "resnet_blocks": (ResNet, ["image"], ["logits"], 13, "legacy"),
    "mobilenet_v3": (MobileNetV3, ["image"], ["logits"], 14, "legacy"),
    "transformer_legacy": (Encoder, ["input_ids", "attention_mask"], ["hidden", "logits"], 17, "legacy"),
    "transformer_dynamo": (Encoder, ["input_ids", "attention_mask"], ["hidden", "logits"], 18, "dynamo"),
    "audio_conv1d": (AudioNet, ["waveform"], ["scores"], 11, "legacy"),
    "stft_frontend": (StftNet, ["samples"], ["scores"], 12, "legacy"),
    "video_conv3d": (VideoNet, ["clip"], ["scores"], 10, "legacy"),
    "unet_decoder": (UNetDecoder, ["image"], ["mask"], 16, "legacy"),
    "lstm_gemm": (Recurrent, ["sequence"], ["scores"], 9, "legacy"),
    "yolo_head": (YoloHead, ["p3", "p4"], ["boxes", "objectness", "classes"], 15, "legacy"),
    "fp16_cnn": (SmallCnn, ["image"], ["scores"], 13, "legacy"),
}


def export(name: str) -> str:
    factory, inputs, outputs, opset, exporter = BUILDS[name]
    file, source, generate = spec.SPECS[name][:3]
    torch.manual_seed(0)  # the same seed for both transformer exports: the same weights
    module = factory()
    randomise_batchnorm(module, torch.Generator().manual_seed(1))
    module.eval()
    if name == "fp16_cnn":
        module = module.half()
    example = generate(np.random.default_rng(0), 3)
    args = tuple(torch.from_numpy(example[k]) for k in inputs)
    path = os.path.join(spec.HERE, file)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(module, args, path, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes={k: {0: "batch"} for k in inputs + outputs})
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=inputs,
                                        output_names=outputs, dynamic_shapes={k: {0: batch} for k in inputs},
                                        verbose=False)
            program.save(path)
    model = onnx.load(path)
    # Producer metadata the way converters leave it: the tests check it survives pruning.
    model.metadata_props.add(key="corpus.source", value=f"{source} exporter, torch {torch.__version__.split('+')[0]}")
    model.doc_string = f"onnx-lobs corpus model '{name}' (random weights, tools/build_corpus.py)"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def main(argv: list[str]) -> None:
    os.makedirs(spec.HERE, exist_ok=True)
    for name in argv or list(BUILDS):
        path = export(name)
        print(f"{name:<20} {os.path.getsize(path) / 1024:8.1f} kB  {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
