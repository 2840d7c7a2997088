"""Fused MAE loss (Triton): MSE + Fourier loss and the gradient wrt pred in one pass over pred and target.

Every token holds C' planes of p x p pixels (C' = C in the standard layout, where plane c is the strided slice
j*C' + c of the token; C' = 1 in the channel layout). A program takes BLOCK_PL planes as a (BLOCK_PL, p^2) tile and
forms their 2-D DFTs as one small matrix product with the Kronecker DFT matrix (docs/DESIGN.md §2):
    vec(F x) = vec(x) (W ⊗ W),   W ⊗ W = K_re + i K_im   (p^2 x p^2, symmetric; 64 x 64 for p = 8)
in frequency chunks of BLOCK_F columns. Per plane with token weight w (1/(B N), or mask / sum(mask)):
    loss += w ((1-alpha)/P sum (x-y)^2 + alpha/(C' p^2) sum_f | |F x|_f - |F y|_f |)
    grad  = w (2 (1-alpha)/P (x-y) + alpha/(C' p^2) (G_re K_re + G_im K_im)),  G = sign(|Fx|-|Fy|) Fx/|Fx|
(G = 0 where |Fx| = 0, as torch's abs), written in pred's dtype at pred's positions; per-program partial losses
go to a buffer that one torch sum reduces (deterministic). Backward only scales the stored gradient.

Precision: the dots run in `dot_precision` ("tf32" by default on a GPU, which truncates float32 operands to
10-bit mantissas; "tf32x3" or "ieee" for float32-exact products); the DFT tables are rounded to tf32 on the host
when tf32 is used, so that only the data operand is truncated. Under TRITON_INTERPRET the dots are exact float32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mae_fast import ops
from mae_fast.kernels._common import check_device, interpreting

PATCH_SIZES = (4, 8, 16)  # p^2 must be a power of two >= 16 for tl.dot


@triton.jit
def _mae_loss_kernel(
    pred, target, token_weight, grad, partial, k_re, k_im,
    n_planes, P, CP, uniform_weight, coef_mse, coef_fourier,
    P2: tl.constexpr, BLOCK_PL: tl.constexpr, BLOCK_F: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    plane = pid.to(tl.int64) * BLOCK_PL + tl.arange(0, BLOCK_PL)
    plane_ok = plane < n_planes
    token = plane // CP
    j = tl.arange(0, P2)
    row = token * P + plane % CP  # int64 per plane; 32-bit offsets within the tile (fewer live registers)
    offs = (row - pid.to(tl.int64) * BLOCK_PL // CP * P).to(tl.int32)[:, None] + (j * CP)[None, :]
    base = pid.to(tl.int64) * BLOCK_PL // CP * P
    x = tl.load(pred + base + offs, mask=plane_ok[:, None], other=0.0).to(tl.float32)
    y = tl.load(target + base + offs, mask=plane_ok[:, None], other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(token_weight + token, mask=plane_ok, other=0.0)
    else:
        w = tl.where(plane_ok, uniform_weight, 0.0)
    diff = x - y
    mse = tl.sum(diff * diff, axis=1)
    g = (2.0 * coef_mse) * diff
    fourier = tl.zeros((BLOCK_PL,), dtype=tl.float32)
    for f0 in range(0, P2, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        kr = tl.load(k_re + j[:, None] * P2 + f[None, :])  # (P2, BLOCK_F)
        ki = tl.load(k_im + j[:, None] * P2 + f[None, :])
        fxr = tl.dot(x, kr, input_precision=DOT_PRECISION)
        fxi = tl.dot(x, ki, input_precision=DOT_PRECISION)
        fyr = tl.dot(y, kr, input_precision=DOT_PRECISION)
        fyi = tl.dot(y, ki, input_precision=DOT_PRECISION)
        mx = tl.sqrt(fxr * fxr + fxi * fxi)
        my = tl.sqrt(fyr * fyr + fyi * fyi)
        d = mx - my
        fourier += tl.sum(tl.abs(d), axis=1)
        sign = (d > 0).to(tl.float32) - (d < 0).to(tl.float32)
        scale = tl.where(mx > 0, sign / tl.where(mx > 0, mx, 1.0), 0.0)
        # d|Fx|/dx through the symmetric table: grad[:, j] += sum_f G[:, f] K[f, j]
        g += coef_fourier * (tl.dot(fxr * scale, tl.trans(kr), input_precision=DOT_PRECISION)
                             + tl.dot(fxi * scale, tl.trans(ki), input_precision=DOT_PRECISION))
    tl.store(grad + base + offs, (w[:, None] * g).to(grad.dtype.element_ty), mask=plane_ok[:, None])
    tl.store(partial + pid, tl.sum(w * (coef_mse * mse + coef_fourier * fourier), axis=0))


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest tf32 (10 mantissa bits), ties to even."""
    bits = t.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    return ((bits + 0xFFF + lsb) & ~0x1FFF).view(torch.float32)


