"""The dispatcher of the fused ops: a registry of backends per op, and the rule that picks one.

Each op exists in up to three forms under one name: the plain-PyTorch reference (in `mae_fast/ops/<op>.py`, the
oracle and the last fallback), a Triton kernel for CUDA tensors (`kernels/<op>.py`, installed as
`mae_fast.kernels`) and a C++ kernel for CPU tensors (`csrc/<op>.cpp`, wrapped by `mae_fast.backends.cpp`). The
dispatcher picks Triton for CUDA tensors, C++ for CPU tensors, the reference otherwise; `impl="reference"` (or the
environment variable MAE_FAST_IMPL=reference) forces the reference for debugging. A fused backend that cannot take
some input (say float64 for gradcheck, or a patch size it has no kernel for) raises `UnsupportedInput` before doing
any work; under `impl="auto"` the call then runs the reference, and `last_impl(op)` says so.

The fused backends are optional plugins (the C++ extension may be unbuilt, Triton absent, and importing Triton costs
seconds): they are imported by module name (`BACKEND_MODULES`) on the first dispatch, and each registers its
implementations through `register`. So this module imports none of them, and they import it: the import graph has
no cycle.

torch.compile: each fused backend is a torch op with a fake implementation (`mae_fast::<op>_<backend>`, made by the
`define_*_op` factories of the op modules), and ops with a backward carry an autograd formula, so a compiled train
step holds every fused op as one opaque node without graph breaks. The dispatch itself (environment variable,
fallbacks) is traced by Dynamo and guarded.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

IMPLS = ("auto", "reference", "triton", "cpp")
# the optional backends, imported on first use; each has `register_all(register)`
BACKEND_MODULES = ("mae_fast.backends.triton", "mae_fast.backends.cpp")

UNAVAILABLE_BACKENDS: dict[str, str] = {}  # backend module -> why it did not import (for reports)
# op name -> backend name -> callable with the reference's signature
_REGISTRY: dict[str, dict[str, Callable]] = {}
# op -> the backend its latest call used; every registered op has a key from the start (None until called), so the
# set of keys never changes after import: torch.compile guards on it, and a first call must not recompile the graph
_last_impl: dict[str, str | None] = {}
# "mae_fast::<op>_<backend>" -> what a define_*_op factory returned for it (torch ops are defined once)
TORCH_OPS: dict[str, Callable] = {}


class UnsupportedInput(Exception):
    """Raised by a fused backend, before it does any work, for inputs it has no kernel for."""


def register(op: str, backend: str):
    """Decorator: register `fn` as `backend` ("reference", "foreach", "triton" or "cpp") of `op`."""

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = fn
        _last_impl.setdefault(op, None)
        return fn

    return deco


@torch.compiler.assume_constant_result
def load_fast_backends() -> None:
    """Import the optional backend modules once; each registers what it can (nothing when its kernels are absent).
    torch.compile runs this eagerly when it meets the first call (registering torch ops cannot be traced)."""
    if getattr(load_fast_backends, "done", False):
        return
    load_fast_backends.done = True
    for name in BACKEND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as why:  # the C++ extension is not built, or the kernels are not installed
            UNAVAILABLE_BACKENDS[name] = str(why)
            continue
        module.register_all(register)


def available_impls(op: str) -> list[str]:
    load_fast_backends()
    return sorted(_REGISTRY.get(op, {}))


def resolve(op: str, device: torch.device, impl: str) -> tuple[str, bool]:
    """(backend name, whether the caller asked for it explicitly)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    load_fast_backends()
    backends = _REGISTRY[op]
    if impl == "auto":
        impl = os.environ.get("MAE_FAST_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"environment variable MAE_FAST_IMPL must be one of {IMPLS}, got {impl!r}")
    explicit = impl != "auto"
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "cpp"
        if impl not in backends:
            impl = "reference"
    if impl not in backends:
        raise RuntimeError(f"op {op!r} has no {impl!r} implementation here (available: {sorted(backends)})")
    return impl, explicit


def choose_impl(op: str, device: torch.device, impl: str = "auto") -> Callable:
    """The implementation of `op` for tensors on `device` (no fallback on unsupported inputs: see `dispatch`)."""
    name, _ = resolve(op, device, impl)
    _last_impl[op] = name
    return _REGISTRY[op][name]


def run_impl(op: str, name: str, *args):
    """Run backend `name` of `op` by name (no fallback) and record it as the last implementation."""
    out = _REGISTRY[op][name](*args)
    _last_impl[op] = name
    return out


def dispatch(op: str, device: torch.device, impl: str, *args):
    """Run `op` with the chosen backend; an `UnsupportedInput` falls back to the reference unless the backend was
    asked for by name."""
    name, explicit = resolve(op, device, impl)
    try:
        out = _REGISTRY[op][name](*args)
    except UnsupportedInput as why:
        if explicit and name != "reference":
            raise RuntimeError(f"{op}: the {name!r} implementation cannot take these inputs: {why}") from None
        name = "reference"
        out = _REGISTRY[op]["reference"](*args)
    _last_impl[op] = name
    return out


def last_impl(op: str) -> str | None:
    """Which implementation the last call of `op` used (for tests and benchmark reports)."""
    return _last_impl.get(op)


def set_last_impl(op: str, name: str) -> None:
    _last_impl[op] = name
