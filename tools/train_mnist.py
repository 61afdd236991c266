#!/usr/bin/env python3
"""Train the two MNIST reference networks and write the bundled models and data.

Produces, in --out (default ``models``):

* ``lenet300.onnx`` - LeNet-300-100 (784-300-100-10 MLP with ReLU)
* ``lenet5.onnx``   - Caffe's LeNet-5 (conv20-pool-conv50-pool-fc500-relu-fc10)
* ``mnist_calib.npz`` - 10,000 normalised training images (key ``input``)
* ``mnist_test.npz``  - the normalised test set (keys ``input``, ``labels``)

The ONNX files take ``input`` float32 [batch,1,28,28] (already normalised, see
NORM_MEAN/NORM_STD) and return raw ``logits`` [batch,10]. They are verified
against torch with onnxruntime before the script exits.

Needs torch, numpy, onnx and onnxruntime (only numpy with --no-train). Everything runs on the CPU and is
seeded, so two runs with the same seed and thread count give the same result.
"""
import argparse
import gzip
import os
import sys
import time
import warnings
import zlib

import numpy as np

# Pixel normalisation used for training, calibration and test data alike:
#   x = (pixel / 255 - NORM_MEAN) / NORM_STD
# These are the mean and standard deviation of the MNIST training pixels
# (scaled to [0, 1]), the values used by the usual PyTorch MNIST examples.
# Anyone feeding the ONNX models must apply the same transform.
NORM_MEAN = 0.1307
NORM_STD = 0.3081

IDX_FILES = {
    "train_x": ("train-images-idx3-ubyte.gz", 2051),
    "train_y": ("train-labels-idx1-ubyte.gz", 2049),
    "test_x": ("t10k-images-idx3-ubyte.gz", 2051),
    "test_y": ("t10k-labels-idx1-ubyte.gz", 2049),
}

# Per-model training recipe: SGD + Nesterov momentum, cosine decay per step.
# LeNet-5 (two linear convs in a row) diverges at lr 0.05, hence 0.02.
RECIPES = {
    "lenet300": dict(epochs=20, batch=128, lr=0.05, momentum=0.9,
                     weight_decay=5e-4),
    "lenet5": dict(epochs=12, batch=128, lr=0.02, momentum=0.9,
                   weight_decay=5e-4),
}
CALIB_SIZE = 10000


class DataError(Exception):
    """A missing or malformed MNIST file; reported as one line."""


def read_idx(path, magic):
    """Read one gzipped IDX file of unsigned bytes and check its header.

    The magic is 0x0000080N: type code 0x08 (uint8) and N dimensions, each a
    big-endian uint32 that must agree with the payload length.
    """
    if not os.path.isfile(path):
        raise DataError(f"missing MNIST file: {path}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot decompress {path}: {exc}") from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"bad IDX magic in {path} (expected {magic:#010x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"truncated IDX header in {path}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big")
                  for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"IDX size mismatch in {path}: header says {shape}, "
                        f"payload has {len(raw) - header} bytes")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def normalise(images):
    """uint8 [N,28,28] -> float32 [N,1,28,28] with the module's constants."""
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(NORM_MEAN)) / np.float32(NORM_STD)
    return x[:, None, :, :].astype(np.float32)