def dft_tables(p: int, device: torch.device, tf32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(K_re, K_im) of W ⊗ W, float32 (p^2, p^2): K[r*p+q, u*p+v] = exp(-2 pi i (u r + v q) / p)."""
    key = (p, str(device), tf32)
    if key not in _TABLES:
        k = torch.arange(p, dtype=torch.int64)
        phase = (k[:, None] * k[None, :]) % p                       # (r, u) -> r u mod p
        total = (phase[:, None, :, None] + phase[None, :, None, :]) % p  # (r, q, u, v)
        angle = total.reshape(p * p, p * p).double() * (2 * math.pi / p)
        k_re, k_im = torch.cos(angle).float(), (-torch.sin(angle)).float()
        if tf32:
            k_re, k_im = round_to_tf32(k_re), round_to_tf32(k_im)
        _TABLES[key] = (k_re.to(device).contiguous(), k_im.to(device).contiguous())
    return _TABLES[key]


def _launch_config(p: int, precision: str = "tf32") -> tuple[int, int, int]:
    """(BLOCK_PL, BLOCK_F, num_warps). Compiled for sm_90 (kernels/compile_check.py, Triton 3.8): p = 8 with 32
    planes and 32-wide frequency chunks on 8 warps takes 174 registers and no spills with tf32 (64-wide chunks or 64
    planes spill); exact float32 ("ieee") products need 16 planes (76 registers; 32 planes spill 405 bytes).
    p = 16 with 16 planes, 32-wide chunks, 8 warps takes 195 registers for float32 predictions and 227 for bfloat16
    ones (they spilled with 64-bit element offsets per tile element: the offsets are now 32-bit from a per-program
    base). Not yet timed on a GPU: tune with `mae_loss_forward_triton(..., block_planes=, block_freq=,
    num_warps=)`."""
    if p <= 8:
        return (16 if precision == "ieee" else 32), min(32, p * p), 8
    return 16, 32, 8


def mae_loss_forward_triton(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad,
                            *, dot_precision: str | None = None, block_planes: int | None = None,
                            block_freq: int | None = None, num_warps: int | None = None):
    """Loss (float32 scalar) and d loss / d pred written into `grad`, in one launch (+ one sum of partials)."""
    B, N, P = pred.shape
    p = patch_size
    if dot_precision is None:
        dot_precision = "ieee" if interpreting() else "tf32"
    n_planes = B * N * planes_per_token
    default_pl, default_f, default_warps = _launch_config(p, dot_precision)
    block_pl, block_f = block_planes or default_pl, block_freq or default_f
    num_warps = num_warps or default_warps
    k_re, k_im = dft_tables(p, pred.device, tf32=dot_precision == "tf32")
    grid = (triton.cdiv(n_planes, block_pl),)
    partial = torch.empty(grid[0], dtype=torch.float32, device=pred.device)
    _mae_loss_kernel[grid](
        pred, target, token_weight if token_weight is not None else partial, grad, partial, k_re, k_im,
        n_planes, P, planes_per_token, uniform_weight, (1 - alpha) / P, alpha / (planes_per_token * p * p),
        P2=p * p, BLOCK_PL=block_pl, BLOCK_F=block_f, HAS_WEIGHT=token_weight is not None,
        DOT_PRECISION=dot_precision, num_warps=num_warps,
    )
    return partial.sum()


# `mae_fast::mae_loss_triton`: one opaque node with a fake and an autograd formula under torch.compile
_mae_loss_op = ops.define_mae_loss_op("triton", mae_loss_forward_triton)


def mae_loss_triton(pred, target, mask, patch_size, layout, alpha):
    check_device(pred, target, mask)
    ops.check_fused_loss_input(pred, target, mask, patch_size, layout, alpha, patch_sizes=PATCH_SIZES)
    return ops.fused_mae_loss(_mae_loss_op, pred, target, mask, patch_size, alpha)
