"""mae_fast as users install it (pyproject.toml + setup.py): the version has one source, the sdist holds what
building and testing need, and the wheel built from this tree installs into a fresh venv where `import mae_fast`,
`mae-fast --help` and one op on the C++ backend run; without torch at build time the build says in one line that the
C++ kernels were not built and what to run.

Offline and quick: the fresh venv sees this interpreter's packages (torch, numpy, ...) through a .pth file and gets
mae_fast from the wheel alone (`--no-deps --no-index`); the wheel build recompiles nothing the editable install of
`make install` compiled (setup.py keeps the objects under build/temp-mae_fast/, ninja compares them)."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import mae_fast
from tests.helpers import ROOT

VERSION = mae_fast.__version__
# what the sdist must carry besides the packages: every file under these folders, and these top-level files
SDIST_FOLDERS = ("csrc", "kernels", "tests", "benchmarks", "examples", "docs")
SDIST_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "DATA_LICENSES.md", "CHANGELOG.md",
               "conftest.py", "pytest.ini", "Makefile", "constraints.txt", "constraints-oldest.txt",
               "mae_fast/py.typed")
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "*.so",
                                 ".pytest_cache", ".benchmarks", "demo_out", "runs", ".commit")

CPP_OP_CHECK = """
import json, sys, torch, mae_fast
from mae_fast import ops
g = torch.Generator().manual_seed(0)
pred, target = torch.randn(2, 7, 3 * 16 * 16, generator=g), torch.randn(2, 7, 3 * 16 * 16, generator=g)
fused = ops.mae_loss(pred, target, patch_size=16, impl="cpp")
impl = ops.last_impl("mae_loss")
reference = ops.mae_loss(pred, target, patch_size=16, impl="reference")
print(json.dumps({"file": mae_fast.__file__, "version": mae_fast.__version__, "impl": impl,
                  "ext": sys.modules["mae_fast._C"].__file__, "fused": fused.item(), "reference": reference.item()}))
"""


def _tree_files(root: str, folder: str) -> set[str]:
    out = set()
    for base, dirs, files in os.walk(os.path.join(root, folder)):
        ignored = IGNORED(base, dirs + files)
        dirs[:] = [d for d in dirs if d not in ignored]
        out.update(os.path.relpath(os.path.join(base, f), root) for f in files if f not in ignored)
    return out


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_version_has_one_source():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["dynamic"] == ["version"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mae_fast.__version__"}
    assert "version=" not in open(os.path.join(ROOT, "setup.py")).read()
    assert project["project"]["scripts"] == {"mae-fast": "mae_fast.cli:main"}
    assert f"## {VERSION}" in open(os.path.join(ROOT, "CHANGELOG.md")).read()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> str:
    """The sdist, built by setuptools' PEP 517 hook in a copy of the tree (the build writes egg-info)."""
    tmp = tmp_path_factory.mktemp("sdist")
    tree = tmp / "tree"
    shutil.copytree(ROOT, tree, ignore=IGNORED)
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp / 'dist')!r}))"
    name = _run([sys.executable, "-c", code], cwd=tree).stdout.strip().splitlines()[-1]
    return str(tmp / "dist" / name)


def test_sdist_holds_what_building_and_tests_need(sdist):
    prefix = f"mae_fast-{VERSION}/"
    assert os.path.basename(sdist) == f"mae_fast-{VERSION}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {m.name[len(prefix):] for m in tar.getmembers() if m.isfile()}
        pkg_info = tar.extractfile(prefix + "PKG-INFO").read().decode()
    expected = set(SDIST_FILES) | _tree_files(ROOT, "mae_fast")
    for folder in SDIST_FOLDERS:
        expected |= _tree_files(ROOT, folder)
    assert _tree_files(ROOT, "csrc") and _tree_files(ROOT, "examples")
    assert not sorted(expected - names), f"missing from the sdist: {sorted(expected - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyc")) or n == "benchmarks/.commit"]
    assert f"Version: {VERSION}" in pkg_info and "License-Expression: BSD-3-Clause" in pkg_info


def test_build_without_torch_says_so_in_one_line(tmp_path):
    """pip's isolated build has no torch: the build goes on without the extension and says once what to run."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch in this build environment')\n")
    env = {k: v for k, v in os.environ.items() if k != "MAE_FAST_NO_EXT"}
    env["PYTHONPATH"] = str(tmp_path)
    proc = _run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env)
    lines = [line for line in proc.stderr.splitlines() if "not built" in line]
    assert proc.stdout.strip().splitlines()[-1] == "mae_fast"
    assert len(lines) == 1 and lines[0].startswith("mae_fast: C++ CPU kernels not built (torch is not importable")
    assert lines[0].endswith("pip install --no-build-isolation .")


def test_version_line_says_whether_the_cpp_kernels_are_built(monkeypatch, capsys):
    from mae_fast import cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mae_fast._C" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == (f"mae-fast {VERSION} (C++ CPU kernels: not built; to build them: "
                                               "pip install --no-build-isolation .)")


def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    pytest.importorskip("mae_fast._C", reason="C++ extension not built (python setup.py build_ext --inplace)")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index",
          "-w", str(wheels), ROOT], cwd=ROOT)
    (wheel,) = glob.glob(str(wheels / f"mae_fast-{VERSION}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(f"mae_fast-{VERSION}.dist-info/entry_points.txt").decode()
    assert {"mae_fast/py.typed", "mae_fast/kernels/__init__.py", f"mae_fast-{VERSION}.dist-info/licenses/LICENSE"} <= names
    assert [n for n in names if n.startswith("mae_fast/_C") and n.endswith(".so")]
    assert not [n for n in names if n.startswith(("kernels/", "tests/", "benchmarks/"))]
    assert "mae-fast = mae_fast.cli:main" in entry_points

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    (purelib,) = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
    with open(os.path.join(purelib, "host_packages.pth"), "w") as f:  # torch & co. from this interpreter
        f.write("\n".join(site.getsitepackages()) + "\n")
    python = str(venv / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAE_FAST_IMPL")}
    help_text = _run([str(venv / "bin" / "mae-fast"), "--help"], cwd=tmp_path, env=env).stdout
    assert help_text.startswith("usage: mae-fast") and "embed" in help_text
    version = _run([str(venv / "bin" / "mae-fast"), "--version"], cwd=tmp_path, env=env).stdout.strip()
    assert version == f"mae-fast {VERSION} (C++ CPU kernels: built)"
    result = json.loads(_run([python, "-c", CPP_OP_CHECK], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    assert result["file"].startswith(purelib) and result["ext"].startswith(purelib)
    assert result["version"] == VERSION and result["impl"] == "cpp"
    assert result["fused"] == pytest.approx(result["reference"], rel=1e-5)
