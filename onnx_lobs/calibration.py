"""Calibration data in, checked feed dicts out: the DataSource protocol and its three sources.

Data can be an .npz file (keys = model input names; an array of the input's rank has the
samples on axis 0, one of a rank more holds one feed per sample), a folder of them,
`module:callable` returning an object with onnxruntime's CalibrationDataReader protocol
(get_next() -> feed dict or None), or the explicit word `random`. Everything is checked against
the model's inputs before any work starts, so mistakes fail fast with the tensor's name.

A slice of the data is held out (never used for Hessians) to measure the pruned model's
fidelity on samples it was not fitted to.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import onnx

from .errors import LobsError
from .modelio import model_inputs

HOLDOUT_FRACTION = 10  # one sample in ten is held out ...
HOLDOUT_MAX = 1000  # ... up to this many


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, None for dynamic ones


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    specs = []
    for vi in model_inputs(model):
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        # dim_value <= 0 (paddle2onnx writes -1) is as dynamic as a dim_param
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim) \
            if tt.HasField("shape") else None
        specs.append(InputSpec(vi.name, np.dtype(dtype), shape))
    return specs


def check_feed(feed: dict, specs: list[InputSpec], origin: str, extra_ok=()) -> None:
    """One-line errors for a feed that must fit the model exactly (a reader's feed dict)."""
    _check_names(feed, specs, origin, extra_ok)
    for s in specs:
        a = _check_values(feed[s.name], s, origin)
        if s.shape is not None:
            if a.ndim != len(s.shape):
                raise LobsError(f"{origin}: tensor '{s.name}' has shape {list(a.shape)}, "
                                f"the model expects rank {len(s.shape)} {_fmt_shape(s.shape)}")
            _check_dims(a.shape, s, 0, origin, f"tensor '{s.name}' has shape {list(a.shape)}")


def _check_names(feed: dict, specs, origin: str, extra_ok) -> None:
    names = {s.name for s in specs}
    for s in specs:
        if s.name not in feed:
            raise LobsError(f"{origin}: model input '{s.name}' is missing (has: {', '.join(sorted(feed)) or 'nothing'})")
    for k in feed:
        if k not in names and k not in extra_ok:
            raise LobsError(f"{origin}: '{k}' is not an input of the model (inputs: {', '.join(sorted(names))})")


def _check_values(a, s: InputSpec, origin: str) -> np.ndarray:
    """Type, dtype, emptiness and finiteness: what every layout must satisfy."""
    if not isinstance(a, np.ndarray):
        raise LobsError(f"{origin}: tensor '{s.name}' is a {type(a).__name__}, not a numpy array")
    if a.dtype != s.dtype:
        raise LobsError(f"{origin}: tensor '{s.name}' has dtype {a.dtype}, the model expects {s.dtype}")
    if a.ndim and a.shape[0] == 0:
        raise LobsError(f"{origin}: tensor '{s.name}' has no samples")
    if a.size == 0:
        raise LobsError(f"{origin}: tensor '{s.name}' is empty (shape {list(a.shape)})")
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        raise LobsError(f"{origin}: tensor '{s.name}' contains NaN or Inf")
    return a


def _check_dims(shape, s: InputSpec, first: int, origin: str, what: str) -> None:
    """Every fixed dimension of the model input from axis `first` on must match shape."""
    for axis, (have, want) in enumerate(zip(shape, s.shape)):
        if axis >= first and want is not None and have != want:
            raise LobsError(f"{origin}: {what}, the model expects {_fmt_shape(s.shape)}")


BATCHED, PER_SAMPLE = "batched", "per sample"


def array_layout(a: np.ndarray, s: InputSpec, origin: str) -> str:
    """How an array holds an input's samples, decided by its rank against the model input's.

    The model input's rank: the batch is axis 0, and the data may be fed in chunks along it.
    One axis more: a[i] is exactly one sample's feed (for inputs whose leading axes are not a
    batch, such as a recurrent state [2, 1, 128] or a scalar sample rate given as [n]).
    """
    if s.shape is None:  # rank unknown: axis 0 is taken for the batch
        if a.ndim == 0:
            raise LobsError(f"{origin}: tensor '{s.name}' is a scalar; give one value per sample, shape [n]")
        return BATCHED
    r = len(s.shape)
    if a.ndim == r + 1:
        _check_dims(a.shape[1:], s, 0, origin,
                    f"tensor '{s.name}' has shape {list(a.shape)}: one sample's feed is {list(a.shape[1:])}")
        return PER_SAMPLE
    if a.ndim == r and r > 0:
        _check_dims(a.shape, s, 1, origin, f"tensor '{s.name}' has shape {list(a.shape)}")
        return BATCHED
    if a.ndim == r == 0:
        raise LobsError(f"{origin}: tensor '{s.name}' is a single scalar; give one value per sample, shape [n]")
    raise LobsError(f"{origin}: tensor '{s.name}' has shape {list(a.shape)}, the model expects rank {r} "
                    f"{_fmt_shape(s.shape)} (batch on axis 0) or rank {r + 1} (one feed per sample)")


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# ----------------------------------------------------------------------------- sources

@runtime_checkable
class DataSource(Protocol):
    """Where feeds come from. Every feed it yields fits the model's inputs (checked)."""

    origin: str  # what to name in an error: the file, folder, reader or "calibration arrays"
    extra: dict  # arrays beside the inputs that the caller allowed (labels), by key

    def count(self, feed: dict) -> int:
        """Samples in one of this source's feeds."""

    def batches(self, batch_size: int, samples: int | None = None) -> Iterator[tuple[dict, bool]]:
        """(feed, held_out) pairs: calibration feeds, with some held out for measuring fidelity."""

    def feeds(self, batch_size: int) -> Iterator[dict]:
        """Every feed, none held out (for evaluation)."""


class ArraySource:
    """Samples held as arrays (one .npz, or arrays given in code); batches are slices.

    Each input's layout is decided by its rank (array_layout). When every input has its batch
    on axis 0, feeds are batches of up to batch_size samples (exactly the fixed batch when the
    model fixes one); when any input is given per sample, every feed is one sample, and the
    batched inputs contribute a[i:i+1].
    """

    def __init__(self, arrays: dict, origin: str, specs: list[InputSpec], extra_ok=()):
        _check_names(arrays, specs, origin, extra_ok)
        self.origin = origin
        self.arrays = {s.name: _check_values(arrays[s.name], s, origin) for s in specs}
        self.extra = {k: v for k, v in arrays.items() if k in extra_ok}
        self.layout = {s.name: array_layout(self.arrays[s.name], s, origin) for s in specs}
        counts = {k: v.shape[0] for k, v in self.arrays.items()}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"'{k}': {n} ({self.layout[k]})" for k, n in counts.items())
            raise LobsError(f"{origin}: inputs have different numbers of samples ({shown})")
        self.n = next(iter(counts.values()), 0)
        self.batched = [s.name for s in specs if self.layout[s.name] == BATCHED]
        self.per_sample = len(self.batched) < len(specs)
        fixed = {s.name: s.shape[0] for s in specs
                 if s.name in self.batched and s.shape and s.shape[0] is not None}
        if self.per_sample and any(b != 1 for b in fixed.values()):
            name, b = next((k, b) for k, b in fixed.items() if b != 1)
            other = next(k for k, v in self.layout.items() if v == PER_SAMPLE)
            raise LobsError(f"{origin}: tensor '{name}' has its batch on axis 0 with a fixed batch of {b}, but "
                            f"'{other}' gives one feed per sample: give '{name}' one feed per sample too "
                            f"(shape [n, {b}, ...])")
        if len(set(fixed.values())) > 1:
            raise LobsError(f"{origin}: inputs have different fixed batch sizes ({fixed})")
        self.fixed_batch = next(iter(fixed.values()), None)
        if self.fixed_batch is not None and self.n < self.fixed_batch:
            raise LobsError(f"{origin}: {self.n} samples, fewer than the model's fixed batch of {self.fixed_batch}")

    def count(self, feed: dict) -> int:
        """Samples in one of this source's feeds."""
        return 1 if self.per_sample else int(feed[self.batched[0]].shape[0])

    def split(self, samples: int | None) -> tuple[range, range]:
        """Calibration and held-out sample ranges."""
        n = self.n if samples is None else min(samples, self.n)
        h = min(max(n // HOLDOUT_FRACTION, 1), HOLDOUT_MAX) if n >= 2 else 0
        if self.n - n >= h:
            return range(0, n), range(n, n + h)
        return range(0, n - h), range(n - h, n)

    def batches(self, batch_size: int, samples: int | None = None) -> Iterator[tuple[dict, bool]]:
        calib, hold = self.split(samples)
        for part, held in ((calib, False), (hold, True)):
            yield from ((f, held) for f in self._slices(part, batch_size))

    def _slices(self, r: range, batch_size: int):
        if self.per_sample:
            for i in r:
                yield {k: v[i, ...] if self.layout[k] == PER_SAMPLE else v[i:i + 1] for k, v in self.arrays.items()}
            return
        if self.fixed_batch:
            batch_size = self.fixed_batch
        for i in range(r.start, r.stop, batch_size):
            j = min(i + batch_size, r.stop)
            if self.fixed_batch and j - i != batch_size:
                break
            yield {k: v[i:j] for k, v in self.arrays.items()}

    def feeds(self, batch_size: int):
        yield from self._slices(range(0, self.n), batch_size)


class FolderSource:
    """A folder of .npz files, read one file at a time; every file must lay out its inputs alike."""

    def __init__(self, folder: str, specs, extra_ok=()):
        self.files = sorted(glob.glob(os.path.join(folder, "*.npz")))
        if not self.files:
            raise LobsError(f"{folder}: folder has no .npz files")
        self.specs, self.extra_ok = specs, extra_ok
        self.first = _npz_source(self.files[0], specs, extra_ok)  # fail fast on a bad first file
        self.n = None
        self.origin = folder
        self.extra: dict = {}

    def count(self, feed: dict) -> int:
        return self.first.count(feed)

    def _sources(self):
        for f in self.files:
            src = _npz_source(f, self.specs, self.extra_ok)
            if src.layout != self.first.layout:
                name = next(k for k in src.layout if src.layout[k] != self.first.layout[k])
                raise LobsError(f"{f}: tensor '{name}' is given {src.layout[name]}, but "
                                f"{os.path.basename(self.files[0])} gives it {self.first.layout[name]}")
            yield src

    def batches(self, batch_size: int, samples: int | None = None):
        yield from _every_tenth(
            self.feeds(batch_size), samples, self.count)

    def feeds(self, batch_size: int):
        return (f for s in self._sources() for f in s.feeds(batch_size))


class ReaderSource:
    """An onnxruntime CalibrationDataReader: feeds are used as they come, and kept, so that later
    passes (sequential mode's stages, an allocation's dense pass) see them again: a reader can be
    read only once."""

    def __init__(self, reader, origin: str, specs):
        if not callable(getattr(reader, "get_next", None)):
            raise LobsError(f"{origin}: returned {type(reader).__name__}, which has no get_next()")
        self.reader, self.origin, self.specs = reader, origin, specs
        self.n = None
        self.extra: dict = {}
        self._read: list[dict] = []  # the feeds read so far, checked
        self._done = False

    def count(self, feed: dict) -> int:
        """A feed's samples: axis 0 of its first input that has axes, else 1."""
        a = next((v for v in feed.values() if v.ndim), None)
        return int(a.shape[0]) if a is not None else 1

    def batches(self, batch_size: int, samples: int | None = None):
        yield from _every_tenth(self.feeds(batch_size), samples, self.count)

    def feeds(self, batch_size: int):
        """The reader's feeds as they came (batch_size does not apply), each checked once."""
        k = 0
        while True:
            if k == len(self._read):
                feed = None if self._done else self.reader.get_next()
                if feed is None:
                    self._done = True
                    return
                try:
                    feed = {name: np.asarray(v) for name, v in feed.items()}
                except (AttributeError, TypeError, ValueError) as e:
                    raise LobsError(f"{self.origin} (feed {k}): not a dict of arrays ({e})") from None
                check_feed(feed, self.specs, f"{self.origin} (feed {k})")
                self._read.append(feed)
            yield self._read[k]
            k += 1


def _every_tenth(feeds, samples, count):
    """Hold out every tenth feed (up to HOLDOUT_MAX samples) when the total is not known ahead."""
    used = held = 0
    for k, feed in enumerate(feeds):
        n = count(feed)
        if samples is not None and used >= samples:
            return
        if k % HOLDOUT_FRACTION == HOLDOUT_FRACTION - 1 and held < HOLDOUT_MAX:
            held += n
            yield feed, True
        else:
            used += n
            yield feed, False


def _npz_source(path: str, specs, extra_ok=()) -> ArraySource:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise LobsError(f"{path}: cannot read as .npz ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return ArraySource(arrays, path, specs, extra_ok)


def _random_source(specs, samples: int | None, seed: int) -> ArraySource:
    warnings.warn("calibrating on random data: the result will not reflect real inputs", stacklevel=3)
    n = samples or 256
    rng = np.random.default_rng(seed)
    arrays = {}
    for s in specs:
        if s.shape is None or any(d is None for d in s.shape[1:]):  # (unknown rank, too)
            raise LobsError(f"random calibration: input '{s.name}' has dynamic dimensions "
                            f"{_fmt_shape(s.shape or ())}; give real data with --calib")
        # A dynamic axis 0 is the batch; an input fixed throughout gets one feed per sample.
        shape = (n,) + tuple(s.shape[1:] if s.shape and s.shape[0] is None else s.shape)
        if s.dtype.kind == "f":
            arrays[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind in "iu":
            arrays[s.name] = rng.integers(0, 2, shape).astype(s.dtype)
        else:
            arrays[s.name] = np.zeros(shape, s.dtype)
    return ArraySource(arrays, "random", specs)


def open_source(data, model: onnx.ModelProto, *, seed: int = 0, samples: int | None = None,
                extra_ok=()):
    """Any accepted form of data -> a source whose batches are checked feed dicts."""
    specs = input_specs(model)
    if data is None:
        raise LobsError("no calibration data: give --calib DATA (or --calib random to accept random data)")
    if isinstance(data, DataSource):
        return data
    if isinstance(data, dict):
        return ArraySource({k: np.asarray(v) for k, v in data.items()}, "calibration arrays", specs, extra_ok)
    if callable(getattr(data, "get_next", None)):
        return ReaderSource(data, type(data).__name__, specs)
    if not isinstance(data, (str, os.PathLike)):
        raise LobsError(f"calibration data of type {type(data).__name__} is not understood")
    spec = os.fspath(data)
    if spec == "random":
        return _random_source(specs, samples, seed)
    if os.path.isdir(spec):
        return FolderSource(spec, specs, extra_ok)
    if os.path.isfile(spec):
        return _npz_source(spec, specs, extra_ok)
    if ":" in spec and not spec.endswith(".npz"):
        return ReaderSource(_call_factory(spec), spec, specs)
    raise LobsError(f"{spec}: no such file or folder")


def _call_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise LobsError(f"{spec}: cannot import ({e})") from None
    return factory()
