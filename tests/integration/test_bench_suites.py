"""Every pytest-benchmark suite (benchmarks/bench_*.py) runs once at toy sizes, untimed (`--benchmark-disable
--bench-toy`), so none rots between `make bench` runs: one pytest process for all suites (one interpreter start),
whose junit report is read per suite. No time is measured or asserted here.

Also the workflow's pieces: the suites read their options from pytest only (no environment variables), and the
machine info pytest-benchmark saves carries the device, torch, Triton and the commit."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET


from tests.helpers import ROOT

SUITES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))


def toy_run(tmp) -> dict:
    """{suite file: [(test name, outcome)]} of one `pytest benchmarks/ --benchmark-disable --bench-toy` run."""
    junit = tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks", "--benchmark-disable",
           "--bench-toy", "--bench-device", "cpu", f"--junitxml={junit}", f"--basetemp={tmp / 'basetemp'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    # exit code 5 (nothing collected) or any failure fails here, with pytest's own report
    assert proc.returncode == 0, f"{' '.join(cmd)} -> exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    results: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        suite = case.get("classname").split(".")[-1] + ".py"
        outcome = "skipped" if case.find("skipped") is not None else \
            "failed" if case.find("failure") is not None or case.find("error") is not None else "passed"
        results.setdefault(suite, []).append((case.get("name"), outcome))
    return results


def test_every_suite_runs_at_toy_size(tmp_path):
    """One test (not one per suite): under pytest-xdist a shared fixture would run the suites once per worker."""
    assert len(SUITES) >= 7 and "bench_ops.py" in SUITES and "bench_train_step.py" in SUITES
    results = toy_run(tmp_path)
    problems = {}
    for suite in SUITES:
        cases = results.get(suite, [])
        if not cases:
            problems[suite] = "no test ran"
        elif any(outcome == "failed" for _, outcome in cases):
            problems[suite] = f"failed: {[name for name, outcome in cases if outcome == 'failed']}"
        elif not any(outcome == "passed" for _, outcome in cases):
            problems[suite] = f"every test skipped: {cases}"
    assert not problems, problems


def test_suites_take_options_from_pytest_not_the_environment():
    for suite in SUITES + ["conftest.py"]:
        text = open(os.path.join(ROOT, "benchmarks", suite)).read()
        assert "os.environ" not in text and "getenv" not in text, f"benchmarks/{suite} reads the environment"


def test_saved_machine_info_names_device_torch_triton_and_commit(tmp_path):
    """What `make bench` saves: pytest-benchmark's JSON with our machine info (one toy case, timed once)."""
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "benchmarks/bench_ops.py::test_op[mae_loss-reference]", "--bench-toy", "--bench-device", "cpu",
           "--benchmark-only", f"--benchmark-json={out}", f"--basetemp={tmp_path / 'basetemp'}"]
    # run under `make test`'s xdist workers too: their variables would make pytest-benchmark disable itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    saved = json.loads(out.read_text())
    info = saved["machine_info"]["mae_fast"]
    assert info["device_type"] == "cpu" and info["device"] and info["torch"] and info["toy"] is True
    assert "triton" in info and "driver" in info and info["git"]["commit"]
    (bench,) = saved["benchmarks"]
    assert bench["group"] == "mae_loss" and bench["stats"]["rounds"] == 1 and bench["extra_info"]["median_ms"] > 0
