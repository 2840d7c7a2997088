"""Which implementation of a fused op runs: PyTorch's dispatch by device, one override, the fallback counter.

Each fused op is one torch op `mae_fast::<op>` (defined in `mae_fast/ops/<op>.py`, with its backward ops) whose
default body is its plain-PyTorch reference in kernel form. The fast kernels are registered for a device with
`CustomOpDef.register_kernel` (`register_device_kernel` below), so PyTorch's dispatcher picks one by the tensors'
device, and a device without one runs the default body:
    cpu   "cpp"     csrc/ (registered by `mae_fast.ops.cpp` when the extension is built)
    cuda  "triton"  kernels/ (registered by the kernel files when Triton imports)
Each op module lists what is registered for it: `REGISTERED` ({op: {device: kernel name}}).

The override, for tests and benchmarks: `use_impl(name)` (a context manager), else the environment variable
MAE_FAST_IMPL (read by every eager call of a public function, and when a call is traced by torch.compile), with
    auto       the registration by device above (the default)
    reference  the public functions run the plain-PyTorch reference (autograd through it, twice differentiable);
               a torch op called directly runs its default body (`set_kernel_enabled(device, False)`)
    cpp|triton that kernel for every device (re-registered with `register_kernel` while the override holds, and
               the previous registration restored after): "triton" runs the Triton kernels on CPU tensors under
               TRITON_INTERPRET=1 (the tests do), "cpp" refuses CUDA tensors.
`impl=` of a public function is the same override for that call; impl="reference" runs the plain-PyTorch
reference. A backward op runs when autograd calls it, under the override of that moment: choose it with
`use_impl` around forward and backward. Under torch.compile the override is read when the call is traced; a
traced `impl=` naming a kernel other than the one the dispatcher runs anyway breaks the graph (eager fallback):
wrap the compiled call in `use_impl` instead.

A kernel that cannot take an input (float64 for gradcheck, a patch size it has no instance for) says so before any
work (its check raises `UnsupportedInput`); the registered function then runs the op's default body itself,
counts it in `fallbacks[op]` and logs it once, or raises when the kernel was asked for by name (override or
`impl=`). `last_impl(op)` tells which one ran last (tests, benchmark reports).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
from typing import Callable, Iterator

import torch

IMPLS = ("auto", "reference", "triton", "cpp")
DEVICES = ("cpu", "cuda")  # the device types kernels are registered for
OPS = ("masked_patchify", "unshuffle", "unshuffle_backward", "mae_loss", "masked_mae_loss",
       "masked_mae_loss_backward", "lion_update")

# op -> the implementation its latest call used (recorded by the registered kernels, the default bodies and the
# public functions' reference path)
_last_impl: dict[str, str | None] = dict.fromkeys(OPS)
fallbacks: collections.Counter = collections.Counter()  # op -> calls that fell back to the reference
_log = logging.getLogger(__name__)

_op_defs: dict[str, torch.library.CustomOpDef] = {}
_references: dict[str, Callable] = {}                           # op -> its default body
_kernels: dict[str, dict[str, Callable]] = {}                   # op -> kernel name -> the function registered
_registered: dict[str, dict[str, str]] = {}                     # op -> device -> kernel name (the default)
_active = "auto"      # the override in force (the registrations follow it)
_env = "auto"         # MAE_FAST_IMPL as last read
_scoped: list[str] = []                                         # the use_impl blocks entered, innermost last
_asked: str | None = None                                       # a kernel named by impl= for one call
_undo = contextlib.ExitStack()                                  # restores the registrations of "auto"


class UnsupportedInput(Exception):
    """Raised by a kernel's input check, before any work, for inputs it has no kernel for."""


def define(op: str, op_def: torch.library.CustomOpDef, reference: Callable) -> dict[str, str]:
    """Declare the torch op of `op` and its default body (`reference`, what `op_def` runs where no kernel is
    registered); returns the op's {device: kernel name} table, filled by `register_device_kernel`."""
    _op_defs[op], _references[op] = op_def, reference
    _kernels.setdefault(op, {})
    return _registered.setdefault(op, {})


def register_device_kernel(op: str, device: str, name: str, kernel: Callable, check: Callable) -> None:
    """Register `kernel` (called as the op is) as kernel `name` of `op` for tensors of `device` ("cpu", "cuda").
    `check` takes the op's arguments and raises UnsupportedInput for inputs the kernel cannot take: the op's
    default body runs instead (counted in `fallbacks`), unless the kernel was asked for by name (then an error)."""
    reference = _references[op]

    def run(*args):
        try:
            check(*args)
        except UnsupportedInput as why:
            if name in (_active, _asked):
                raise RuntimeError(f"{op}: the {name!r} implementation cannot take these inputs: {why}") from None
            _count_fallback(op, f"the {name} kernel", why)
            return reference(*args)
        _last_impl[op] = name
        return kernel(*args)

    run.__name__ = run.__qualname__ = f"{op}_{name}"
    _kernels[op][name] = run
    _registered[op][device] = name
    _op_defs[op].register_kernel(device, run)
    if _active != "auto":  # a registration under an override (kernels loaded late): the override covers it too
        _apply(_active)


