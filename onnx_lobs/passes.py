"""How the calibration passes and the solves are scheduled: one whole pass, a pass per block or
stage by graph segments (segments.py) or whole passes, the solves in this process, a pool
(workers.py) or on Ray (distributed.py). The same work, the same results, whichever runs it."""

from __future__ import annotations

import time

from .activations import PassResult, Reading, Session, collect
from .errors import LobsError
from .runtime import make_session, output_names, run
from .segments import SegmentedPass
from .solve import settle, solve_layer, task


def by_passes(loaded, dense, work, stages, by_layer, source, config, timings, masks, held, pool) -> PassResult:
    """One whole pass, or one per stage or block (a layer input inside a subgraph)."""
    for k, stage in enumerate(stages):
        todo = work if stage is None else [by_layer[id(layer)] for layer in stage]
        if stage is not None or held is None:
            pruned = None
            if config.sequential:
                t = time.perf_counter()
                pruned = Session(loaded.model, [w.collector for w in todo], loaded.path)  # has earlier stages' weights
                timings["prepare"] += time.perf_counter() - t
            label = "calibrating" if stage is None else f"{unit(config)} {k + 1}/{len(stages)}"
            result = checked(collect(dense, pruned, [w.collector for w in todo], source, reading(config), timings,
                                      keep_held=held is None, label=label), source)
            held = held or result
        t = time.perf_counter()
        solve_all(todo, config, masks, pool)
        timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    return held


def unit(config) -> str:
    return "stage" if config.sequential else "block"


def by_segments(loaded, dense_model, work, stages, segments, by_layer, source, config, timings,
                 masks, held, pool) -> PassResult:
    """Sequential mode's stages, or independent mode's blocks (the dense side alone), with every
    node run once per model (segments.py); same results as a whole pass per stage."""
    t = time.perf_counter()
    runner = SegmentedPass(segments, source, reading(config), timings, loaded.path)
    timings["forward"] = timings.get("forward", 0.0) + time.perf_counter() - t
    try:
        samples = runner.samples()
        if samples["calibration"] == 0:
            raise LobsError(f"{source.origin}: no calibration samples")
        for k, stage in enumerate(stages):
            todo = [by_layer[id(layer)] for layer in stage]
            runner.stage(k, dense_model, loaded.model if config.sequential else None,
                         [w.collector for w in todo], f"{unit(config)} {k + 1}/{len(stages)}")
            t = time.perf_counter()
            solve_all(todo, config, masks, pool)
            timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    finally:
        runner.close()
    return held if held is not None else held_pass(dense_model, loaded, samples, runner.feeds.held_feeds,
                                                    source, timings)


def held_pass(dense_model, loaded, samples, held_feeds, source, timings) -> PassResult:
    """The dense model's outputs on the held-out feeds, for the verification."""
    t = time.perf_counter()
    sess = make_session(dense_model, loaded.path)
    names = output_names(dense_model)
    held_dense = [run(sess, names, feed, source.origin) for feed in held_feeds]
    timings["verify"] = timings.get("verify", 0.0) + time.perf_counter() - t
    return PassResult(samples, held_feeds, held_dense)


def by_ray(loaded, dense_model, work, stages, segments, by_layer, source, config, timings, masks) -> PassResult:
    """Blocks or stages with their calibration shards and solves on Ray (distributed.py)."""
    from .distributed import RayExecutor
    t = time.perf_counter()
    executor = RayExecutor(dense_model, loaded.path, segments, source, config)
    timings["prepare"] = time.perf_counter() - t
    try:
        for k, stage in enumerate(stages):
            todo = [by_layer[id(layer)] for layer in stage]
            executor.stage(k, todo, timings)
            t = time.perf_counter()
            jobs = []
            for w in todo:
                reason = left(w, config)
                if reason is None:
                    jobs.append(w)
                else:
                    solve_one(w, config, masks, reason)
            executor.solve(jobs, config, masks)
            timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    finally:
        executor.close()
    return held_pass(dense_model, loaded, executor.samples, executor.held_feeds, source, timings)


def solve_all(todo, config, masks, pool) -> None:
    """The block's layers, in order: in this process, or the solves in the pool (workers.py)."""
    jobs = []
    for w in todo:
        reason = left(w, config)
        if reason is not None or pool is None or w.solved is not None or not pool.takes(w.layer):
            if jobs:  # results are written back in the layers' order
                finish_all(pool.solve(jobs, config), masks)
                jobs = []
            solve_one(w, config, masks, reason)
        else:
            jobs.append((w, lambda w=w: task(w.collector, w.target, w.nm, w.problem)))
    if jobs:
        finish_all(pool.solve(jobs, config), masks)


def finish_all(results, masks) -> None:
    for w, t, (solved, seconds) in results:
        settle(w, t.problem, solved, seconds, masks)


def left(w, config) -> str | None:
    if w.collector.calib.n == 0:
        w.record.skipped = "no calibration sample reached this layer (a branch never taken?)"
        return w.record.skipped
    if w.target == 0 and config.global_sparsity is not None:
        w.record.notes.append("left dense by the allocation")
        return "left dense"
    return None


def solve_one(w, config, masks, reason) -> None:
    try:
        if reason is None:
            masks[w.layer.weight_name] = solve_layer(w.collector, w.target, w.record, config, w.nm, w.solved,
                                                     w.problem)
    finally:
        w.solved = w.problem = None
        w.collector.release()  # a layer sharing the sums keeps them until it is solved too


def reading(config) -> Reading:
    return Reading(config.batch_size, config.samples, config.progress)


def checked(result: PassResult, source) -> PassResult:
    if result.samples["calibration"] == 0:
        raise LobsError(f"{source.origin}: no calibration samples")
    return result
