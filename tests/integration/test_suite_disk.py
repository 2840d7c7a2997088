"""The suite's disk footprint: each passing test's tmp_path is deleted at its teardown (pytest.ini's
tmp_path_retention_policy), so CI's two legs do not pile up the ~5.5 GB of runs and checkpoints one leg writes."""
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

PROBE = '''
import os

def _write(tmp_path, name):
    (tmp_path / "weights.bin").write_bytes(os.urandom(1 << 20))
    (tmp_path.parent / f"{name}.where").write_text(str(tmp_path))

def test_passes(tmp_path):
    _write(tmp_path, "passes")

def test_fails(tmp_path):
    _write(tmp_path, "fails")
    assert False, "kept for a post-mortem"
'''


def test_a_passing_tests_folder_is_deleted_and_a_failing_tests_is_kept(tmp_path):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "test_probe.py").write_text(PROBE)
    basetemp = tmp_path / "basetemp"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-c", os.path.join(ROOT, "pytest.ini"), "--rootdir", str(tmp_path / "probe"),
                           f"--basetemp={basetemp}", str(tmp_path / "probe")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "1 failed, 1 passed" in proc.stdout, proc.stdout[-2000:]
    passed = (basetemp / "passes.where").read_text()
    failed = (basetemp / "fails.where").read_text()
    assert not Path(passed).exists(), "a passing test's tmp_path was kept"
    assert (Path(failed) / "weights.bin").exists(), "a failing test's tmp_path was deleted"
