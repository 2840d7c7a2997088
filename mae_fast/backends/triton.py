"""The "triton" backends: the Triton kernels of `kernels/`, and the one way that folder is imported.

`kernels/` is installed as `mae_fast.kernels` (setup.py's package_dir; a different PyPI project owns the top-level
name `kernels`). In a source checkout that is not installed, or a worktree beside an editable install of another
checkout, `kernels_module()` maps the checkout's own `kernels/` folder onto that name, so tests and benchmarks run
the kernels of the tree they come from, never silently the references or another checkout's kernels. Importing
`mae_fast.kernels` never imports Triton; `register_all` imports the op modules (and Triton) only when Triton imports.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import mae_fast

KERNELS = "mae_fast.kernels"


def checkout_kernels_folder() -> str | None:
    """`kernels/` of the source checkout the imported `mae_fast` package lives in (None for a wheel install)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(mae_fast.__file__)))
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
    mae_fast.kernels = module
    return module


def register_all(register) -> None:
    """Register the "triton" backend of every op (nothing when Triton cannot be imported)."""
    kernels_module()
    try:
        from mae_fast.kernels import lion, mae_loss, masked_patchify, unshuffle
    except ImportError:  # no Triton (or a broken install): the ops stay on their C++ / reference backends
        return
    register("masked_patchify", "triton")(masked_patchify.masked_patchify_triton)
    register("unshuffle", "triton")(unshuffle.unshuffle_triton)
    register("mae_loss", "triton")(mae_loss.mae_loss_triton)
    register("masked_mae_loss", "triton")(mae_loss.masked_mae_loss_triton)
    register("lion_update", "triton")(lion.lion_update_triton)
