"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import os

import torch

from mae_fast import ops


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1): then CPU tensors are accepted."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor | None) -> None:
    """The Triton kernels take CUDA tensors (or CPU tensors under the interpreter)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
            continue
        raise ops.UnsupportedInput(f"a {t.device.type} tensor (the Triton kernels need CUDA, or TRITON_INTERPRET=1)")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
