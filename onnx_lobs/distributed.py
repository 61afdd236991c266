"""--executor ray: the block-by-block work spread over a Ray cluster, not a cluster of our own.

The calibration batches are dealt round-robin to shards, one Ray actor each. For every block (or
stage) each actor runs the block's graph segment on its shard (segments.py, as locally) and
returns its partial Hessian sums, which are additive: the driver merges them in shard order.
The layers' solves run as Ray tasks, each asking for the BLAS threads it takes in-process
(workers.threads_of), so Ray's scheduler never oversubscribes a node. The driver writes the
results back and, in sequential mode, sends the block's pruned weights to the actors before the
next block. What crosses the network per block: the pruned weights of the block (sequential mode
only), each shard's sums for the block's layers, and each solve's problem and result.

Ray is imported only here, only when asked for: it is the optional `distributed` extra.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx

from .activations import Collector, Reading, add_time, share
from .errors import LobsError
from .graph import find_layers, write_tensor
from .modelio import LoadedModel, over_limit
from .segments import Segment, SegmentedPass
from .solve import Task, settle, task
from .workers import run_task, threads_of


def require_ray():
    try:
        import ray
    except ImportError:
        raise LobsError("--executor ray needs Ray: pip install 'onnx-lobs[distributed]'") from None
    return ray


@dataclass
class ShardSource:
    """A shard of the calibration batches, as read by the driver (the held-out flags kept)."""

    feeds: list[tuple[dict, bool]]
    origin: str
    sizes: list[int]

    def batches(self, batch_size, samples):
        yield from self.feeds

    def count(self, feed) -> int:
        return next(n for (f, _), n in zip(self.feeds, self.sizes) if f is feed)


class Shard:
    """One actor: its shard's batches, the block segments' sessions, the model as pruned so far."""

    def __init__(self, model: bytes, path: str | None, segments: list[Segment], shard: ShardSource,
                 batch_size: int, joint: bool):
        self.dense = onnx.load_from_string(model)
        self.pruned = onnx.load_from_string(model) if joint else None
        self.joint = joint
        layers, _ = find_layers(LoadedModel(self.pruned or self.dense, path or ""))
        self.layers = {layer.name: layer for layer in layers}
        self.runner = SegmentedPass(segments, shard, Reading(batch_size, None, False), {}, path)

    def stage(self, k: int, names: list[str], updates: dict) -> dict:
        """Block k's partial sums, per folding layer: {name: (calib, hold)}."""
        for name, (weight, bias) in updates.items():
            layer = self.layers[name]
            write_tensor(layer.weight, weight)
            if bias is not None:
                write_tensor(layer.bias, bias)
        collectors = [Collector(self.layers[n], self.joint) for n in names]
        folding = share(collectors)
        self.runner.stage(k, self.dense, self.pruned, collectors, "")
        return {c.layer.name: (c.calib, c.hold) for c in folding}

    def close(self) -> None:
        self.runner.close()


def _shards(source, config, count: int) -> tuple[list[ShardSource], list[dict], dict]:
    feeds, sizes, held = [], [], []
    for feed, is_held in source.batches(config.batch_size, config.samples):
        feeds.append((feed, is_held))
        sizes.append(source.count(feed))
        if is_held:
            held.append(feed)
    if not any(not h for _, h in feeds):
        raise LobsError(f"{source.origin}: no calibration samples")
    count = max(1, min(count, len(feeds)))
    shards = [ShardSource(feeds[i::count], source.origin, sizes[i::count]) for i in range(count)]
    samples = {"calibration": sum(n for (_, h), n in zip(feeds, sizes) if not h),
               "held_out": sum(n for (_, h), n in zip(feeds, sizes) if h)}
    return shards, held, samples


class RayExecutor:
    """The driver's side: actors per shard, a block's sums merged, its solves as tasks."""

    def __init__(self, dense_model, path, segments, source, config):
        self.ray = ray = require_ray()
        if over_limit(dense_model):
            raise LobsError(f"{path or 'model'}: --executor ray ships the model through Ray's object store "
                            f"as one protobuf, which cannot hold a model over 2 GB yet: use the local executor")
        if not ray.is_initialized():
            ray.init(address=config.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        total = int(ray.cluster_resources().get("CPU", 1))
        shards, self.held_feeds, self.samples = _shards(source, config, config.shards or total)
        model = ray.put(dense_model.SerializeToString())
        actor = ray.remote(num_cpus=0)(Shard)  # their segments' onnxruntime runs are short and in turn
        self.actors = [actor.remote(model, path, segments, s, config.batch_size, bool(config.sequential))
                       for s in shards]
        self.solver = ray.remote(run_task)
        self.total = total
        self.cores = max(1, int(total / max(1, len(ray.nodes()))))
        self.updates: dict = {}

    def stage(self, k: int, todo, timings: dict) -> None:
        """Block k's sums, from every shard, merged into the driver's collectors."""
        t = time.perf_counter()
        collectors = [w.collector for w in todo]
        folding = share(collectors)
        refs = [a.stage.remote(k, [c.layer.name for c in collectors], self.updates) for a in self.actors]
        for ref in refs:  # one shard's sums at a time, in shard order
            part = self.ray.get(ref)
            for c in folding:
                calib, hold = part[c.layer.name]
                c.calib.merge(calib)
                c.hold.merge(hold)
            del part
        self.updates = {}
        add_time(timings, "hessian", t)

    def solve(self, jobs, config, masks) -> None:
        """The block's solves as Ray tasks, written back in order; their weights kept for the actors."""
        pending = []
        for w in jobs:
            t: Task = task(w.collector, w.target, w.nm, w.problem)
            threads = threads_of(t, self.cores)
            pending.append((w, t, self.solver.options(num_cpus=threads).remote(t, config, threads)))
            while len(pending) > self.total:  # only as many problems in flight as the cluster has CPUs
                self._finish(pending.pop(0), config, masks)
        for item in pending:
            self._finish(item, config, masks)

    def _finish(self, item, config, masks) -> None:
        w, t, ref = item
        solved, seconds = self.ray.get(ref)
        settle(w, t.problem, solved, seconds, masks)
        if config.sequential:
            self.updates[w.layer.name] = (w.layer.read(), w.layer.read_bias())

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.get(a.close.remote())
            finally:
                self.ray.kill(a)
        self.actors = []

