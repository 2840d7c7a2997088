"""A pytest plugin for the GPU script's tests stage (benchmarks/headline.py tests): runs first the tests whose node id
names one of MAE_FAST_TEST_FIRST (comma-separated words: the kernels the headline used), in that order, then the
rest; and appends one JSON line per finished test to MAE_FAST_TEST_PROGRESS, flushed at once, so a pytest killed at
its time limit leaves every result it had (its JUnit XML is only written at the end).

    MAE_FAST_TEST_PROGRESS=p.jsonl MAE_FAST_TEST_FIRST=patchify,unshuffle python -m pytest -p pytest_progress ...

Lines: {"collected": [node ids, in run order]} once, then {"nodeid", "outcome", "duration_s"} per test.
"""
from __future__ import annotations

import json
import os

import pytest

PROGRESS_ENV = "MAE_FAST_TEST_PROGRESS"
FIRST_ENV = "MAE_FAST_TEST_FIRST"


def _write(line: dict) -> None:
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def priority(nodeid: str, first: list[str]) -> int:
    """The index of the first word of `first` in the node id; tests naming none come after all of them."""
    for i, word in enumerate(first):
        if word in nodeid:
            return i
    return len(first)


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: the order and count of what runs
def pytest_collection_modifyitems(session, config, items):
    first = [w for w in os.environ.get(FIRST_ENV, "").split(",") if w]
    items.sort(key=lambda item: priority(item.nodeid, first))  # stable: file order kept within a rank
    _write({"collected": [item.nodeid for item in items]})


def pytest_runtest_logreport(report):
    # one line per test: its call's outcome, or the setup's when setup failed or skipped it
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _write({"nodeid": report.nodeid, "outcome": report.outcome, "duration_s": round(report.duration, 3)})