def _count_fallback(op: str, who: str, why) -> None:
    """Count a call of `op` that fell back to the reference; log the first one."""
    if fallbacks[op] == 0:
        _log.info("%s: %s cannot take these inputs (%s): the reference runs", op, who, why)
    fallbacks[op] += 1


def available_impls(op: str) -> list[str]:
    return sorted({"reference", *_kernels[op]})


def record(op: str, impl: str) -> None:
    _last_impl[op] = impl


def last_impl(op: str) -> str | None:
    """Which implementation the last call of `op` used (for tests and benchmark reports)."""
    return _last_impl.get(op)


# ------------------------------------------------------------------------------------------------------------
# The override
# ------------------------------------------------------------------------------------------------------------

def _check_name(name: str, what: str) -> None:
    if name not in IMPLS:
        raise ValueError(f"{what} must be one of {IMPLS}, got {name!r}")


def _apply(name: str) -> None:
    """Make the registrations those of override `name` (from those of "auto", restored first)."""
    global _active
    if name in ("cpp", "triton") and not any(name in kernels for kernels in _kernels.values()):
        available = sorted({k for kernels in _kernels.values() for k in kernels})
        raise RuntimeError(f"no {name!r} kernels are registered here (available: {available})")
    _undo.close()
    _active = "auto"
    if name == "reference":
        for op, devices in _registered.items():
            for device in devices:
                _undo.enter_context(_op_defs[op].set_kernel_enabled(device, False))
    elif name != "auto":
        for op, kernels in _kernels.items():
            if name not in kernels:  # e.g. masked_mae_loss_backward has no C++ kernel: the CPU runs its default body
                continue
            for device in DEVICES:
                if _registered[op].get(device) != name:
                    _op_defs[op].register_kernel(device, kernels[name])
                    _undo.callback(_restore, op, device)
    _active = name


def _restore(op: str, device: str) -> None:
    """Register again what "auto" has for `device`: its kernel, or the default body where it has none (there is no
    public way to remove a registration; the default body registered for a device computes what it would)."""
    name = _registered[op].get(device)
    _op_defs[op].register_kernel(device, _kernels[op][name] if name else _references[op])


def _set(name: str) -> None:
    if name != _active:
        _apply(name)


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Run the fused ops with implementation `name` (auto|reference|cpp|triton) inside the block, forward and
    backward; it wins over MAE_FAST_IMPL. Process-wide (not per thread); blocks nest."""
    _check_name(name, "use_impl's name")
    _scoped.append(name)
    try:
        _set(name)
        yield
    finally:
        _scoped.pop()
        _set(_scoped[-1] if _scoped else _env)


def sync_env() -> str:
    """Apply MAE_FAST_IMPL if it changed since it was last read (outside `use_impl` blocks). Called by the public
    functions; under torch.compile it runs when the call is traced (its result is a constant of the graph)."""
    global _env
    value = os.environ.get("MAE_FAST_IMPL", "auto")
    if value != _env:
        _check_name(value, "environment variable MAE_FAST_IMPL")
        _env = value
        if not _scoped:
            _set(value)
    return value


# What torch.compiler.assume_constant_result(sync_env) sets (Dynamo then runs it at trace time instead of tracing
# it), without that call's import of torch._dynamo: seconds at every `import mae_fast.ops`. Checked by
# tests/kernels/test_dispatch.py (the variable set before a first, compiled call; no graph break).
sync_env._dynamo_marked_constant = True  # type: ignore[attr-defined]


def runs_reference(op: str, impl: str) -> bool:
    """Whether a public function runs its plain-PyTorch reference: impl="reference", or "auto" under the override
    "reference". Reads MAE_FAST_IMPL (`sync_env`) first."""
    _check_name(impl, "impl")
    sync_env()
    if impl == "reference" or (impl == "auto" and _active == "reference"):
        _last_impl[op] = "reference"
        return True
    return False


def refuse(op: str, impl: str, why: str) -> None:
    """The op cannot take these inputs whatever kernel computes it (e.g. it gives no gradient to an input that
    asks for one): the public function runs the reference, counted in `fallbacks`; an error when a kernel was
    asked for by name."""
    name = impl if impl != "auto" else _active
    if name in ("cpp", "triton"):
        raise RuntimeError(f"{op}: the {name!r} implementation cannot take these inputs: {why}")
    if not torch.compiler.is_compiling():
        _count_fallback(op, "the fused op", why)
    _last_impl[op] = "reference"


@contextlib.contextmanager
def _asking(name: str) -> Iterator[None]:
    global _asked
    previous, _asked = _asked, name
    try:
        yield
    finally:
        _asked = previous


def call(op: str, impl: str, device: torch.device, op_fn: Callable, *args):
    """`op_fn(*args)` (the torch op of `op` on tensors of `device`) with `impl` (not "reference") in force: the
    registrations as they are for "auto" or the override in force; a kernel named by `impl` that "auto" registers
    for this device runs as under "auto" but raises where it would fall back; any other under `use_impl(impl)`."""
    if impl in ("auto", _active):
        return op_fn(*args)
    if _active == "auto" and _registered[op].get(device.type) == impl:
        if torch.compiler.is_compiling():
            return op_fn(*args)
        with _asking(impl):
            return op_fn(*args)
    with use_impl(impl):
        return op_fn(*args)
