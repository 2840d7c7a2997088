"""Multi-tensor Lion (Triton): one launch per (param, grad, exp_avg) dtype combination, prepared once.

Why a pointer table and not a flat parameter buffer: the model's parameters, their gradients and the optimiser
state stay ordinary separate tensors (no re-allocation of the model into one buffer, no change to checkpoints,
gradient hooks or DDP buckets), and one launch still covers them all.

A `LionPlan` is built once per list of parameters and reused by every step: the dtype groups, per group a device
table of (param, grad, exp_avg) addresses, numels and first blocks, and a block -> tensor map (int32, one entry per
BLOCK elements), so that program i reads its tensor index with one load (no search) and its addresses with a second
round of independent loads. A step checks only what can change: the gradient objects (identity; after
`zero_grad(set_to_none=True)` new gradients usually reuse the freed addresses, compared with one data_ptr each)
and the parameter / state addresses. New gradient addresses with the same layouts rewrite only the tables'
gradient rows (a few KB copied); anything else that changed (a parameter or state address, a shape or a dtype)
rebuilds the plan.
The hyperparameters live in a small device tensor (lr, 1 - lr*wd, b1, 1 - b1, b2, 1 - b2) written from a pinned
host buffer by an asynchronous copy (queued only when a value changed), so that a planned step has no host
synchronisation and no host-to-device copy of the tables, and can be captured in a CUDA graph: the kernels read the
hyperparameters from the device tensor, so to change lr between replays call `LionPlan.write_scalars` (eagerly,
outside the graph) before `replay()` (tests/gpu/test_gpu_ops.py::test_lion_step_captured_in_a_cuda_graph).

Arithmetic and rounding as the reference, op by op, in float32:
    c = m*b1 + g*(1-b1)  (two rounded products, one add: no FMA contraction, `enable_fp_fusion=False`)
    p = fma(sign(c), -lr, p*(1-lr*wd));  m = fma(g, 1-b2, m*b2)  (torch's add with alpha is one FMA)
with sign(NaN) = sign(0) = 0 as torch.sign, stored back in each tensor's dtype (round to nearest even).
Registered as the "triton" kernel of `mae_fast::lion_update` (mae_fast/ops/lion.py) at import.
"""
from __future__ import annotations

import operator
import weakref

import torch
import triton
import triton.language as tl

from mae_fast.kernels._common import device_problem
from mae_fast.ops.lion import LionScalars, UnsupportedInput, lion_groups, lion_update_rest, register_kernel

BLOCK = 2048
NUM_WARPS = 8
_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


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
    table, block_tensor, scalars, n_tensors,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    # table rows (int64, each n_tensors long): param ptr, grad ptr, exp_avg ptr, numel, first block
    blk = tl.program_id(0)
    t = tl.load(block_tensor + blk).to(tl.int64)
    p_ptr = tl.load(table + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table + n_tensors + t).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(table + 2 * n_tensors + t).to(tl.pointer_type(M_DTYPE))
    if ALIGNED:  # every address 16-byte aligned (checked on the host)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
    numel = tl.load(table + 3 * n_tensors + t)
    start = (blk - tl.load(table + 4 * n_tensors + t)) * BLOCK
    lr = tl.load(scalars)
    decay = tl.load(scalars + 1)
    beta1 = tl.load(scalars + 2)
    one_minus_beta1 = tl.load(scalars + 3)
    beta2 = tl.load(scalars + 4)
    one_minus_beta2 = tl.load(scalars + 5)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _lion_block(p_ptr, g_ptr, m_ptr, offs, offs < numel, lr, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, MASKED=False)
    else:
        _lion_block(p_ptr, g_ptr, m_ptr, offs, offs < numel, lr, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, MASKED=True)


class _Group:
    """The device tables of one dtype group: tensors `index` of the plan's lists."""

    def __init__(self, index: list[int], ps, gs, ms):
        self.index = index
        self.dtypes = (_TORCH_TO_TL[ps[0].dtype], _TORCH_TO_TL[gs[0].dtype], _TORCH_TO_TL[ms[0].dtype])
        numels = [p.numel() for p in ps]
        first = [0]
        for n in numels:
            first.append(first[-1] + triton.cdiv(n, BLOCK))
        self.n_blocks = first[-1]
        device = ps[0].device
        pinned = device.type == "cuda"
        rows = [[p.data_ptr() for p in ps], [g.data_ptr() for g in gs], [m.data_ptr() for m in ms], numels,
                first[:-1]]
        host = torch.tensor([v for row in rows for v in row], dtype=torch.int64, pin_memory=pinned)
        blocks = torch.repeat_interleave(torch.arange(len(ps), dtype=torch.int32),
                                         torch.tensor([b - a for a, b in zip(first, first[1:])]))
        self.table = host.to(device, non_blocking=True)
        self.host_grads = torch.empty(len(ps), dtype=torch.int64, pin_memory=pinned)
        self.block_tensor = (blocks.pin_memory() if pinned else blocks).to(device, non_blocking=True)
        self.aligned = all(t.data_ptr() % 16 == 0 for ts in (ps, gs, ms) for t in ts)


