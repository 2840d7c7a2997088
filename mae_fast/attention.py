"""The one attention function every block calls.

FlashAttention (`flash_attn.flash_attn_func`) when it is importable and the inputs are CUDA fp16/bf16, else
`torch.nn.functional.scaled_dot_product_attention` (which itself picks flash / memory-efficient / math kernels).
`last_backend()` says which ran, so benchmarks can report it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional dependency: pip install mae_fast[flash]
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure (missing wheel, CUDA mismatch) means "not available"
    _flash_attn_func = None

_last_backend: str | None = None


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention. q: (B, H, N, d), k/v: (B, H, M, d) -> (B, H, N, d)."""
    global _last_backend
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        _last_backend = "flash_attn"
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # wants (B, N, H, d)
        return out.transpose(1, 2)
    _last_backend = "sdpa"
    return F.scaled_dot_product_attention(q, k, v)


def last_backend() -> str | None:
    """'flash_attn' or 'sdpa': the backend of the most recent attention call (None before any call)."""
    return _last_backend
