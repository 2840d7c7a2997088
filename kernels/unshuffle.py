"""Decoder unshuffle (Triton): visible tokens + mask token -> full sequence in original order, + pos embedding.

forward, one program per (image, token block):
    out[b, t] = (x[b, ids_restore[b, t]] if ids_restore[b, t] < K else mask_token) + pos_embed[t]
backward, the same grid:
    grad_x[b, ids_restore[b, t]] = grad_out[b, t] for visible t — ids_restore is a permutation, so every row of
    grad_x is written exactly once (no atomics, no zero fill) — and each program writes the float32 sum of its
    masked rows of grad_out to a (programs, D) buffer that one torch sum reduces (deterministic).
mask_token and pos_embed arrive in x's dtype; the sum is formed in float32 and rounded once, like torch's add.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast import ops
from mae_fast.kernels._common import check_device, next_pow2


@triton.jit
def _unshuffle_forward_kernel(
    x, mask_token, ids_restore, pos_embed, out,
    L, K, D, s_xb, s_xk,
    HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < L
    src = tl.load(ids_restore + b.to(tl.int64) * L + t, mask=t_ok, other=0)
    visible = t_ok & (src < K)
    x_rows = x + b.to(tl.int64) * s_xb + src * s_xk
    out_rows = out + (b.to(tl.int64) * L + t) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xv = tl.load(x_rows[:, None] + d[None, :], mask=visible[:, None] & d_ok[None, :], other=0.0)
        mt = tl.load(mask_token + d, mask=d_ok, other=0.0)
        v = tl.where(visible[:, None], xv.to(tl.float32), mt.to(tl.float32)[None, :])
        if HAS_POS:
            pe = tl.load(pos_embed + t[:, None] * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            v = v + pe.to(tl.float32)
        tl.store(out_rows[:, None] + d[None, :], v.to(out.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _unshuffle_backward_kernel(
    grad_out, ids_restore, grad_x, partial,
    L, K, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < L
    src = tl.load(ids_restore + b.to(tl.int64) * L + t, mask=t_ok, other=0)
    visible = t_ok & (src < K)
    masked = t_ok & (src >= K)
    g_rows = grad_out + (b.to(tl.int64) * L + t) * D
    gx_rows = grad_x + (b.to(tl.int64) * K + src) * D
    partial_row = partial + (b.to(tl.int64) * tl.num_programs(1) + tb) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        g = tl.load(g_rows[:, None] + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        tl.store(gx_rows[:, None] + d[None, :], g, mask=visible[:, None] & d_ok[None, :])
        g_masked = tl.where(masked[:, None], g.to(tl.float32), 0.0)
        tl.store(partial_row + d, tl.sum(g_masked, axis=0), mask=d_ok)


def _blocks(D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): tiles of 2048 values (16 x 256 tiles took 193 registers on sm_90, 8 x 256 take 72)."""
    block_d = min(next_pow2(D), 256)
    return max(1, 2048 // block_d), block_d


def unshuffle_forward_triton(x_visible, mask_token, ids_restore, pos_embed, *, out=None):
    """Kernel call of the forward; mask_token and pos_embed already in x_visible's dtype."""
    B, K, D = x_visible.shape
    L = ids_restore.shape[1]
    if out is None:
        out = torch.empty((B, L, D), dtype=x_visible.dtype, device=x_visible.device)
    block_t, block_d = _blocks(D)
    grid = (B, triton.cdiv(L, block_t))
    _unshuffle_forward_kernel[grid](
        x_visible, mask_token, ids_restore.contiguous(), pos_embed if pos_embed is not None else mask_token, out,
        L, K, D, x_visible.stride(0), x_visible.stride(1),
        HAS_POS=pos_embed is not None, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return out


def unshuffle_backward_triton(grad_out, ids_restore, grad_x):
    """Fills grad_x (B, K, D); returns the float32 gradient of the mask token (D,)."""
    B, L, D = grad_out.shape
    K = grad_x.shape[1]
    block_t, block_d = _blocks(D)
    n_tb = triton.cdiv(L, block_t)
    partial = torch.empty((B * n_tb, D), dtype=torch.float32, device=grad_out.device)
    _unshuffle_backward_kernel[(B, n_tb)](
        grad_out, ids_restore.contiguous(), grad_x, partial, L, K, D, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return partial.sum(0)


# `mae_fast::unshuffle_triton` (+ `_backward`): one opaque node with a fake and an autograd formula under torch.compile
_unshuffle_op = ops.define_unshuffle_op("triton", unshuffle_forward_triton, unshuffle_backward_triton)


def unshuffle_triton(x_visible, mask_token, ids_restore, pos_embed):
    check_device(x_visible, mask_token, ids_restore, pos_embed)
    ops.check_fused_unshuffle_input(x_visible, mask_token, ids_restore, pos_embed)
    return _unshuffle_op(x_visible, mask_token, ids_restore, pos_embed)
