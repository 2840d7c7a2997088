"""Fused masking + patchify + self-standardisation (Triton).

Two launches, each a single pass:
1. `_channel_stats_kernel`, one program per (image, channel) plane: mean and 1/sqrt(var + eps) of the unit-scaled
   plane, merging per-tile (mean, M2) with Chan's formula (no catastrophic cancellation in float32).
2. `_masked_patchify_kernel`, one program per patch row (per image, or per image channel for the channel layout):
   reads the row's pixels once in their raw dtype (uint8/uint16/int32/float), standardises them and writes each
   token straight to its shuffled slot — `visible[b, pos]` when pos = ids_restore[b, t] < len_keep, else
   `target[b, pos - len_keep]` — in (p, q, c) or (p, q) order. Stores are contiguous per token; loads gather the
   token's pixels, which the patch row's tiles read in full (cached), so every image byte comes from DRAM once.
The permutation itself (torch.rand + argsort, shared with the reference) is drawn by `ops.masked_patchify`.
Statistics may also be passed in (`stats=`), e.g. from a data loader; the kernel then reads the image only once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast import ops
from mae_fast.kernels._common import check_device, next_pow2


@triton.jit
def _channel_stats_kernel(
    img, mean_out, rstd_out,
    C, H, W, s_b, s_c, s_h, s_w,
    inv_scale, eps,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)  # b * C + c
    b = pid // C
    c = pid % C
    base = img + b.to(tl.int64) * s_b + c.to(tl.int64) * s_c
    zero = pid.to(tl.float32) * 0.0  # float32 scalars carried through the loop
    count = zero
    mean = zero
    m2 = zero
    for y0 in range(0, H, BLOCK_H):
        rows = y0 + tl.arange(0, BLOCK_H)
        for x0 in range(0, W, BLOCK_W):
            cols = x0 + tl.arange(0, BLOCK_W)
            inside = (rows[:, None] < H) & (cols[None, :] < W)
            v = tl.load(base + rows[:, None].to(tl.int64) * s_h + cols[None, :] * s_w, mask=inside, other=0)
            v = v.to(tl.float32)
            n_tile = (tl.minimum(H - y0, BLOCK_H) * tl.minimum(W - x0, BLOCK_W)).to(tl.float32)
            tile_mean = tl.sum(tl.sum(v, axis=1), axis=0) / n_tile
            d = tl.where(inside, v - tile_mean, 0.0)
            tile_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            total = count + n_tile  # Chan et al.: merge (count, mean, m2) with the tile's
            delta = tile_mean - mean
            mean = mean + delta * (n_tile / total)
            m2 = m2 + tile_m2 + delta * delta * (count * n_tile / total)
            count = total
    var = m2 / count * inv_scale * inv_scale
    tl.store(mean_out + pid, mean * inv_scale)
    tl.store(rstd_out + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _masked_patchify_kernel(
    img, mean, rstd, ids_restore, visible, target,
    H, W, s_b, s_c, s_h, s_w,
    L, len_keep, inv_scale,
    C: tl.constexpr, PATCH: tl.constexpr, CHANNEL_LAYOUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # program (image row, token block): image row = b * h + hi (standard) or (b * C + c) * h + hi (channel)
    row = tl.program_id(0)
    w = W // PATCH
    h = H // PATCH
    if CHANNEL_LAYOUT:
        b = row // (C * h)
        c_row = (row // h) % C
        TOKEN: tl.constexpr = PATCH * PATCH
        N_CHUNKS: tl.constexpr = 1
        first_token = c_row * h * w
    else:
        b = row // h
        c_row = 0
        TOKEN: tl.constexpr = PATCH * PATCH * C
        N_CHUNKS: tl.constexpr = C
        first_token = 0
    hi = row % h
    wi = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = wi < w
    t = first_token + hi * w + wi
    pos = tl.load(ids_restore + b.to(tl.int64) * L + t, mask=t_ok, other=0)
    is_visible = pos < len_keep
    vis_row = visible + (b.to(tl.int64) * len_keep + pos) * TOKEN
    tgt_row = target + (b.to(tl.int64) * (L - len_keep) + (pos - len_keep)) * TOKEN
    img_b = img + b.to(tl.int64) * s_b
    CHUNK: tl.constexpr = PATCH * PATCH
    for k in range(N_CHUNKS):  # token columns [k * p^2, (k + 1) * p^2)
        col = k * CHUNK + tl.arange(0, CHUNK)
        if CHANNEL_LAYOUT:
            pp = col // PATCH
            q = col % PATCH
            ch = tl.zeros_like(col) + c_row
        else:  # (p, q, c) order
            pp = col // (PATCH * C)
            q = (col // C) % PATCH
            ch = col % C
        mu = tl.load(mean + b * C + ch)
        rs = tl.load(rstd + b * C + ch)
        src = (ch.to(tl.int64) * s_c + (hi * PATCH + pp).to(tl.int64) * s_h)[None, :] \
            + ((wi * PATCH)[:, None] + q[None, :]).to(tl.int64) * s_w
        x = tl.load(img_b + src, mask=t_ok[:, None], other=0).to(tl.float32)
        y = (x * inv_scale - mu[None, :]) * rs[None, :]
        tl.store(vis_row[:, None] + col[None, :], y, mask=(t_ok & is_visible)[:, None])
        tl.store(tgt_row[:, None] + col[None, :], y, mask=(t_ok & ~is_visible)[:, None])


def channel_stats_triton(images: torch.Tensor, eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image per-channel (mean, rstd) of images / pixel_scale: (B, C) float32 each, one launch; eps defaults to
    `ops.standardize_eps(images.dtype)`."""
    eps = ops.standardize_eps(images.dtype) if eps is None else eps
    B, C, H, W = images.shape
    mean = torch.empty((B, C), dtype=torch.float32, device=images.device)
    rstd = torch.empty_like(mean)
    block_w = min(next_pow2(W), 256)
    block_h = max(1, min(next_pow2(H), 2048 // block_w))
    _channel_stats_kernel[(B * C,)](
        images, mean, rstd, C, H, W, *images.stride(), 1.0 / ops.pixel_scale(images.dtype), eps,
        BLOCK_H=block_h, BLOCK_W=block_w, num_warps=8,
    )
    return mean, rstd


def _masked_patchify_write(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout, visible, target):
    """One launch filling visible (B, len_keep, P) and target (B, L - len_keep, P), float32."""
    B, C, H, W = images.shape
    p = patch_size
    h, w = H // p, W // p
    rows = B * h * (C if channel_layout else 1)
    block_t = min(next_pow2(w), max(1, 2048 // (p * p)))  # tiles of 2048 pixels (40-50 registers on sm_90)
    grid = (rows, triton.cdiv(w, block_t))
    _masked_patchify_kernel[grid](
        images, mean, rstd, ids_restore, visible, target,
        H, W, *images.stride(),
        ids_restore.shape[1], len_keep, 1.0 / ops.pixel_scale(images.dtype),
        C=C, PATCH=p, CHANNEL_LAYOUT=channel_layout, BLOCK_T=block_t, num_warps=8,
    )


# `mae_fast::masked_patchify_triton`: one opaque node with a fake under torch.compile
_masked_patchify = ops.define_masked_patchify_op("triton", channel_stats_triton, _masked_patchify_write)


def masked_patchify_triton(images, patch_size, masking, layout, stats=None, *, visible=None, target=None):
    """Backend of `ops.masked_patchify` for CUDA tensors. `stats`: optional (mean, rstd), (B, C) float32 of the
    unit-scaled images (computed by `channel_stats_triton` otherwise)."""
    check_device(images, masking.ids_restore)
    ops.check_fused_patchify_input(images, masking)
    p = patch_size
    if p * p < 16 or p & (p - 1):
        raise ops.UnsupportedInput(f"patch size {p} (the Triton kernel takes powers of two >= 4)")
    return _masked_patchify(images, p, masking, layout, stats, visible=visible, target=target)