class LionPlan:
    """Groups, pointer tables and block maps of one list of (param, grad, exp_avg) tensors, built once.

    `matches(params, grads, exp_avgs)` says whether the tables still describe these tensors (cheap: identities,
    then addresses); `launch()` runs one kernel per dtype group (the tensors no kernel takes are in `rest`)."""

    def __init__(self, params, grads, exp_avgs):
        params, grads, exp_avgs = list(params), list(grads), list(exp_avgs)
        self.device = params[0].device
        # weak references: a plan must not keep freed gradients (or a deleted model) alive; identity is only the
        # fast path of `matches`, the tables depend on addresses and layouts alone
        self.refs = [list(map(weakref.ref, ts)) for ts in (params, grads, exp_avgs)]
        self.addresses = [tuple(map(_ADDRESS, ts)) for ts in (params, grads, exp_avgs)]
        self.layouts = [_layouts(ts) for ts in (params, grads, exp_avgs)]
        groups, self.rest = lion_groups(params, grads, exp_avgs)
        self.groups = []
        position = {id(p): i for i, p in enumerate(params)}
        for ps, gs, ms in groups.values():
            self.groups.append(_Group([position[id(p)] for p in ps], ps, gs, ms))
        pinned = self.device.type == "cuda"
        self.host_scalars = torch.zeros(6, dtype=torch.float32, pin_memory=pinned)
        self.scalars = torch.zeros(6, dtype=torch.float32, device=self.device)
        self._written: tuple | None = None
        self._copied = torch.cuda.Event() if pinned else None
        self.grad_moves = 0  # gradient rows rewritten (new gradient addresses, tables otherwise kept)

    def matches(self, params, grads, exp_avgs) -> bool:
        """Whether the tables still describe these tensors: the same objects (fast path), or else tensors at the
        same addresses with the same dtypes, shapes and contiguity (e.g. gradients re-allocated by
        zero_grad(set_to_none=True) into the blocks the allocator just freed)."""
        for i, ts in enumerate((params, grads, exp_avgs)):
            if len(ts) != len(self.refs[i]):
                return False
            if all(map(operator.is_, map(_DEREF, self.refs[i]), ts)):
                continue
            addresses = tuple(map(_ADDRESS, ts))
            if _layouts(ts) != self.layouts[i]:
                return False
            if addresses != self.addresses[i]:
                if i != 1:
                    return False
                self._move_grads(addresses)
            self.refs[i] = list(map(weakref.ref, ts))
        return True

    def _move_grads(self, addresses: tuple) -> None:
        """New gradient addresses, same layouts (zero_grad(set_to_none=True) when the allocator hands out other
        blocks): rewrite only the gradient row of each table, by an asynchronous copy from pinned memory."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous copies from the pinned buffers have run
        for g in self.groups:
            n = len(g.index)
            g.host_grads.copy_(torch.tensor([addresses[i] for i in g.index], dtype=torch.int64))
            g.table[n:2 * n].copy_(g.host_grads, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.addresses[1] = addresses
        self.grad_moves += 1

    def write_scalars(self, s: LionScalars) -> None:
        """Queue the copy of the step's hyperparameters to the device (skipped when unchanged)."""
        values = (s.lr, s.decay, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2)
        if values == self._written:
            return
        capturing = self._copied is not None and torch.cuda.is_current_stream_capturing()
        if self._copied is not None and not capturing:
            self._copied.synchronize()  # the previous copy has read the pinned buffer (long done in practice)
        self.host_scalars.copy_(torch.tensor(values, dtype=torch.float32))
        self.scalars.copy_(self.host_scalars, non_blocking=True)
        if self._copied is not None and not capturing:
            self._copied.record()
        self._written = values

    @property
    def launches_per_step(self) -> int:
        """Kernel launches of one step (one per non-empty dtype group; benchmarks report it)."""
        return sum(1 for g in self.groups if g.n_blocks)

    def launch(self) -> None:
        for g in self.groups:
            if g.n_blocks == 0:
                continue
            p_dtype, g_dtype, m_dtype = g.dtypes
            _lion_kernel[(g.n_blocks,)](
                g.table, g.block_tensor, self.scalars, len(g.index),
                P_DTYPE=p_dtype, G_DTYPE=g_dtype, M_DTYPE=m_dtype, BLOCK=BLOCK, ALIGNED=g.aligned,
                num_warps=NUM_WARPS, enable_fp_fusion=False,
            )


_ADDRESS = torch.Tensor.data_ptr
_DEREF = weakref.ref.__call__


def _layouts(ts) -> tuple:
    """Dtypes, shapes and contiguity of a list of tensors (C-level maps: ~0.1 us per tensor)."""
    return (tuple(map(operator.attrgetter("dtype", "shape"), ts)), tuple(map(torch.Tensor.is_contiguous, ts)))


class _PlanCache:
    """Plans by the identities of the parameter tensors (a few, for callers that alternate lists)."""

    def __init__(self, size: int = 8):
        self.size = size
        self.plans: dict[tuple, LionPlan] = {}
        self.builds = 0  # tables built so far (tests and benchmarks check that steps reuse them)

    def get(self, params, grads, exp_avgs) -> LionPlan:
        key = tuple(map(id, params))
        plan = self.plans.get(key)
        if plan is not None and plan.matches(params, grads, exp_avgs):
            return plan
        plan = LionPlan(params, grads, exp_avgs)
        self.builds += 1
        self.plans.pop(key, None)
        if len(self.plans) >= self.size:
            self.plans.pop(next(iter(self.plans)))
        self.plans[key] = plan
        return plan


plans = _PlanCache()


def _run(params, grads, exp_avgs, s) -> LionPlan:
    """The fused launches of one step (the tensors in the plan's `rest` are the caller's)."""
    plan = plans.get(params, grads, exp_avgs)
    plan.write_scalars(s)
    plan.launch()
    return plan


@torch.no_grad()
def lion_update_triton(params, grads, exp_avgs, lr, beta1, beta2, weight_decay) -> None:
    s = LionScalars.make(lr, beta1, beta2, weight_decay)
    rest = _run(params, grads, exp_avgs, s).rest
    lion_update_rest(rest, params, grads, exp_avgs, lr, beta1, beta2, weight_decay)


def check_input(param) -> None:
    why = device_problem(param)
    if why:
        raise UnsupportedInput(why)


register_kernel("triton", "cuda", lion_update_triton, check_input)
