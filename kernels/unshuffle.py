"""Decoder unshuffle (Triton): prefix (class) tokens + visible tokens + mask token -> the full sequence in original
order, + the positional embedding.

x is (B, prefix + K, D): `prefix` leading tokens that keep their place (the class token), then the K visible
tokens in shuffled order; the output is (B, prefix + L, D) and pos_embed (prefix + L, D), so the model needs no
torch.cat around the op. Output row r of image b:
    r <  prefix:  x[b, r] + pos[r]
    r >= prefix:  (x[b, prefix + ids_restore[b, r - prefix]] if that id < K else mask_token) + pos[r]
Dtypes: x is read in its own dtype; mask_token and pos_embed arrive in the output dtype (by default the promotion of
the three, e.g. bf16 tokens + float32 mask token and positions -> float32 out, as the torch.cat it replaces). A token
is rounded to the output dtype (a no-op unless the output is narrower than x), the sum is formed in float32 and
rounded once to the output dtype, like torch's add.
forward: one program per (image, block of rows), 128-bit row loads and stores.
backward: grad_out arrives in the output dtype, grad_x is written in x's dtype (converted as it is stored: no
    separate conversion pass). A persistent grid (a few programs per multiprocessor, each with one D slice) walks the
    row blocks: grad_x[b, src] = grad_out[b, r] for every kept row (ids_restore is a permutation, so every row of
    grad_x is written exactly once: no atomics, no zero fill), and each program sums the masked rows of its tiles in
    float32 registers, writing one (D slice) row at the end; the host sums those (programs x D, ~1 MB at most) in a
    fixed order (deterministic). No (B * L / BLOCK_T, D) partials buffer.
Registered as the "triton" kernel of `mae_fast::unshuffle` (mae_fast/ops/unshuffle.py) at import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast.kernels._common import device_problem, next_pow2, persistent_programs
from mae_fast.ops.unshuffle import (UnsupportedInput, check_fused_unshuffle_backward_input, check_fused_unshuffle_input,
                                    register_kernel)


@triton.jit
def _unshuffle_forward_kernel(
    x, mask_token, ids_restore, pos_embed, out,
    L, K, D, s_xb, s_xk, PREFIX,
    HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # output rows, prefix included
    rows = PREFIX + L
    r_ok = r < rows
    is_prefix = r < PREFIX
    src = tl.load(ids_restore + b.to(tl.int64) * L + (r - PREFIX), mask=r_ok & (r >= PREFIX), other=0)
    x_row = tl.where(is_prefix, r, PREFIX + src)
    visible = r_ok & (is_prefix | (src < K))
    x_rows = x + b.to(tl.int64) * s_xb + x_row.to(tl.int64) * s_xk
    out_rows = out + (b.to(tl.int64) * rows + r) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xv = tl.load(x_rows[:, None] + d[None, :], mask=visible[:, None] & d_ok[None, :], other=0.0)
        mt = tl.load(mask_token + d, mask=d_ok, other=0.0)
        # the token rounded to the output dtype first, as the reference converts it (free when not narrower)
        v = tl.where(visible[:, None], xv.to(out.dtype.element_ty).to(tl.float32), mt.to(tl.float32)[None, :])
        if HAS_POS:
            pe = tl.load(pos_embed + r[:, None] * D + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            v = v + pe.to(tl.float32)
        tl.store(out_rows[:, None] + d[None, :], v.to(out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _unshuffle_backward_kernel(
    grad_out, ids_restore, grad_x, token_sums,
    L, K, D, PREFIX, n_tiles, n_row_blocks,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    rows = PREFIX + L
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tile in range(pid, n_tiles, n_programs):
        b = tile // n_row_blocks
        r = (tile % n_row_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        r_ok = r < rows
        is_prefix = r < PREFIX
        src = tl.load(ids_restore + b.to(tl.int64) * L + (r - PREFIX), mask=r_ok & (r >= PREFIX), other=0)
        x_row = tl.where(is_prefix, r, PREFIX + src)
        kept = r_ok & (is_prefix | (src < K))
        masked = r_ok & ~is_prefix & (src >= K)
        g = tl.load(grad_out + (b.to(tl.int64) * rows + r)[:, None] * D + d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        gx_rows = grad_x + (b.to(tl.int64) * (PREFIX + K) + x_row) * D
        tl.store(gx_rows[:, None] + d[None, :], g.to(grad_x.dtype.element_ty), mask=kept[:, None] & d_ok[None, :])
        acc += tl.sum(tl.where(masked[:, None], g.to(tl.float32), 0.0), axis=0)
    tl.store(token_sums + pid.to(tl.int64) * D + d, acc, mask=d_ok)


def _blocks(D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): tiles of 2048 values (16 x 256 tiles took 193 registers on sm_90, 8 x 256 take 72)."""
    block_d = min(next_pow2(D), 256)
    return max(1, 2048 // block_d), block_d


def unshuffle_forward_triton(x, mask_token, ids_restore, pos_embed, prefix: int = 0, *, out=None):
    """Kernel call of the forward; mask_token (D,) and pos_embed (prefix + L, D) already in the output dtype, which
    `out` (B, prefix + L, D) has (allocated in mask_token's dtype when not given)."""
    B, _, D = x.shape
    L = ids_restore.shape[1]
    K = x.shape[1] - prefix
    if out is None:
        out = torch.empty((B, prefix + L, D), dtype=mask_token.dtype, device=x.device)
    block_t, block_d = _blocks(D)
    grid = (B, triton.cdiv(prefix + L, block_t))
    _unshuffle_forward_kernel[grid](
        x, mask_token, ids_restore.contiguous(), pos_embed if pos_embed is not None else mask_token, out,
        L, K, D, x.stride(0), x.stride(1), prefix,
        HAS_POS=pos_embed is not None, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return out


def unshuffle_backward_triton(grad_out, ids_restore, grad_x, prefix: int = 0):
    """Fills grad_x (B, prefix + K, D), in x's dtype, from grad_out (B, prefix + L, D) in the output's; returns the
    float32 gradient of the mask token (D,)."""
    B, rows, D = grad_out.shape
    L = ids_restore.shape[1]
    K = grad_x.shape[1] - prefix
    block_t, block_d = _blocks(D)
    n_row_blocks = triton.cdiv(rows, block_t)
    n_tiles = B * n_row_blocks
    n_programs = persistent_programs(grad_out.device, n_tiles, 4)  # 4 resident per multiprocessor
    token_sums = torch.empty((n_programs, D), dtype=torch.float32, device=grad_out.device)
    _unshuffle_backward_kernel[(n_programs, triton.cdiv(D, block_d))](
        grad_out, ids_restore.contiguous(), grad_x, token_sums, L, K, D, prefix, n_tiles, n_row_blocks,
        BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return token_sums.sum(0)


def check_input(x_visible, mask_token, ids_restore, pos_embed, out_dtype) -> None:
    why = device_problem(x_visible, mask_token, ids_restore, pos_embed)
    if why:
        raise UnsupportedInput(why)
    check_fused_unshuffle_input(x_visible, mask_token, ids_restore, pos_embed, out_dtype)


def check_backward_input(grad_out, ids_restore, x_dtype) -> None:
    why = device_problem(grad_out, ids_restore)
    if why:
        raise UnsupportedInput(why)
    check_fused_unshuffle_backward_input(grad_out, ids_restore, x_dtype)


register_kernel("triton", "cuda", unshuffle_forward_triton, unshuffle_backward_triton, check_input,
                check_backward_input)
