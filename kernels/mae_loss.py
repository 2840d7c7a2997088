"""Fused MAE loss (Triton): MSE + Fourier loss and the gradient wrt pred in one pass over pred and target.

Every token holds C' planes of p x p pixels (C' = C in the standard layout, where plane c is the strided slice
j*C' + c of the token; C' = 1 in the channel layout). Per plane with token weight w (1/(B N), or mask / sum(mask)):
    loss += w ((1-alpha)/P sum (x-y)^2 + alpha/(C' p^2) sum_f | |F x|_f - |F y|_f |)
    grad  = w (2 (1-alpha)/P (x-y) + alpha/(C' p^2) Re(conj(W) S conj(W))),  S = sign(|Fx|-|Fy|) Fx/|Fx|
(S = 0 where |Fx| = 0, as torch's abs), written in pred's dtype at pred's positions. A persistent grid (one
program per resident slot on the GPU) walks the tiles; each program's partial loss goes to a buffer that one torch
sum reduces (deterministic). Backward only scales the stored gradient.

The DFT takes the form the arithmetic favours per patch size (docs/DESIGN.md §2; `separable`):
- p >= 16, `_mae_loss_separable_kernel`: F = W X W with the p-point DFT matrix W (two p x p tables), rows then
  columns, as batched products over a tile of 8 planes (8 p = 128 rows, wgmma's M >= 64): 36 p^3 FLOPs per plane
  forward and backward, against 12 p^4 for the Kronecker form (147 K against 786 K at p = 16).
- p <= 8, `_mae_loss_kernel`: one product with the Kronecker matrix W ⊗ W (p^2 x p^2; tl.dot needs inner
  dimensions >= 16, which the separable products at p = 8 lack), 64-plane tiles, frequency chunks of BLOCK_F.
The Hermitian half-spectrum is not used: Triton tiles are powers of two, so p/2 + 1 columns pad back to p.

Precision (`default_precisions`): on a GPU the spectra |Fx|, |Fy| -- which set the loss and every sign -- come
from tf32 products (the tables rounded to tf32 on the host, so only the data operand is truncated), the gradient's
adjoint products from bf16 operands; all accumulate in float32. bf16 spectra flip the sign of near-tied frequencies
(5% relative L2 error in the Fourier gradient at p = 16 in the interpreter's emulation) and stay optional
("bf16"); "tf32x3" / "ieee" give float32-exact products. Under TRITON_INTERPRET the dots are exact float32, and
"bf16" multiplies bf16-rounded (nearest-even) values in float32, the products a GPU forms.

Registered at import as the "triton" kernel of `mae_fast::mae_loss` and `mae_fast::masked_mae_loss` (reading the
masked rows of the full prediction in place: `row_ids`) and of its backward (`scatter_scaled_triton`), in
mae_fast/ops/mae_loss.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mae_fast.kernels._common import device_problem, interpreting, next_pow2, persistent_programs
from mae_fast.ops.mae_loss import UnsupportedInput, check_fused_loss_input, register_kernel

PATCH_SIZES = (4, 8, 16)  # p^2 must be a power of two >= 16 for tl.dot


@triton.jit
def _round_bf16(a):
    """float32 -> the nearest bfloat16 value (ties to even), kept in float32: the rounding a GPU's conversion does
    (the interpreter's .to(bfloat16) truncates). Finite inputs only."""
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """a @ b with float32 accumulation. "bf16": both operands rounded to bfloat16 (wgmma on sm_90); under the
    interpreter (EMULATE_BF16), whose bfloat16 dot is wrong, the bf16-rounded values are multiplied in float32 --
    bf16 x bf16 products are exact in float32, so only the order of the float32 sums differs from a GPU."""
    if DOT_PRECISION == "bf16":
        if EMULATE_BF16:
            out = tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee")
        else:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _mae_loss_kernel(
    pred, target, token_weight, grad, partial, k_re, k_im, row_ids,
    n_planes, P, CP, uniform_weight, coef_mse, coef_fourier, L, M,
    P2: tl.constexpr, BLOCK_PL: tl.constexpr, BLOCK_F: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr, ADJ_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ROW_MAP: tl.constexpr,
):
    # ROW_MAP: pred is the full prediction (B, L, P) and token t = b M + m of target / grad reads pred row
    # (b, row_ids[t]) -- the gather of the masked tokens folded into the loads.
    # Persistent grid: program pid takes tiles pid, pid + programs, ... and writes one partial loss at the end.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(n_planes, BLOCK_PL)
    j = tl.arange(0, P2)
    total = 0.0
    for tile in range(pid, n_tiles, n_programs):
        plane = tl.cast(tile, tl.int64) * BLOCK_PL + tl.arange(0, BLOCK_PL)
        plane_ok = plane < n_planes
        token = plane // CP
        row = token * P + plane % CP  # int64 per plane; 32-bit offsets within the tile (fewer live registers)
        base = tl.cast(tile, tl.int64) * BLOCK_PL // CP * P
        offs = (row - base).to(tl.int32)[:, None] + (j * CP)[None, :]
        if ROW_MAP:
            pred_row = (token // M) * L + tl.load(row_ids + token, mask=plane_ok, other=0)
            x_at = pred + (pred_row * P + plane % CP)[:, None] + (j * CP)[None, :]
        else:
            x_at = pred + base + offs
        x = tl.load(x_at, mask=plane_ok[:, None], other=0.0).to(tl.float32)
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
            fxr = _mm(x, kr, DOT_PRECISION, EMULATE_BF16)
            fxi = _mm(x, ki, DOT_PRECISION, EMULATE_BF16)
            fyr = _mm(y, kr, DOT_PRECISION, EMULATE_BF16)
            fyi = _mm(y, ki, DOT_PRECISION, EMULATE_BF16)
            mx = tl.sqrt(fxr * fxr + fxi * fxi)
            my = tl.sqrt(fyr * fyr + fyi * fyi)
            d = mx - my
            fourier += tl.sum(tl.abs(d), axis=1)
            sign = (d > 0).to(tl.float32) - (d < 0).to(tl.float32)
            scale = tl.where(mx > 0, sign / tl.where(mx > 0, mx, 1.0), 0.0)
            # d|Fx|/dx through the symmetric table: grad[:, j] += sum_f G[:, f] K[f, j]
            g += coef_fourier * (_mm(fxr * scale, tl.trans(kr), ADJ_PRECISION, EMULATE_BF16)
                                 + _mm(fxi * scale, tl.trans(ki), ADJ_PRECISION, EMULATE_BF16))
        tl.store(grad + base + offs, (w[:, None] * g).to(grad.dtype.element_ty), mask=plane_ok[:, None])
        total += tl.sum(w * (coef_mse * mse + coef_fourier * fourier), axis=0)
    tl.store(partial + pid, total)


@triton.jit
def _plane_transpose(t, Z: tl.constexpr, PATCH: tl.constexpr):
    """(Z p, p) rows (plane, i), columns j -> rows (plane, j), columns i."""
    return tl.reshape(tl.permute(tl.reshape(t, (Z, PATCH, PATCH)), (0, 2, 1)), (Z * PATCH, PATCH))


@triton.jit
def _mae_loss_separable_kernel(
    pred, target, token_weight, grad, partial, w_re, w_im, row_ids,
    n_tokens, P, uniform_weight, coef_mse, coef_fourier, L, M,
    CP: tl.constexpr, CP_PAD: tl.constexpr, PATCH: tl.constexpr, BLOCK_TOK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr, ADJ_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ROW_MAP: tl.constexpr,
):
    """BLOCK_TOK tokens x CP_PAD planes (Z planes, Z p >= 64 rows: wgmma's M) per program. With W the symmetric
    p-point DFT matrix, per plane X: F = W X W, as two batched products over the tile, rows then columns:
        Y = X W (rows (plane, r), columns v);  F^T = Y^T W (rows (plane, v), columns u), complex
    and the gradient of sum |F| through the adjoint, S = sign(|Fx| - |Fy|) F / |Fx|:
        grad X = Re(conj(W) S conj(W)):  T^T = S^T conj(W);  grad = Re(T conj(W)) = T_re W_re + T_im W_im."""
    Z: tl.constexpr = BLOCK_TOK * CP_PAD
    # persistent grid: the two p x p tables are loaded once per program, which then takes tiles pid, pid + programs..
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(n_tokens, BLOCK_TOK)
    r = tl.arange(0, PATCH)
    c = tl.arange(0, CP_PAD)
    # token element (r, q, c) at (r p + q) CP + c: tile (tok, r, q, c), then planes (tok, c, r, q)
    inner = ((r[:, None] * PATCH + r[None, :]) * CP)[None, :, :, None] + c[None, None, None, :]
    kr = tl.load(w_re + r[:, None] * PATCH + r[None, :])  # (p, p), symmetric
    ki = tl.load(w_im + r[:, None] * PATCH + r[None, :])
    total = 0.0
    for tile in range(pid, n_tiles, n_programs):
        tok = tile * BLOCK_TOK + tl.arange(0, BLOCK_TOK)
        tok_ok = tok < n_tokens
        offs = (tok.to(tl.int64) * P)[:, None, None, None] + inner
        ok = tok_ok[:, None, None, None] & (c < CP)[None, None, None, :]
        if ROW_MAP:  # as in _mae_loss_kernel: pred rows (b, row_ids[t]) of the full prediction
            pred_row = (tok // M).to(tl.int64) * L + tl.load(row_ids + tok, mask=tok_ok, other=0)
            x = tl.load(pred + (pred_row * P)[:, None, None, None] + inner, mask=ok, other=0.0).to(tl.float32)
        else:
            x = tl.load(pred + offs, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(target + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(token_weight + tok, mask=tok_ok, other=0.0)
        else:
            w = tl.where(tok_ok, uniform_weight, 0.0)
        diff = x - y
        mse = tl.sum(tl.sum(tl.sum(diff * diff, axis=3), axis=2), axis=1)  # (BLOCK_TOK,)
        xm = tl.reshape(tl.permute(x, (0, 3, 1, 2)), (Z * PATCH, PATCH))
        ym = tl.reshape(tl.permute(y, (0, 3, 1, 2)), (Z * PATCH, PATCH))
        # rows: Y = X W (real x complex), then per-plane transpose
        yxr = _plane_transpose(_mm(xm, kr, DOT_PRECISION, EMULATE_BF16), Z, PATCH)
        yxi = _plane_transpose(_mm(xm, ki, DOT_PRECISION, EMULATE_BF16), Z, PATCH)
        yyr = _plane_transpose(_mm(ym, kr, DOT_PRECISION, EMULATE_BF16), Z, PATCH)
        yyi = _plane_transpose(_mm(ym, ki, DOT_PRECISION, EMULATE_BF16), Z, PATCH)
        # columns: F^T = Y^T W (complex x complex)
        fxr = _mm(yxr, kr, DOT_PRECISION, EMULATE_BF16) - _mm(yxi, ki, DOT_PRECISION, EMULATE_BF16)
        fxi = _mm(yxr, ki, DOT_PRECISION, EMULATE_BF16) + _mm(yxi, kr, DOT_PRECISION, EMULATE_BF16)
        fyr = _mm(yyr, kr, DOT_PRECISION, EMULATE_BF16) - _mm(yyi, ki, DOT_PRECISION, EMULATE_BF16)
        fyi = _mm(yyr, ki, DOT_PRECISION, EMULATE_BF16) + _mm(yyi, kr, DOT_PRECISION, EMULATE_BF16)
        mx = tl.sqrt(fxr * fxr + fxi * fxi)
        my = tl.sqrt(fyr * fyr + fyi * fyi)
        d = mx - my
        sign = (d > 0).to(tl.float32) - (d < 0).to(tl.float32)
        scale = tl.where(mx > 0, sign / tl.where(mx > 0, mx, 1.0), 0.0)
        sr = fxr * scale
        si = fxi * scale
        # adjoint: T^T = S^T conj(W), then grad = T_re W_re + T_im W_im (rows (plane, r), columns q)
        tr = _plane_transpose(_mm(sr, kr, ADJ_PRECISION, EMULATE_BF16) + _mm(si, ki, ADJ_PRECISION, EMULATE_BF16),
                              Z, PATCH)
        ti = _plane_transpose(_mm(si, kr, ADJ_PRECISION, EMULATE_BF16) - _mm(sr, ki, ADJ_PRECISION, EMULATE_BF16),
                              Z, PATCH)
        g_fourier = _mm(tr, kr, ADJ_PRECISION, EMULATE_BF16) + _mm(ti, ki, ADJ_PRECISION, EMULATE_BF16)
        g_fourier = tl.permute(tl.reshape(g_fourier, (BLOCK_TOK, CP_PAD, PATCH, PATCH)), (0, 2, 3, 1))
        fourier = tl.sum(tl.reshape(tl.abs(d), (BLOCK_TOK, CP_PAD * PATCH * PATCH)), axis=1)
        g = (2.0 * coef_mse) * diff + coef_fourier * g_fourier
        tl.store(grad + offs, (w[:, None, None, None] * g).to(grad.dtype.element_ty), mask=ok)
        total += tl.sum(w * (coef_mse * mse + coef_fourier * fourier), axis=0)
    tl.store(partial + pid, total)

_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
DOT_PRECISIONS = ("bf16", "tf32", "tf32x3", "ieee")


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest tf32 (10 mantissa bits), ties to even."""
    bits = t.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    return ((bits + 0xFFF + lsb) & ~0x1FFF).view(torch.float32)


def _table_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """A DFT table (float32) as the forward dots read it: rounded to tf32 on the host for tf32 products (so that
    only the data operand is truncated); bf16 products round it in the kernel."""
    return round_to_tf32(t) if precision == "tf32" else t


def dft_tables(p: int, device: torch.device, precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """(K_re, K_im) of W ⊗ W, (p^2, p^2): K[r*p+q, u*p+v] = exp(-2 pi i (u r + v q) / p), as `_table_operand`."""
    key = ("kron", p, str(device), precision)
    if key not in _TABLES:
        k = torch.arange(p, dtype=torch.int64)
        phase = (k[:, None] * k[None, :]) % p                       # (r, u) -> r u mod p
        total = (phase[:, None, :, None] + phase[None, :, None, :]) % p  # (r, q, u, v)
        angle = total.reshape(p * p, p * p).double() * (2 * math.pi / p)
        k_re, k_im = torch.cos(angle).float(), (-torch.sin(angle)).float()
        _TABLES[key] = tuple(_table_operand(t, precision).to(device).contiguous() for t in (k_re, k_im))
    return _TABLES[key]


def dft_matrix(p: int, device: torch.device, precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """(W_re, W_im) of the p-point DFT matrix W[r, u] = exp(-2 pi i r u / p), (p, p), symmetric, as
    `_table_operand`: the separable kernel's tables (2 p^2 values)."""
    key = ("row", p, str(device), precision)
    if key not in _TABLES:
        k = torch.arange(p, dtype=torch.int64)
        angle = ((k[:, None] * k[None, :]) % p).double() * (2 * math.pi / p)
        w_re, w_im = torch.cos(angle).float(), (-torch.sin(angle)).float()
        _TABLES[key] = tuple(_table_operand(t, precision).to(device).contiguous() for t in (w_re, w_im))
    return _TABLES[key]


def separable(p: int) -> bool:
    """Which form a patch size takes: the separable row-then-column DFT (36 p^3 FLOPs per plane, forward and
    backward) needs p >= 16 (tl.dot's smallest inner dimension); below, the Kronecker product (12 p^4: 49 K FLOPs
    at p = 8, 96 per byte, under the bf16 roofline's 184) with 64-plane tiles."""
    return p >= 16


def _launch_config(p: int, precision: str = "bf16", planes_per_token: int = 6) -> tuple[int, int, int]:
    """Kronecker (p <= 8): (BLOCK_PL planes, BLOCK_F frequencies, num_warps); separable (p >= 16): (BLOCK_TOK
    tokens, 0, num_warps) with BLOCK_TOK * next_pow2(C') planes = 8 per tile (M = 8 p = 128 rows for wgmma).
    Registers and spills per variant: kernels/compile_check.py (benchmarks/results/sm90_resources.json). Not yet
    timed on a GPU: tune with `mae_loss_forward_triton(..., block_planes=, block_freq=, num_warps=)`."""
    if separable(p):
        return max(1, 8 // next_pow2(planes_per_token)), 0, 8
    if precision == "bf16":
        return 64, min(16, p * p), 8
    return (16 if precision == "ieee" else 32), min(32, p * p), 8


def _loss_programs(device: torch.device, n_tiles: int) -> int:
    """The persistent grid: one program per multiprocessor, as many as fit at once at the default precisions
    (benchmarks/results/sm90_resources*.json: the p = 8 Kronecker tile ~240-255 registers x 256 threads, the
    separable one ~130-170 with the next tile's loads in flight in shared memory -- one resident program each), so
    no tile waits for a second wave, and the separable kernel loads its two DFT tables once per program. Triton
    software-pipelines the tile loop: the next tile's pred and target arrive (cp.async) while this one computes."""
    return persistent_programs(device, n_tiles, 1)


def default_precisions() -> tuple[str, str]:
    """(forward, adjoint) dot precisions. On a GPU: the spectra |Fx|, |Fy| -- which set the loss and the sign of
    every gradient term -- from tf32 products (10-bit mantissas), the adjoint (the gradient's direction, weighted by
    alpha) from bf16 operands, both accumulating in float32 (tolerances: tests/kernels/test_mae_loss.py,
    tests/gpu/test_gpu_ops.py). Under the interpreter exact float32 (its bf16 dots are wrong; "bf16" there
    multiplies bf16-rounded values in float32, the same products a GPU forms)."""
    return ("ieee", "ieee") if interpreting() else ("tf32", "bf16")


def mae_loss_forward_triton(pred, target, token_weight, uniform_weight, patch_size, planes_per_token, alpha, grad,
                            row_ids: torch.Tensor | None = None, *, dot_precision: str | None = None,
                            adjoint_precision: str | None = None,
                            block_planes: int | None = None, block_freq: int | None = None,
                            num_warps: int | None = None, programs: int | None = None):
    """Loss (float32 scalar) and d loss / d pred written into `grad`, in one launch (+ one sum of partials).
    `dot_precision` / `adjoint_precision`: the forward DFT's and the gradient adjoint's products (defaults:
    `default_precisions`; a forward precision alone sets both). `block_planes`: planes per program (Kronecker)
    or tokens per program (separable). `row_ids` (B, N) int64: pred is the full prediction (B, L, P) and token
    (b, n) of target and grad is pred[b, row_ids[b, n]] (the masked tokens' gather folded into the kernel).
    `programs`: the persistent grid's size (default `_loss_programs`)."""
    B, N, P = target.shape
    L = pred.shape[1]
    row_map = row_ids is not None
    if row_map:
        row_ids = row_ids.contiguous()
    p = patch_size
    default_fwd, default_adj = default_precisions()
    adjoint_precision = adjoint_precision or dot_precision or default_adj
    dot_precision = dot_precision or default_fwd
    for name, value in (("dot_precision", dot_precision), ("adjoint_precision", adjoint_precision)):
        if value not in DOT_PRECISIONS:
            raise ValueError(f"{name} must be one of {DOT_PRECISIONS}, got {value!r}")
    emulate = interpreting()
    default_pl, default_f, default_warps = _launch_config(p, adjoint_precision, planes_per_token)
    block_pl, block_f = block_planes or default_pl, block_freq or default_f
    num_warps = num_warps or default_warps
    coefs = (uniform_weight, (1 - alpha) / P, alpha / (planes_per_token * p * p))
    weight = token_weight if token_weight is not None else grad
    ids = row_ids if row_map else grad  # unused without ROW_MAP
    if separable(p):
        w_re, w_im = dft_matrix(p, pred.device, dot_precision)
        grid = (programs or _loss_programs(pred.device, triton.cdiv(B * N, block_pl)),)
        partial = torch.empty(grid[0], dtype=torch.float32, device=pred.device)
        _mae_loss_separable_kernel[grid](
            pred, target, weight, grad, partial, w_re, w_im, ids, B * N, P, *coefs, L, N,
            CP=planes_per_token, CP_PAD=next_pow2(planes_per_token), PATCH=p, BLOCK_TOK=block_pl,
            HAS_WEIGHT=token_weight is not None, DOT_PRECISION=dot_precision, ADJ_PRECISION=adjoint_precision,
            EMULATE_BF16=emulate, ROW_MAP=row_map,
            num_warps=num_warps,
        )
        return partial.sum()
    n_planes = B * N * planes_per_token
    k_re, k_im = dft_tables(p, pred.device, dot_precision)
    grid = (programs or _loss_programs(pred.device, triton.cdiv(n_planes, block_pl)),)
    partial = torch.empty(grid[0], dtype=torch.float32, device=pred.device)
    _mae_loss_kernel[grid](
        pred, target, weight, grad, partial, k_re, k_im, ids, n_planes, P, planes_per_token, *coefs, L, N,
        P2=p * p, BLOCK_PL=block_pl, BLOCK_F=block_f, HAS_WEIGHT=token_weight is not None,
        DOT_PRECISION=dot_precision, ADJ_PRECISION=adjoint_precision, EMULATE_BF16=emulate, ROW_MAP=row_map,
        num_warps=num_warps,
    )
    return partial.sum()


# --------------------------------------------------------------------------------------------------------------
# One op on the decoder's full prediction: gather, scatter and the incoming gradient's scaling folded in
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _scatter_scaled_kernel(grad_masked, grad_loss, ids_restore, grad_full, n_rows, L, K, P,
                           BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """grad_full[b, l] = grad_loss * grad_masked[b, ids_restore[b, l] - K] for masked tokens (shuffled position
    >= K), 0 for visible ones: the backward of the masked tokens' gather with the scaling by d out / d loss, one
    pass (grad_loss read on the device: no host sync)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < n_rows
    col_ok = cols < P
    pos = tl.load(ids_restore + rows, mask=row_ok, other=0)
    masked = pos >= K
    src = (rows // L) * (L - K) + pos - K
    scale = tl.load(grad_loss).to(tl.float32)
    v = tl.load(grad_masked + (src * P)[:, None] + cols[None, :], mask=(row_ok & masked)[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    tl.store(grad_full + (rows.to(tl.int64) * P)[:, None] + cols[None, :],
             (v * scale).to(grad_full.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def scatter_blocks(P: int) -> tuple[int, int]:
    """(BLOCK_R rows, BLOCK_P columns) of a scatter program: 2048 elements, rows of up to 256."""
    block_p = min(next_pow2(P), 256)
    return max(1, 2048 // block_p), block_p


def scatter_scaled_triton(grad_masked: torch.Tensor, grad_loss: torch.Tensor, ids_restore: torch.Tensor,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, P) gradient of the full prediction from the masked tokens' (B, M, P) one, scaled by grad_loss (0-d)."""
    B, M, P = grad_masked.shape
    L = ids_restore.shape[1]
    out = grad_masked.new_empty((B, L, P)) if out is None else out
    block_r, block_p = scatter_blocks(P)
    grid = (triton.cdiv(B * L, block_r), triton.cdiv(P, block_p))
    _scatter_scaled_kernel[grid](grad_masked.contiguous(), grad_loss.contiguous(), ids_restore.contiguous(), out,
                                 B * L, L, L - M, P, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4)
    return out


def check_input(pred, target, mask, patch_size) -> None:
    why = device_problem(pred, target, mask)
    if why:
        raise UnsupportedInput(why)
    check_fused_loss_input(pred, target, mask, patch_size, patch_sizes=PATCH_SIZES)


def check_scatter_input(grad_masked, grad_loss, ids_restore) -> None:
    why = device_problem(grad_masked, grad_loss, ids_restore)
    if why:
        raise UnsupportedInput(why)
    if grad_masked.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedInput(f"a gradient of dtype {grad_masked.dtype}")
    if ids_restore.dtype != torch.int64:
        raise UnsupportedInput(f"ids_restore of dtype {ids_restore.dtype}")


register_kernel("triton", "cuda", mae_loss_forward_triton, check_input, row_map=True, scatter=scatter_scaled_triton,
                scatter_check=check_scatter_input)
