"""The Triton kernels of kernels/ (installed as `mae_fast.kernels`): the one place that imports that folder.

`load()` imports the kernel files, each of which registers its kernel as the "triton" kernel of the op it belongs
to (`mae_fast/ops/<op>.py`) for CUDA tensors; `mae_fast.ops` calls it when CUDA is available or Triton's CPU
interpreter is on (TRITON_INTERPRET=1, the tests), and when Triton imports. The import graph stays one-way: kernels/
imports the op modules it registers for, `mae_fast.ops` imports this module, and no op module imports either.

In a source checkout that is not installed, or a worktree beside an editable install of another checkout,
`kernels_module()` maps the checkout's own `kernels/` folder onto `mae_fast.kernels`, so tests and benchmarks run the
kernels of the tree they come from, never silently the references or another checkout's kernels.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch


KERNELS = "mae_fast.kernels"


def checkout_kernels_folder() -> str | None:
    """`kernels/` of the source checkout the imported `mae_fast` package lives in (None for a wheel install)."""
    # this file is mae_fast/ops/triton.py: the checkout is three folders up (no import of the mae_fast package here)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folder = os.path.join(root, "kernels")
    is_checkout = os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc"))
    return folder if is_checkout and os.path.exists(os.path.join(folder, "__init__.py")) else None


def kernels_module(folder: str | None = None) -> ModuleType:
    """The `mae_fast.kernels` package: the one imported already; else the checkout's `kernels/` beside the imported
    `mae_fast` (or `folder` when given, even over an import already made); else the installed one."""
    if folder is None and KERNELS in sys.modules:
        return sys.modules[KERNELS]
    folder = folder or checkout_kernels_folder()
    if folder is None:
        return importlib.import_module(KERNELS)
    spec = importlib.util.spec_from_file_location(KERNELS, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    for name in [m for m in sys.modules if m.startswith(KERNELS + ".")]:  # an earlier mapping's op modules
        del sys.modules[name]
    sys.modules[KERNELS] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[__name__.partition(".")[0]], "kernels", module)  # bound as importing the subpackage would
    return module


def wanted() -> bool:
    """Whether the Triton kernels can run here: CUDA, or the interpreter on CPU tensors; and Triton installed."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return (torch.cuda.is_available() or interpreting) and importlib.util.find_spec("triton") is not None


def load() -> bool:
    """Import the kernel files (each registers its op's "triton" kernel); False when Triton cannot be imported."""
    kernels_module()
    # kernels/<op>.py, one per op, named in full so that the import graph (tests/unit/test_architecture.py) sees them
    try:
        importlib.import_module("mae_fast.kernels.masked_patchify")
        importlib.import_module("mae_fast.kernels.unshuffle")
        importlib.import_module("mae_fast.kernels.mae_loss")
        importlib.import_module("mae_fast.kernels.lion")
    except ImportError:  # no Triton (or a broken install): the ops keep their C++ / reference kernels
        return False
    return True
