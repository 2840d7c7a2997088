"""The house rules of the package layout (README "Layout", docs/DESIGN.md):

- every module of `mae_fast` (and the Triton kernels, `mae_fast.kernels`) imports on its own in a fresh interpreter;
- the import graph of `mae_fast` and `kernels/` has no cycle, counting imports inside functions and modules named
  in strings (what importlib loads) too: none may hide a cycle;
- `kernels/` is loaded in one place only (`mae_fast.ops.triton`), each kernel file imports only the op module it
  registers for (and the kernels' shared helpers), and the CLI is imported by nothing but itself;
- a module over 400 lines says at its top why it is one file.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "mae_fast")
KERNELS = os.path.join(ROOT, "kernels")  # installed as mae_fast.kernels
MAX_LINES = 400
ONE_FILE_MARK = "One file on purpose:"


def module_files(with_kernels: bool = False) -> dict[str, str]:
    """{dotted module name: path} of every module of the package (the C++ extension aside), and of `kernels/` as
    `mae_fast.kernels` when asked."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    if with_kernels:
        for name in os.listdir(KERNELS):
            if name.endswith(".py"):
                module = "mae_fast.kernels" if name == "__init__.py" else f"mae_fast.kernels.{name[:-3]}"
                out[module] = os.path.join(KERNELS, name)
    return out


def imported_modules(path: str, module: str, known: set[str]) -> set[str]:
    """The package modules `path` imports, at any depth of its code (`from a import b` counts a.b when a.b is a
    module, else a), and those it loads by name (`importlib.import_module("...")`, `__import__("...")`); a module
    that loads a computed name imports, for this graph, every module its strings name (the names it computes from)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found, computed = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
            else:
                computed = True
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    if computed:
        found |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in known}
    return {m for m in found if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
    files = module_files(with_kernels=True)
    known = set(files)
    return {m: imported_modules(p, m, known) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path a -> ... -> a, or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "mae_fast.ops.implementation" in graph and len(graph) > 40
    assert graph["mae_fast.models.mae"] >= {"mae_fast.ops", "mae_fast.attention"}  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_string_imports_are_edges_of_the_graph():
    """importlib's imports count: the loader's named kernel files are edges (a cycle through them would be seen)."""
    graph = import_graph()
    assert {"mae_fast.kernels.mae_loss", "mae_fast.kernels.lion"} <= graph["mae_fast.ops.triton"]
    assert "mae_fast.ops.mae_loss" in graph["mae_fast.kernels.mae_loss"]
    assert "mae_fast.cli.train" in graph["mae_fast.cli"]  # COMMANDS' names, loaded by a computed import_module
    with_cycle = dict(graph, **{"mae_fast.ops.mae_loss": graph["mae_fast.ops.mae_loss"] | {"mae_fast.ops.triton"}})
    assert find_cycle(with_cycle) is not None


def test_kernels_and_cli_are_imported_from_one_place():
    graph = import_graph()
    library = {m: deps for m, deps in graph.items() if not m.startswith("mae_fast.kernels")}
    kernel_importers = sorted(m for m, deps in library.items() if any(d.startswith("mae_fast.kernels") for d in deps))
    assert kernel_importers == ["mae_fast.ops.triton"], kernel_importers
    text = open(os.path.join(PACKAGE, "ops", "triton.py")).read()
    assert "spec_from_file_location" in text and '"mae_fast.kernels"' in text
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != os.path.join(PACKAGE, "ops", "triton.py"):
                assert "spec_from_file_location" not in open(path).read(), f"{path} maps kernels/ itself"
    # a kernel file imports its op's module and the kernels' helpers, nothing else of the package
    for module, deps in graph.items():
        if module.startswith("mae_fast.kernels.") and module not in ("mae_fast.kernels._common",
                                                                     "mae_fast.kernels.compile_check"):
            op = "mae_fast.ops." + module.rpartition(".")[2]
            assert deps <= {op, "mae_fast.kernels._common"}, (module, deps)
    library = {m: deps for m, deps in graph.items() if not m.startswith("mae_fast.cli") and m != "mae_fast.__main__"}
    cli_users = sorted(m for m, deps in library.items() if any(d.startswith("mae_fast.cli") for d in deps))
    assert cli_users == [], f"library modules importing the command line: {cli_users}"


def test_long_modules_say_why_they_are_one_file():
    long = {}
    for module, path in module_files().items():
        lines = open(path).read().count("\n")
        if lines > MAX_LINES:
            long[module] = ONE_FILE_MARK in (ast.get_docstring(ast.parse(open(path).read())) or "")
    assert all(long.values()), f"modules over {MAX_LINES} lines without '{ONE_FILE_MARK} <why>' at the top: " \
        + ", ".join(m for m, ok in long.items() if not ok)


CHILD = r"""
import importlib, os, sys, traceback
import torch  # not ours: loaded once, before the forks
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if name.startswith("mae_fast.kernels"):  # kernels/ comes in through its one importer
                importlib.import_module("mae_fast.ops.triton").kernels_module()
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED:" + ",".join(failed))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (one fresh child per module)")
def test_every_module_imports_alone():
    """Each module in a child forked from an interpreter that has imported torch and nothing of ours."""
    modules = sorted(m for m in module_files() if m != "mae_fast.__main__" and m != "mae_fast.cli.__main__")
    kernels = os.path.join(ROOT, "kernels")
    modules += ["mae_fast.kernels"] + [f"mae_fast.kernels.{n[:-3]}" for n in sorted(os.listdir(kernels))
                                       if n.endswith(".py") and n != "__init__.py" and n != "compile_check.py"]
    if importlib.util.find_spec("triton") is None:
        modules = [m for m in modules if not m.startswith("mae_fast.kernels.")]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, *modules], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = proc.stdout.strip().rpartition("FAILED:")[2]
    assert failed == "", f"modules that do not import alone: {failed}\n{proc.stderr[-3000:]}"
