"""Parallel solves on one machine (--workers N): the layers of a block (or of the one pass),
whose sums are ready, are solved in a pool of processes.

Each solve runs with the BLAS threads it takes in-process (solve.blas_threads: one for a small
matrix, all the cores for a large one), because BLAS sums in another order on another thread
count and the output must be identical to --workers 1's. A solve starts only when its threads
are free, so the cores are never oversubscribed: small layers run side by side in the pool; a
large one, which takes every core anyway, is solved in this process. The results are written
back in the layers' order, in this process.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from .solve import SINGLE_THREAD_COLS, SINGLE_THREAD_WORK, Task, blas_controller, compute


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_for(rows: int, width: int, available: int) -> int:
    """The BLAS threads a solve of rows x width takes in-process (solve.blas_threads)."""
    big = width > SINGLE_THREAD_COLS or rows * width * width > SINGLE_THREAD_WORK
    return available if big else 1


def threads_of(t: Task, available: int) -> int:
    _, rows, cols = t.problem.old.shape
    return threads_for(rows, cols + (t.problem.old_b is not None), available)


def run_task(t: Task, config, threads: int):
    """A solve on this many BLAS threads (in a worker process or a Ray task)."""
    with blas_controller().limit(limits=threads, user_api="blas"):
        return compute(t, config)


@dataclass
class _Pending:
    key: object
    task: Task
    future: object
    threads: int


class Pool:
    """A process pool made on first use; solve() yields results in the order of its jobs."""

    def __init__(self, workers: int):
        self.workers, self.cores = workers, cores()
        self._executor = None

    def takes(self, layer) -> bool:
        """Whether the layer's solve goes to the pool: not one that takes every core anyway, which
        runs the same in this process without carrying its Hessian to a worker and back (the
        138M Llama's layers: 69 s of solves through the pool against 44 s here)."""
        g = layer.geometry
        return threads_for(g.rows, g.cols + (layer.bias is not None), self.cores) < self.cores

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method))
        return self._executor

    def solve(self, jobs, config):
        """jobs: (key, make) pairs, make() giving the layer's Task (called as its turn nears, so
        only the solves in flight hold their problems). Yields (key, task, (solved, seconds))."""
        pending: deque[_Pending] = deque()
        busy = 0
        for key, make in jobs:
            t = make()
            need = threads_of(t, self.cores)
            while pending and (busy + need > self.cores or len(pending) >= self.workers):
                done = pending.popleft()
                busy -= done.threads
                yield done.key, done.task, done.future.result()
            pending.append(_Pending(key, t, self._pool().submit(run_task, t, config, need), need))
            busy += need
        while pending:
            done = pending.popleft()
            yield done.key, done.task, done.future.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