def load_mnist(directory):
    """Return normalised train/test images and int64 labels from DIR."""
    arr = {k: read_idx(os.path.join(directory, name), magic)
           for k, (name, magic) in IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arr[f"{split}_x"], arr[f"{split}_y"]
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise DataError(f"{split} set: images {x.shape} do not match "
                            f"labels {y.shape}")
        if y.max() > 9:
            raise DataError(f"{split} set: label out of range 0..9")
    return {"train_x": normalise(arr["train_x"]),
            "train_y": arr["train_y"].astype(np.int64),
            "test_x": normalise(arr["test_x"]),
            "test_y": arr["test_y"].astype(np.int64)}


def build_model(name):
    """Build a network; module names become the ONNX node names (/fc1/Gemm)."""
    from torch import nn
    from collections import OrderedDict
    if name == "lenet300":
        layers = [("flatten", nn.Flatten()),
                  ("fc1", nn.Linear(784, 300)), ("relu1", nn.ReLU()),
                  ("fc2", nn.Linear(300, 100)), ("relu2", nn.ReLU()),
                  ("fc3", nn.Linear(100, 10))]
    elif name == "lenet5":
        # Caffe's LeNet: no nonlinearity after the convolutions.
        layers = [("conv1", nn.Conv2d(1, 20, 5)), ("pool1", nn.MaxPool2d(2)),
                  ("conv2", nn.Conv2d(20, 50, 5)), ("pool2", nn.MaxPool2d(2)),
                  ("flatten", nn.Flatten()),
                  ("fc1", nn.Linear(800, 500)), ("relu1", nn.ReLU()),
                  ("fc2", nn.Linear(500, 10))]
    else:
        raise ValueError(name)
    return nn.Sequential(OrderedDict(layers))


def predict(model, x, batch=1000):
    """Logits for a float32 numpy array, in eval mode, as numpy."""
    import torch
    model.eval()
    with torch.no_grad():
        out = [model(torch.from_numpy(x[i:i + batch])).numpy()
               for i in range(0, len(x), batch)]
    return np.concatenate(out)


def error_rate(logits, labels):
    """Top-1 error in percent."""
    return 100.0 * float(np.mean(logits.argmax(1) != labels))


def train(name, data, seed):
    """Train one model with its recipe; return (model, seconds)."""
    import torch
    torch.manual_seed(seed)
    r = RECIPES[name]
    model = build_model(name)
    x = torch.from_numpy(data["train_x"])
    y = torch.from_numpy(data["train_y"])
    steps = r["epochs"] * ((len(x) + r["batch"] - 1) // r["batch"])
    opt = torch.optim.SGD(model.parameters(), lr=r["lr"],
                          momentum=r["momentum"], nesterov=True,
                          weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(1, r["epochs"] + 1):
        model.train()
        total, wrong = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(r["batch"]):
            out = model(x[idx])
            loss = loss_fn(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            wrong += int((out.argmax(1) != y[idx]).sum())
        if not np.isfinite(total):
            raise RuntimeError(f"{name} diverged in epoch {epoch}")
        test_err = error_rate(predict(model, data["test_x"]), data["test_y"])
        print(f"[{name}] epoch {epoch:2d}/{r['epochs']}  "
              f"loss {total / len(x):.4f}  train err {100 * wrong / len(x):.2f}%"
              f"  test err {test_err:.2f}%  "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    return model, time.perf_counter() - start


def export_onnx(model, path):
    """Export with the TorchScript exporter: Gemm(transB=1) + initializers.

    The legacy exporter is chosen on purpose, so silence its deprecation note.
    """
    import torch
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.zeros(1, 1, 28, 28), path,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"},
                                        "logits": {0: "batch"}},
                          opset_version=13, do_constant_folding=True,
                          dynamo=False)


def stamp_calibration(path, calib_name="mnist_calib.npz"):
    """Name the bundled calibration file in the model's metadata, so `onnx-lobs prune` finds it."""
    import onnx
    model = onnx.load(path)
    del model.metadata_props[:]
    model.metadata_props.add(key="onnx_lobs.calibration", value=calib_name)
    onnx.save(model, path)


def verify_onnx(path, data, torch_logits):
    """Check the file, run it in onnxruntime and compare with torch."""
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(onnx.load(path), full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": data["test_x"]})[0]
    diff = float(np.abs(logits - torch_logits).max())
    if not diff < 1e-4:  # also catches NaN
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {diff}")
    return error_rate(logits, data["test_y"]), diff


def write_data(data, out, seed, export_train):
    """Write calibration/test npz files (and the full train set if asked)."""
    perm = np.random.default_rng(seed).permutation(len(data["train_x"]))
    np.savez_compressed(os.path.join(out, "mnist_calib.npz"),
                        input=data["train_x"][perm[:CALIB_SIZE]])
    np.savez_compressed(os.path.join(out, "mnist_test.npz"),
                        input=data["test_x"], labels=data["test_y"])
    if export_train:
        np.savez_compressed(export_train, input=data["train_x"],
                            labels=data["train_y"])
    for path in (os.path.join(out, "mnist_calib.npz"),
                 os.path.join(out, "mnist_test.npz"), export_train):
        if path:
            print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


def train_and_export(data, out, seed, threads):
    """Train both models, export them to ONNX and verify them."""
    import torch
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, {threads} threads, seed {seed}")
    for name in RECIPES:
        model, secs = train(name, data, seed)
        logits = predict(model, data["test_x"])
        path = os.path.join(out, f"{name}.onnx")
        export_onnx(model, path)
        stamp_calibration(path)
        ort_err, diff = verify_onnx(path, data, logits)
        print(f"[{name}] trained in {secs:.0f}s  torch test err "
              f"{error_rate(logits, data['test_y']):.2f}%  onnxruntime test "
              f"err {ort_err:.2f}%  max|diff| {diff:.1e}  -> {path}")


def parse_args(argv):
    """Command line; see --help."""
    p = argparse.ArgumentParser(
        description="Train LeNet-300-100 and LeNet-5 on MNIST, export them to "
                    "ONNX and write the calibration/test data files.")
    p.add_argument("--mnist", required=True, metavar="DIR",
                   help="directory with the four raw gzipped IDX files "
                        "(train-images-idx3-ubyte.gz, ...)")
    p.add_argument("--out", default="models", metavar="DIR",
                   help="output directory for the .onnx and .npz files "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for weights, batch order and the calibration "
                        "subset (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads; keep it fixed for reproducible "
                        "weights (default: %(default)s)")
    p.add_argument("--export-train", metavar="OUT.npz",
                   help="also write the full normalised 60,000-image training "
                        "set (keys input, labels) to OUT.npz")
    p.add_argument("--no-train", action="store_true",
                   help="only write the data files (mnist_calib.npz, "
                        "mnist_test.npz and --export-train); skip training "
                        "and ONNX export")
    return p.parse_args(argv)


def main(argv=None):
    """Entry point; torch is imported only when training is asked for."""
    args = parse_args(argv)
    try:
        data = load_mnist(args.mnist)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    if not args.no_train:
        train_and_export(data, args.out, args.seed, args.threads)
    write_data(data, args.out, args.seed, args.export_train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
