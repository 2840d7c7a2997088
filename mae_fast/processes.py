"""CPU-bound numpy work over many items in forked worker processes (the synthetic screen's rendering, the
CellProfiler-style baseline's per-site measurements).

Why processes, and why fork: both jobs are many numpy / scikit-image calls on 256^2 planes with Python between
them, so threads share one GIL and run about one core between them. Forked workers inherit the parent's modules
and data and import nothing; `spawn` or `forkserver` workers would re-import torch through mae_fast (seconds of
CPU each). The workers only run numpy, SciPy, scikit-image and cp-measure code, never torch. Where fork does not
exist (Windows, or `workers` <= 1) the same function runs in threads or in this process; results never depend on it.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Sequence

_WORKER_STATE: tuple = ()        # what `map_in_processes(..., state=...)` gave this worker (inherited by fork)


def default_workers(limit: int = 2) -> int:
    """Worker count: the cores this process may use, at most `limit`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(limit, cores))


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse: no mmap per large array and no trimming of the heap.
    A synthetic site makes ~17 MB of short-lived 256^2 temporaries; returned to the kernel each time, they come
    back as fresh zeroed pages (~4,400 page faults, about a third of the CPU time of a site). Called in worker
    processes only (they end with their job); a no-op where the C library has no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3           # glibc's malloc.h
    mallopt(m_mmap_threshold, 16 << 20)
    mallopt(m_trim_threshold, 256 << 20)


def worker_state() -> tuple:
    """The `state` tuple of the running `map_in_processes` call (in its workers, and in-process)."""
    return _WORKER_STATE


def _start_worker(state: tuple) -> None:
    global _WORKER_STATE
    _WORKER_STATE = state
    keep_freed_memory()


def map_in_processes(function: Callable, items: Sequence, workers: int, state: tuple = (),
                     chunks_per_worker: int = 8) -> list:
    """[function(item) for item in items], in order, over `workers` forked processes. `function` must be a
    module-level function; `state` (e.g. a config and a plan) reaches it through `worker_state()`, inherited by
    the fork instead of pickled with every item. A worker's exception is raised here."""
    global _WORKER_STATE
    items = list(items)
    if workers <= 1 or len(items) < 2:
        saved, _WORKER_STATE = _WORKER_STATE, state
        try:
            return [function(item) for item in items]
        finally:
            _WORKER_STATE = saved
    if "fork" not in multiprocessing.get_all_start_methods():
        saved, _WORKER_STATE = _WORKER_STATE, state
        try:
            with ThreadPoolExecutor(workers) as pool:
                return list(pool.map(function, items))
        finally:
            _WORKER_STATE = saved
    chunk = max(1, len(items) // (chunks_per_worker * workers))     # balanced, and little messaging
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
                             initargs=(state,)) as pool:
        return list(pool.map(function, items, chunksize=chunk))
