"""Which implementation of a fused op runs: the kernel tables, the one override, the fallback counter.

Each fused op is one torch op `mae_fast::<op>` (defined in `mae_fast/ops/<op>.py`) whose last argument names the
kernel that computes it: "reference" (the plain-PyTorch body, always there), "cpp" (csrc/, registered by
`mae_fast.ops.cpp` when the extension is built) or "triton" (kernels/, registered by the kernel files when Triton
imports). The kernel is an argument of the op, not only its tensors' device, so that one override also reaches
the backward op and can run the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (the tests do).

The choice: `impl=` of the public function, else the environment variable MAE_FAST_IMPL (reference|triton|cpp),
else by device: Triton for CUDA tensors, C++ for CPU tensors, the reference where neither is registered. A kernel
that cannot take an input (float64 for gradcheck, a patch size it has no instance for) says so before any work
(`Unsupported`); the public function then runs the reference itself, counts it in `fallbacks` and logs it once,
or raises when the kernel was asked for by name. `last_impl(op)` tells which one ran (tests, benchmark reports).
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Callable

import torch

IMPLS = ("auto", "reference", "triton", "cpp")
DEVICE_KERNEL = {"cuda": "triton", "cpu": "cpp"}  # the kernel a device's tensors get by default
OPS = ("masked_patchify", "unshuffle", "mae_loss", "masked_mae_loss", "lion_update")

# op -> kernel name -> the kernel's input check (raises UnsupportedInput), "reference" takes everything
_CHECKS: dict[str, dict[str, Callable]] = {op: {"reference": lambda *args: None} for op in OPS}
# op -> the implementation its latest call used; the key set is fixed at import (torch.compile guards on it)
_last_impl: dict[str, str | None] = dict.fromkeys(OPS)
fallbacks: collections.Counter = collections.Counter()  # op -> calls that fell back to the reference
_log = logging.getLogger(__name__)


class UnsupportedInput(Exception):
    """Raised by a kernel's input check, before any work, for inputs it has no kernel for."""


def register(op: str, kernel: str, check: Callable) -> None:
    """Declare that `kernel` of `op` exists and takes the inputs `check(*public_args)` does not reject; the kernel
    itself goes into the op module's table (`KERNELS`)."""
    _CHECKS[op][kernel] = check


def available_impls(op: str) -> list[str]:
    return sorted(_CHECKS[op])


def override() -> str:
    impl = os.environ.get("MAE_FAST_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"environment variable MAE_FAST_IMPL must be one of {IMPLS}, got {impl!r}")
    return impl


def choose(op: str, device: torch.device, impl: str, *args) -> str:
    """The kernel that runs `op` on these inputs (`args`: what the kernel's check reads)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = override()
    explicit = impl != "auto"
    kernels = _CHECKS[op]
    if not explicit:
        impl = DEVICE_KERNEL.get(device.type, "reference")
        if impl not in kernels:
            impl = "reference"
    if impl not in kernels:
        raise RuntimeError(f"op {op!r} has no {impl!r} implementation here (available: {sorted(kernels)})")
    try:
        kernels[impl](*args)
    except UnsupportedInput as why:
        if explicit:
            raise RuntimeError(f"{op}: the {impl!r} implementation cannot take these inputs: {why}") from None
        if not torch.compiler.is_compiling():
            if fallbacks[op] == 0:
                _log.info("%s: the %s kernel cannot take these inputs (%s): the reference runs", op, impl, why)
            fallbacks[op] += 1
        impl = "reference"
    _last_impl[op] = impl
    return impl


def record(op: str, impl: str) -> None:
    _last_impl[op] = impl


def last_impl(op: str) -> str | None:
    """Which implementation the last call of `op` used (for tests and benchmark reports)."""
    return _last_impl.get(op)
