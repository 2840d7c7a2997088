"""Every test module collects on a machine without the optional packages (the GPU machine's image has no
hypothesis, tifffile, imagecodecs, blosc2 or DALI): the suite is collected in a fresh interpreter in which importing
any of them fails, and must report no collection error. The tests that need one skip with the reason."""
from __future__ import annotations
from tests.helpers import ROOT

import os
import subprocess
import sys

OPTIONAL = ("hypothesis", "tifffile", "imagecodecs", "blosc2", "nvidia.dali", "timm", "copairs", "cp_measure",
            "skimage", "flash_attn", "efaar_benchmarking")


def hide_packages(folder, names) -> None:
    """Shadow each package with one whose import fails, in a folder put first on PYTHONPATH. (A meta-path finder
    would not do: pytest's assertion-rewriting hook sits before it and finds its plugins' packages itself.)"""
    for name in names:
        package = folder.joinpath(*name.split("."))
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            f"raise ModuleNotFoundError({'No module named ' + repr(name) + ' (hidden by the test)'!r}, name={name!r})\n")


def test_suite_collects_without_optional_packages(tmp_path):
    hide_packages(tmp_path, OPTIONAL)
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:hypothesispytest", "-p", "no:cacheprovider",
         "-rs", os.path.join(ROOT, "tests")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ERROR" not in out, out[-4000:]
    # the modules that need one of them said so instead of failing (module-level skips are listed with -rs)
    assert "hypothesis is a test extra" in out, out[-4000:]
