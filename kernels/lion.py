"""Multi-tensor Lion (Triton): one launch per (param, grad, exp_avg) dtype combination.

Why a pointer table and not a flat parameter buffer: the model's parameters, their gradients and the optimiser
state stay ordinary separate tensors (no re-allocation of the model into one buffer, no change to checkpoints,
gradient hooks or DDP buckets), and one launch still covers them all. The table holds, per tensor, the addresses
of (param, grad, exp_avg) and the cumulative count of BLOCK-sized blocks; program i finds its tensor by a binary
search over that count (log2(#tensors) scalar loads, cached) and updates one block. The table is rebuilt only
when an address changes (cached by the tuple of addresses), and is copied to the device from pinned memory
without a synchronisation.

Hyperparameters are runtime float32 arguments (no recompilation when lr changes; no autotuning, which would
rerun an in-place update). Arithmetic and rounding as the reference, op by op, in float32:
    c = m*b1 + g*(1-b1)  (two rounded products, one add: no FMA contraction, `enable_fp_fusion=False`)
    p = fma(sign(c), -lr, p*(1-lr*wd));  m = fma(g, 1-b2, m*b2)  (torch's add with alpha is one FMA)
with sign(NaN) = sign(0) = 0 as torch.sign, stored back in each tensor's dtype (round to nearest even).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast import ops
from mae_fast.kernels._common import check_device

BLOCK = 2048
NUM_WARPS = 8
_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}

launches = 0  # kernel launches so far (benchmarks report launches per optimiser step)


@triton.jit
def _lion_block(p_ptr, g_ptr, m_ptr, offs, ok, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                MASKED: tl.constexpr):
    if MASKED:
        p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:  # a full block: unmasked, so that aligned tensors get 16-byte accesses
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs).to(tl.float32)
    c = m * beta1 + g * one_minus_beta1
    sign = (c > 0).to(tl.float32) - (c < 0).to(tl.float32)
    p = tl.fma(sign, -lr, p * decay)
    m = tl.fma(g, one_minus_beta2, m * beta2)
    if MASKED:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=ok)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty))
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty))


@triton.jit
def _lion_kernel(
    table, n_tensors, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
    LOG2_TENSORS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    # table rows (int64, each n_tensors long): param ptr, grad ptr, exp_avg ptr, numel, first block (+1 sentinel)
    blk = tl.program_id(0).to(tl.int64)
    first = table + 4 * n_tensors
    lo = blk * 0  # int64 scalar
    hi = lo + n_tensors
    for _ in tl.static_range(LOG2_TENSORS):  # largest t with first[t] <= blk
        mid = (lo + hi) // 2
        go_right = tl.load(first + mid) <= blk
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    t = lo
    p_ptr = tl.load(table + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table + n_tensors + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(table + 2 * n_tensors + t).to(tl.pointer_type(M_DTYPE))
    if ALIGNED:  # every address 16-byte aligned (checked on the host)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
    numel = tl.load(table + 3 * n_tensors + t)
    start = (blk - tl.load(first + t)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _lion_block(p_ptr, g_ptr, m_ptr, offs, offs < numel, lr, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, MASKED=False)
    else:
        _lion_block(p_ptr, g_ptr, m_ptr, offs, offs < numel, lr, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, MASKED=True)


class _TableCache:
    """Device pointer tables by tensor addresses (a step with the same tensors reuses its table)."""

    def __init__(self, size: int = 16):
        self.size = size
        self.tables: dict[tuple, tuple[torch.Tensor, int]] = {}

    def get(self, ps, gs, ms) -> tuple[torch.Tensor, int]:
        key = tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), p.numel()) for p, g, m in zip(ps, gs, ms))
        key = (ps[0].device, *key)
        if key in self.tables:
            return self.tables[key]
        numels = [p.numel() for p in ps]
        blocks = [triton.cdiv(n, BLOCK) for n in numels]
        first = [0]
        for nb in blocks:
            first.append(first[-1] + nb)
        rows = [[p.data_ptr() for p in ps], [g.data_ptr() for g in gs], [m.data_ptr() for m in ms], numels, first]
        flat = [v for row in rows for v in row]
        device = ps[0].device
        host = torch.tensor(flat, dtype=torch.int64, pin_memory=device.type == "cuda")
        table = host.to(device, non_blocking=True)
        if len(self.tables) >= self.size:
            self.tables.pop(next(iter(self.tables)))
        self.tables[key] = (table, first[-1])
        return self.tables[key]


_tables = _TableCache()


def _aligned(*lists) -> bool:
    return all(t.data_ptr() % 16 == 0 for ts in lists for t in ts)


@torch.library.custom_op("mae_fast::lion_update_triton", mutates_args=("params", "exp_avgs"), schema=(
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, float lr, float decay, float beta1, "
    "float one_minus_beta1, float beta2, float one_minus_beta2) -> ()"))
def _lion_update_op(params, grads, exp_avgs, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2) -> None:
    """The launch as a torch op that mutates params and exp_avgs (opaque to torch.compile, which cannot trace the
    pointer table's addresses)."""
    global launches
    table, n_blocks = _tables.get(params, grads, exp_avgs)
    if n_blocks == 0:
        return
    n = len(params)
    _lion_kernel[(n_blocks,)](
        table, n, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
        P_DTYPE=_TORCH_TO_TL[params[0].dtype], G_DTYPE=_TORCH_TO_TL[grads[0].dtype],
        M_DTYPE=_TORCH_TO_TL[exp_avgs[0].dtype], LOG2_TENSORS=max(1, (n - 1).bit_length() + 1), BLOCK=BLOCK,
        ALIGNED=_aligned(params, grads, exp_avgs),
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    launches += 1


@_lion_update_op.register_fake
def _(params, grads, exp_avgs, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2) -> None:
    return None


def lion_group_triton(ps, gs, ms, s: ops.LionScalars) -> None:
    """One launch over tensors that share one (param, grad, exp_avg) dtype combination."""
    _lion_update_op(ps, gs, ms, s.lr, s.decay, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2)


@torch.no_grad()
def lion_update_triton(params, grads, exp_avgs, lr, beta1, beta2, weight_decay) -> None:
    check_device(params[0])
    s = ops.LionScalars.make(lr, beta1, beta2, weight_decay)
    groups, rest = ops.lion_groups(params, grads, exp_avgs)
    for ps, gs, ms in groups.values():
        lion_group_triton(ps, gs, ms, s)
    ops.lion_update_rest(rest, params, grads, exp_avgs, lr, beta1, beta2, weight_decay)
