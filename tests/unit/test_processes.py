"""mae_fast.processes: forked workers give the in-process results, in order, with the state; errors reach the caller."""
import os

import pytest

from mae_fast import processes


def _scaled_and_pid(item):
    factor, offset = processes.worker_state()
    if item == 13:
        raise ValueError(f"item {item} is unlucky")
    return item * factor + offset, os.getpid()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_in_order_with_the_state(workers):
    items = [x for x in range(40) if x != 13]
    got = processes.map_in_processes(_scaled_and_pid, items, workers, state=(3, 7))
    assert [value for value, _ in got] == [x * 3 + 7 for x in items]
    pids = {pid for _, pid in got}
    if workers == 1:
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids and 1 <= len(pids) <= workers     # really other processes
    assert processes.worker_state() == ()                               # nothing left behind in this process


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_error_is_raised_here(workers):
    with pytest.raises(ValueError, match="item 13 is unlucky"):
        processes.map_in_processes(_scaled_and_pid, range(20), workers, state=(1, 0))


def test_threads_where_fork_does_not_exist(monkeypatch):
    monkeypatch.setattr(processes.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    got = processes.map_in_processes(_scaled_and_pid, [1, 2, 3, 4], 2, state=(2, 1))
    assert got == [(3, os.getpid()), (5, os.getpid()), (7, os.getpid()), (9, os.getpid())]


def test_default_workers_and_freed_memory_kept():
    assert 1 <= processes.default_workers(2) <= 2 and processes.default_workers(1) == 1
    processes.keep_freed_memory()          # a no-op where there is no glibc; must never raise
