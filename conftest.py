"""Make a source checkout importable without installing it.

`kernels/` is installed as `mae_fast.kernels`; in a plain checkout (or a worktree beside an editable install)
map that name onto *this* tree's folder before anything imports it.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if sys.path[0] != ROOT:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; must be set before triton imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mae_fast  # noqa: E402

if os.path.dirname(os.path.abspath(mae_fast.__file__)) == os.path.join(ROOT, "mae_fast") and "mae_fast.kernels" not in sys.modules:
    init = os.path.join(ROOT, "kernels", "__init__.py")
    if os.path.exists(init):
        spec = importlib.util.spec_from_file_location(
            "mae_fast.kernels", init, submodule_search_locations=[os.path.join(ROOT, "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["mae_fast.kernels"] = module
        spec.loader.exec_module(module)
        mae_fast.kernels = module
