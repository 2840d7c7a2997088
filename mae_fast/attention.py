"""The one attention function every block calls.

FlashAttention (`flash_attn.flash_attn_func`) when it is importable and the inputs are CUDA fp16/bf16, else
`torch.nn.functional.scaled_dot_product_attention` (which itself picks flash / memory-efficient / math kernels).
`last_backend()` says which ran, so benchmarks can report it. `use_backend("math")` forces the explicit
softmax(q·kᵀ/√d)·v formulation (three plain tensor ops) within a block: the form every FLOP counter and profiler sees,
whatever a torch version books for its fused SDPA kernels.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

try:  # optional dependency: pip install mae_fast[flash]
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure (missing wheel, CUDA mismatch) means "not available"
    _flash_attn_func = None

_last_backend: str | None = None
_forced_backend: str | None = None
BACKENDS = ("math",)


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention. q: (B, H, N, d), k/v: (B, H, M, d) -> (B, H, N, d)."""
    global _last_backend
    if _forced_backend == "math":
        _last_backend = "math"
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(scores.softmax(dim=-1), v)
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        _last_backend = "flash_attn"
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # wants (B, N, H, d)
        return out.transpose(1, 2)
    _last_backend = "sdpa"
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
    """'flash_attn', 'sdpa' or 'math': the backend of the most recent attention call (None before any call)."""
    return _last_backend
