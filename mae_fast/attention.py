"""The one attention function every block calls, and the choice of the kernel that runs it.

In order of preference, on CUDA fp16/bf16 inputs:
  1. FlashAttention-4 (`flash_attn.cute.flash_attn_func`, package flash-attn-4: CUTLASS DSL, SM90+ forward and
     backward) when it is importable;
  2. the classic FlashAttention (`flash_attn.flash_attn_func`, package flash-attn) when it is installed;
  3. `torch.nn.functional.scaled_dot_product_attention` with the backend (flash, cuDNN, memory-efficient, math)
     measured fastest for this (shapes, dtype, device, gradient) -- see `SDPABackendCache`.
A FlashAttention package that refuses a shape (e.g. a head dimension it has no kernel for) is not asked again for
that shape: the next choice runs. On a CPU, SDPA keeps its own choice (its CPU flash kernel or math): there is one
candidate worth having, so the cache is trivial there and nothing is measured. Under torch.compile SDPA keeps its
own choice (Inductor picks the kernel); during CUDA-graph capture a cached choice runs, nothing is measured.

`last_backend()` names what ran. `use_backend("math")` forces the explicit softmax(q·kᵀ/√d)·v formulation (three
plain tensor ops, the form every FLOP counter sees), `use_backend("sdpa")` plain SDPA with its own choice (the
reference benchmark stack); `use_backend("auto")` is the default above.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mae_fast.device import time_call

try:  # optional dependency: pip install flash-attn-4 (pure Python on nvidia-cutlass-dsl)
    from flash_attn.cute import flash_attn_func as _fa4_func
except Exception:  # noqa: BLE001 - any import failure (missing wheel, no CUDA driver, DSL mismatch) means "not available"
    _fa4_func = None
try:  # optional dependency: pip install mae_fast[flash] (the classic, compiled flash-attn)
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001
    _flash_attn_func = None

BACKENDS = ("auto", "sdpa", "math")
# SDPA's kernels by the names last_backend() reports ("sdpa_" + name)
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_DEVICE_TYPES = ("cuda",)  # where the FlashAttention packages run (tests widen it to run fakes on a CPU)

_last_backend: str | None = None
_forced_backend: str = "auto"
_flash_refused: set[tuple] = set()  # (package, shape key): shapes a FlashAttention package raised on


def flash_attn_available() -> bool:
    """Is a FlashAttention package (FA4 or the classic one) importable?"""
    return _fa4_func is not None or _flash_attn_func is not None


def shape_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """What a kernel choice depends on: shapes, dtype, device and whether a backward will follow."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, str(q.device), grad


def _not_measurable() -> bool:
    """Inside torch.compile tracing or CUDA-graph capture: no timing, no host synchronisation."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def time_backend(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of `fn()` after one warm-up call: CUDA events on a GPU, the host clock elsewhere."""
    fn()
    return statistics.median(time_call(fn, device) for _ in range(repeats))


