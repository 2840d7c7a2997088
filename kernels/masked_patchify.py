"""Fused masking + patchify + self-standardisation (Triton), one DRAM read of the image.

Per chunk of images (sized to stay resident in L2, `L2_CHUNK_BYTES`), two launches:
1. `_tile_stats_kernel`, split-plane: one program per (image, channel, tile of BLOCK_H x BLOCK_W pixels) reads its
   tile with contiguous row loads and writes the tile's (count, mean, M2) of the unit-scaled pixels (two-pass
   inside the tile, so no E[x^2] - E[x]^2 cancellation). Many programs per plane (16 at 256^2): no serial loop.
2. `_masked_patchify_kernel`, one program per (image, patch row, block of BLOCK_T tokens): merges the image's tile
   partials on chip (`_merge_stats`: mean = sum n_k m_k / N, M2 = sum M2_k + n_k (m_k - mean)^2), reads the
   C x p x (BLOCK_T p) pixel block with contiguous row loads (the chunk was just read by launch 1, so from L2),
   standardises it, permutes it on chip to token order ((p, q, c) or (p, q)) and writes each token to its shuffled
   slot — visible[b, pos] in the visible buffer's dtype (bf16 under autocast) when pos = ids_restore[b, t] <
   len_keep, else target[b, pos - len_keep] in float32.
The formula is the reference's: mean and 1/sqrt(var + standardize_eps(dtype)) of images / pixel_scale.
Statistics may also be passed in (`stats=`, e.g. from a data loader): then launch 1 is skipped.
The permutation itself (torch.rand + argsort, shared with the reference) is drawn by `ops.masked_patchify`.
Registered as the "triton" kernel of `mae_fast::masked_patchify` (mae_fast/ops/masked_patchify.py) at import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast.kernels._common import device_problem, next_pow2
from mae_fast.ops.masked_patchify import UnsupportedInput, check_fused_patchify_input, register_kernel
from mae_fast.ops.masked_patchify import pixel_scale, standardize_eps

L2_CHUNK_BYTES = 24 << 20  # images per chunk: the stats launch's read stays in the H200's 50 MB L2 for the patchify
STATS_TILE = 4096          # pixels per stats program (16 rows of a 256-wide plane)


@triton.jit
def _tile_stats_kernel(
    img, partial, C, H, W, s_b, s_c, s_h, s_w, inv_scale, n_tiles_w, n_tiles,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0)  # b * C + c within the chunk
    tile = tl.program_id(1)
    b = plane // C
    c = plane % C
    y0 = (tile // n_tiles_w) * BLOCK_H
    x0 = (tile % n_tiles_w) * BLOCK_W
    rows = y0 + tl.arange(0, BLOCK_H)
    cols = x0 + tl.arange(0, BLOCK_W)
    inside = (rows[:, None] < H) & (cols[None, :] < W)
    base = img + b.to(tl.int64) * s_b + c.to(tl.int64) * s_c
    v = tl.load(base + rows[:, None].to(tl.int64) * s_h + cols[None, :] * s_w, mask=inside, other=0)
    v = v.to(tl.float32) * inv_scale
    n = (tl.minimum(H - y0, BLOCK_H) * tl.minimum(W - x0, BLOCK_W)).to(tl.float32)
    mean = tl.sum(tl.sum(v, axis=1), axis=0) / n
    d = tl.where(inside, v - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    out = partial + (plane.to(tl.int64) * n_tiles + tile) * 3
    tl.store(out, n)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _merge_stats(partial, first_plane, C, n_tiles, eps, C_PAD: tl.constexpr, TILES_PAD: tl.constexpr):
    """(mean, rstd) per channel, (C_PAD,) float32, of planes first_plane .. first_plane + C - 1 from their tile
    partials (count, mean, M2); padded channels get mean 0, rstd 0."""
    ch = tl.arange(0, C_PAD)
    k = tl.arange(0, TILES_PAD)
    ok = (ch[:, None] < C) & (k[None, :] < n_tiles)
    at = partial + ((first_plane + ch).to(tl.int64)[:, None] * n_tiles + k[None, :]) * 3
    n = tl.load(at, mask=ok, other=0.0)
    m = tl.load(at + 1, mask=ok, other=0.0)
    m2 = tl.load(at + 2, mask=ok, other=0.0)
    total = tl.maximum(tl.sum(n, axis=1), 1.0)
    mean = tl.sum(n * m, axis=1) / total
    d = m - mean[:, None]
    var = (tl.sum(m2, axis=1) + tl.sum(n * d * d, axis=1)) / total
    rstd = tl.where(ch < C, 1.0 / tl.sqrt(var + eps), 0.0)
    return mean, rstd


@triton.jit
def _merge_stats_kernel(partial, mean_out, rstd_out, C, n_tiles, eps,
                        C_PAD: tl.constexpr, TILES_PAD: tl.constexpr):
    b = tl.program_id(0)
    mean, rstd = _merge_stats(partial, b * C, C, n_tiles, eps, C_PAD, TILES_PAD)
    ch = tl.arange(0, C_PAD)
    tl.store(mean_out + b * C + ch, mean, mask=ch < C)
    tl.store(rstd_out + b * C + ch, rstd, mask=ch < C)


@triton.jit
def _masked_patchify_kernel(
    img, partial, mean_in, rstd_in, ids_restore, visible, target,
    H, W, s_b, s_c, s_h, s_w,
    L, len_keep, inv_scale, n_tiles, eps,
    C: tl.constexpr, C_PAD: tl.constexpr, PATCH: tl.constexpr, CHANNEL_LAYOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_STATS: tl.constexpr, TILES_PAD: tl.constexpr, EVEN: tl.constexpr,
):
    # program (patch row, token block): patch row = b * h + hi (standard) or (b * C + c) * h + hi (channel)
    row = tl.program_id(0)
    w = W // PATCH
    h = H // PATCH
    if CHANNEL_LAYOUT:
        b = row // (C * h)
        c_row = (row // h) % C
        CH: tl.constexpr = 1          # channels in this program's pixel block
        TOKEN: tl.constexpr = PATCH * PATCH
        first_token = c_row * h * w
    else:
        b = row // h
        c_row = 0
        CH: tl.constexpr = C_PAD
        TOKEN: tl.constexpr = PATCH * PATCH * C
        first_token = 0
    hi = row % h
    ch = c_row + tl.arange(0, CH)  # (CH,)
    ch_ok = ch < C
    # per-channel statistics: merged from the stats launch's tile partials, or given
    if HAS_STATS:
        mu = tl.load(mean_in + b * C + ch, mask=ch_ok, other=0.0)
        rs = tl.load(rstd_in + b * C + ch, mask=ch_ok, other=0.0)
    else:
        mean_all, rstd_all = _merge_stats(partial, b * C, C, n_tiles, eps, C_PAD, TILES_PAD)
        if CHANNEL_LAYOUT:  # pick this program's channel out of the merged vector
            sel = tl.arange(0, C_PAD) == c_row
            mu = tl.sum(tl.where(sel, mean_all, 0.0), axis=0) + tl.zeros((CH,), tl.float32)
            rs = tl.sum(tl.where(sel, rstd_all, 0.0), axis=0) + tl.zeros((CH,), tl.float32)
        else:
            mu = mean_all
            rs = rstd_all
    # pixel block (CH, p rows, BLOCK_T * p columns): contiguous along the image row
    r = tl.arange(0, PATCH)
    x = tl.program_id(1) * (BLOCK_T * PATCH) + tl.arange(0, BLOCK_T * PATCH)
    x_ok = (x < w * PATCH) | EVEN  # EVEN: BLOCK_T divides w, no column mask (keeps the loads 128-bit)
    src = img + b.to(tl.int64) * s_b + (ch.to(tl.int64) * s_c)[:, None, None] \
        + ((hi * PATCH + r).to(tl.int64) * s_h)[None, :, None] + (x * s_w)[None, None, :]
    ok = ch_ok[:, None, None] & x_ok[None, None, :]
    v = tl.load(src, mask=ok, other=0).to(tl.float32)
    y = (v * inv_scale - mu[:, None, None]) * rs[:, None, None]
    # on-chip permute (c, pp, t, q) -> (t, pp, q, c)
    y = tl.permute(tl.reshape(y, (CH, PATCH, BLOCK_T, PATCH)), (2, 1, 3, 0))
    wi = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = (wi < w) | EVEN
    t = first_token + hi * w + wi
    pos = tl.load(ids_restore + b.to(tl.int64) * L + t, mask=t_ok, other=0)
    is_visible = pos < len_keep
    vis_row = (b.to(tl.int64) * len_keep + pos) * TOKEN
    tgt_row = (b.to(tl.int64) * (L - len_keep) + (pos - len_keep)) * TOKEN
    if CHANNEL_LAYOUT:
        col = (r[:, None] * PATCH + r[None, :])[None, :, :, None]                        # (1, p, p, 1)
    else:
        col = (r[:, None, None] * (PATCH * C) + r[None, :, None] * C + tl.arange(0, CH)[None, None, :])[None]
    c_ok = ch_ok[None, None, None, :]
    vis_ok = (t_ok & is_visible)[:, None, None, None] & c_ok
    tgt_ok = (t_ok & ~is_visible)[:, None, None, None] & c_ok
    tl.store(visible + vis_row[:, None, None, None] + col, y.to(visible.dtype.element_ty), mask=vis_ok)
    tl.store(target + tgt_row[:, None, None, None] + col, y, mask=tgt_ok)


def _stats_tile(H: int, W: int) -> tuple[int, int]:
    block_w = min(next_pow2(W), 256)
    return max(1, min(next_pow2(H), STATS_TILE // block_w)), block_w


def _tile_partials(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B * C, n_tiles, 3) float32 (count, mean, M2) per tile of every plane (one launch), and n_tiles."""
    B, C, H, W = images.shape
    block_h, block_w = _stats_tile(H, W)
    n_tiles_w = triton.cdiv(W, block_w)
    n_tiles = triton.cdiv(H, block_h) * n_tiles_w
    partial = torch.empty((B * C, n_tiles, 3), dtype=torch.float32, device=images.device)
    _tile_stats_kernel[(B * C, n_tiles)](
        images, partial, C, H, W, *images.stride(), 1.0 / pixel_scale(images.dtype), n_tiles_w, n_tiles,
        BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
    )
    return partial, n_tiles


