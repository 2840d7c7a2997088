"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1): then CPU tensors are accepted."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_problem(*tensors: torch.Tensor | None) -> str | None:
    """Why the Triton kernels cannot take these tensors (None when they can): they take CUDA tensors, or CPU tensors
    under the interpreter. The caller raises its op's UnsupportedInput with it."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
            continue
        return f"a {t.device.type} tensor (the Triton kernels need CUDA, or TRITON_INTERPRET=1)"
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def persistent_programs(device: torch.device, n_tiles: int, per_multiprocessor: int) -> int:
    """Programs of a persistent grid (each walks tiles pid, pid + programs, ...): `per_multiprocessor` resident
    programs on every multiprocessor of a GPU; under the interpreter 2, so that programs take several tiles there
    too (the loop the GPU runs is the loop the tests check)."""
    if device.type == "cuda":
        return max(1, min(n_tiles, per_multiprocessor * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_tiles, 2))