class SDPABackendCache:
    """The fastest SDPA backend per `shape_key`, measured once per key: every candidate runs on copies of the real
    inputs (forward, plus backward when one will follow), a candidate that refuses the inputs (or runs out of memory)
    is left out, and the fastest is kept. `measured_device_types`: where measuring is worth it (CUDA; on a CPU SDPA's
    own choice stands). `timer(fn, device) -> seconds` is `time_backend` unless a test passes a fake."""

    def __init__(self, candidates=tuple(SDPA_BACKENDS), measured_device_types=("cuda",), timer=time_backend):
        self.candidates = tuple(candidates)
        self.measured_device_types = tuple(measured_device_types)
        self.timer = timer
        self.choices: dict[tuple, str | None] = {}
        self.timings: dict[tuple, dict[str, float | str]] = {}  # per key: seconds, or why a candidate was left out

    def choose(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
        """The backend name to run, or None for SDPA's own choice (not measured on this device, or while tracing)."""
        if q.device.type not in self.measured_device_types:
            return None
        key = shape_key(q, k, v)
        if key in self.choices:
            return self.choices[key]
        if _not_measurable():
            return None
        timings = self.measure(q, k, v, backward=key[-1])
        seconds = {name: t for name, t in timings.items() if isinstance(t, float)}
        self.timings[key] = timings
        self.choices[key] = min(seconds, key=seconds.get) if seconds else None
        return self.choices[key]

    def measure(self, q, k, v, backward: bool) -> dict[str, float | str]:
        with torch.no_grad():
            inputs = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
            grad_out = q.detach() if backward else None  # real values, and no draw from the global RNG
        timings: dict[str, float | str] = {}
        for name in self.candidates:
            def run(name=name):
                with sdpa_kernel([SDPA_BACKENDS[name]]), torch.enable_grad():
                    out = F.scaled_dot_product_attention(*inputs)
                    if backward:
                        out.backward(grad_out)
            try:
                with warnings.catch_warnings():  # SDPA explains at length why a forced backend cannot run
                    warnings.simplefilter("ignore")
                    timings[name] = float(self.timer(run, q.device))
            except torch.OutOfMemoryError:
                timings[name] = "out of memory"
            except RuntimeError as err:  # "No available kernel" for these inputs
                timings[name] = f"unavailable: {str(err).splitlines()[0][:120]}"
            finally:
                for t in inputs:
                    t.grad = None
        return timings

    def report(self) -> list[dict]:
        """The measured choices, JSON-ready: shapes, dtype, device, whether a backward was timed, the backend chosen
        (None: SDPA's own) and every candidate's seconds (or why it was left out)."""
        return [{"q": list(key[0]), "kv": list(key[1]), "dtype": str(key[3]).replace("torch.", ""), "device": key[4],
                 "backward": key[5], "chosen": choice, "seconds": dict(self.timings.get(key, {}))}
                for key, choice in self.choices.items()]

    def clear(self) -> None:
        self.choices.clear()
        self.timings.clear()


sdpa_cache = SDPABackendCache()


def _math_attention(q, k, v):
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(scores.softmax(dim=-1), v)


def _flash_package(name: str, fn, q, k, v) -> torch.Tensor | None:
    """FlashAttention package `fn` on (B, N, H, d) views; None when it refuses this shape (remembered)."""
    key = (name, shape_key(q, k, v))
    if key in _flash_refused:
        return None
    try:
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    except Exception as err:  # noqa: BLE001 - an unsupported head dim / arch / layout: the next backend runs
        _flash_refused.add(key)
        warnings.warn(f"mae_fast.attention: {name} refused q {tuple(q.shape)} {q.dtype} ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:160] if str(err) else ''}); using the next backend for this shape",
                      RuntimeWarning, stacklevel=3)
        return None
    if isinstance(out, tuple):  # FA4 returns (out, lse)
        out = out[0]
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention. q: (B, H, N, d), k/v: (B, H, M, d) -> (B, H, N, d)."""
    global _last_backend
    if _forced_backend == "math":
        _last_backend = "math"
        return _math_attention(q, k, v)
    if _forced_backend == "auto" and q.device.type in FLASH_DEVICE_TYPES and q.dtype in FLASH_DTYPES:
        for name, fn in (("flash_attn_4", _fa4_func), ("flash_attn", _flash_attn_func)):
            if fn is not None:
                out = _flash_package(name, fn, q, k, v)
                if out is not None:
                    _last_backend = name
                    return out
    measured = _forced_backend == "auto" and not torch.compiler.is_compiling()
    choice = sdpa_cache.choose(q, k, v) if measured else None
    if choice is None:
        _last_backend = "sdpa"
        return F.scaled_dot_product_attention(q, k, v)
    _last_backend = "sdpa_" + choice
    with sdpa_kernel([SDPA_BACKENDS[choice]]):
        return F.scaled_dot_product_attention(q, k, v)


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block every attention call uses backend `name` (one of BACKENDS)."""
    global _forced_backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def last_backend() -> str | None:
    """The backend of the most recent attention call (None before any): "flash_attn_4", "flash_attn",
    "sdpa_flash" / "sdpa_cudnn" / "sdpa_efficient" / "sdpa_math" (the measured choice), "sdpa" (SDPA's own choice:
    on a CPU, under torch.compile, or forced by use_backend("sdpa")) or "math" (use_backend("math"))."""
    return _last_backend