def channel_stats_triton(images: torch.Tensor, eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image per-channel (mean, rstd) of images / pixel_scale: (B, C) float32 each (split-plane tile partials,
    then one merge program per image); eps defaults to `standardize_eps(images.dtype)`."""
    eps = standardize_eps(images.dtype) if eps is None else eps
    B, C = images.shape[:2]
    partial, n_tiles = _tile_partials(images)
    mean = torch.empty((B, C), dtype=torch.float32, device=images.device)
    rstd = torch.empty_like(mean)
    _merge_stats_kernel[(B,)](partial, mean, rstd, C, n_tiles, eps, C_PAD=next_pow2(C),
                              TILES_PAD=next_pow2(n_tiles), num_warps=1)
    return mean, rstd


def block_tokens(patch_size: int, channels: int, tokens_per_row: int, channel_layout: bool) -> int:
    """Tokens per patchify program: pixel blocks of <= 4096 values (C padded to a power of two), at least one
    token."""
    per_token = patch_size * patch_size * (1 if channel_layout else next_pow2(channels))
    return max(1, min(next_pow2(tokens_per_row), 4096 // per_token))


def chunk_images(images: torch.Tensor, chunk_bytes: int | None = None) -> int:
    """Images per (stats, patchify) launch pair: as many as fit in `chunk_bytes` (default `L2_CHUNK_BYTES`; at
    least one)."""
    chunk_bytes = L2_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    per_image = images[0].numel() * images.element_size()
    return max(1, chunk_bytes // max(1, per_image))


def masked_patchify_write(images, mean, rstd, ids_restore, len_keep, patch_size, channel_layout, visible, target,
                           chunk_bytes: int | None = None):
    """Fill visible (B, len_keep, P) (its dtype) and target (B, L - len_keep, P) float32. Without stats: per chunk
    of images, the stats launch then the patchify launch (the chunk's second read comes from L2)."""
    B, C, H, W = images.shape
    p = patch_size
    h, w = H // p, W // p
    L = ids_restore.shape[1]
    block_t = block_tokens(p, C, w, channel_layout)
    eps = standardize_eps(images.dtype)
    has_stats = mean is not None
    step = B if has_stats else chunk_images(images, chunk_bytes)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        chunk = images[b0:b1]
        if has_stats:
            partial, n_tiles = visible, 1  # unused
        else:
            partial, n_tiles = _tile_partials(chunk)
        rows = (b1 - b0) * h * (C if channel_layout else 1)
        _masked_patchify_kernel[(rows, triton.cdiv(w, block_t))](
            chunk, partial, mean[b0:b1] if has_stats else partial, rstd[b0:b1] if has_stats else partial,
            ids_restore[b0:b1], visible[b0:b1], target[b0:b1],
            H, W, *chunk.stride(), L, len_keep, 1.0 / pixel_scale(images.dtype), n_tiles, eps,
            C=C, C_PAD=next_pow2(C), PATCH=p, CHANNEL_LAYOUT=channel_layout, BLOCK_T=block_t,
            HAS_STATS=has_stats, TILES_PAD=next_pow2(n_tiles), EVEN=w % block_t == 0, num_warps=4,
        )


def check_input(images, ids_restore, patch_size) -> None:
    """What the kernel takes: CUDA tensors (CPU ones under the interpreter), the fused dtypes, p a power of two >= 4."""
    why = device_problem(images, ids_restore)
    if why:
        raise UnsupportedInput(why)
    check_fused_patchify_input(images, ids_restore)
    p = patch_size
    if p * p < 16 or p & (p - 1):
        raise UnsupportedInput(f"patch size {p} (the Triton kernel takes powers of two >= 4)")


register_kernel("triton", "cuda", masked_patchify_write, check_input,
                   visible_dtypes=(torch.float32, torch.bfloat16, torch.float16))
