"""Make a source checkout importable without installing it.

`kernels/` is installed as `mae_fast.kernels`; in a plain checkout (or a worktree beside an editable install)
map that name onto *this* tree's folder before anything imports it.
"""
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if sys.path[0] != ROOT:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; must be set before triton imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mae_fast.ops.triton import kernels_module  # noqa: E402

kernels_module()  # this checkout's kernels/ as mae_fast.kernels (an editable install of another checkout must not win)
