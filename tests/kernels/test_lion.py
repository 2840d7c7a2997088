"""The Lion kernels (C++: csrc/lion.cpp; Triton: kernels/lion.py, one launch per dtype group through a pointer
table) against the reference: bitwise where the kernel rounds op by op as the reference, tensors no kernel takes
updated by the reference, the Triton plan's tables reused across steps."""
from __future__ import annotations

import pytest
import torch

from mae_fast import ops
from tests.kernels.cases import CPP, IMPLS, TRITON, device, gen

SIZES = [1, 17, 4099, 70001, 300_000]  # across the C++ kernel's 65536-element work chunks and Triton's blocks


def _lion_state(p_dtype, g_dtype, m_dtype, seed):
    g = gen(seed)
    params = [torch.randn(n, generator=g).to(p_dtype) for n in SIZES]
    grads = [torch.randn(n, generator=g).to(g_dtype) for n in SIZES]
    moms = [(torch.randn(n, generator=g) * 0.1).to(m_dtype) for n in SIZES]
    # exact zeros of c = b1*m + (1-b1)*g: sign(0) = 0 must leave p*(1-lr*wd)
    grads[2][:50] = 0
    moms[2][:50] = 0
    return params, grads, moms


@pytest.mark.parametrize("impl", [CPP])
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_dtype", [torch.float32, torch.bfloat16])
def test_lion_matches_reference_bitwise(impl, p_dtype, g_dtype, m_dtype):
    """The kernel rounds op by op as the reference (two rounded products, one add, FMA for the momentum), so the
    results are bitwise equal; exact zeros of c keep p * (1 - lr * wd) (sign(0) = 0)."""
    ref = _lion_state(p_dtype, g_dtype, m_dtype, seed=15)
    got = [[t.clone() for t in ts] for ts in ref]
    decayed = ref[0][2][:50].float() * (1 - 1e-3 * 0.05)
    for step, lr in enumerate([1e-3, 3e-4, 1e-4]):  # lr changes between steps: runtime arguments
        ops.lion_update(*ref, lr=lr, beta1=0.9, beta2=0.95, weight_decay=0.05, impl="reference")
        ops.lion_update(*got, lr=lr, beta1=0.9, beta2=0.95, weight_decay=0.05, impl=impl)
        if step == 0:
            torch.testing.assert_close(got[0][2][:50].float(), decayed.to(p_dtype).float(), rtol=0, atol=0)
    for a, b in zip(got[0] + got[2], ref[0] + ref[2]):
        assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} elements differ"


@pytest.mark.parametrize("impl", IMPLS)
def test_lion_mixed_lists_and_non_contiguous_fall_back_per_tensor(impl):
    dev = device(impl)
    g = gen(17)
    p32 = torch.randn(33, generator=g)
    pbf = torch.randn(40, generator=g).bfloat16()
    p_t = torch.randn(8, 6, generator=g).t()  # non-contiguous: reference path for this one
    params = [t.to(dev) for t in (p32, pbf)] + [p_t.to(dev).t().contiguous().t()]
    grads = [torch.randn(p.shape, generator=g).to(p.dtype).to(dev) for p in params]
    moms = [torch.zeros_like(p) for p in params]
    ref = [[t.clone() for t in ts] for ts in (params, grads, moms)]
    ops.lion_update(params, grads, moms, lr=1e-2, weight_decay=0.1, impl=impl)
    ops.lion_update(*ref, lr=1e-2, weight_decay=0.1, impl="reference")
    for a, b in zip(params + moms, ref[0] + ref[2]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", [CPP])
def test_lion_op_rejects_mixed_dtypes_in_one_call(impl):
    with pytest.raises(RuntimeError, match="share the dtypes"):
        torch.ops.mae_fast.lion_update_([torch.randn(3), torch.randn(3).bfloat16()], [torch.randn(3)] * 2,
                                        [torch.randn(3)] * 2, 0.1, 1.0, 0.9, 0.1, 0.95, 0.05)


def _lion_lists(sizes, seed, dtypes=(torch.float32,) * 3, dev="cpu"):
    g = gen(seed)
    params = [torch.randn(n, generator=g).to(dtypes[0]).to(dev) for n in sizes]
    grads = [torch.randn(n, generator=g).to(dtypes[1]).to(dev) for n in sizes]
    moms = [(torch.randn(n, generator=g) * 0.1).to(dtypes[2]).to(dev) for n in sizes]
    return params, grads, moms


@pytest.mark.parametrize("impl", IMPLS)
def test_lion_many_tensors_block_map(impl):
    sizes = [int(s) for s in torch.randint(1, 3000, (37,), generator=gen(31))]
    ref = _lion_lists(sizes, seed=32, dev=device(impl))
    got = [[t.clone() for t in ts] for ts in ref]
    ops.lion_update(*ref, lr=1e-2, weight_decay=0.1, impl="reference")
    ops.lion_update(*got, lr=1e-2, weight_decay=0.1, impl=impl)
    for a, b in zip(got[0] + got[2], ref[0] + ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# Triton: launches per dtype group, the plan's tables reused
# --------------------------------------------------------------------------------------------------------------

def _plans():
    from mae_fast.kernels import lion

    return lion.plans


def _launches(params, grads, moms) -> int:
    """Kernel launches of one step over these lists (the plan of their last step: one per dtype group)."""
    return _plans().get(params, grads, moms).launches_per_step


@pytest.mark.parametrize("impl", [TRITON])
def test_lion_matches_reference_one_launch_per_dtype_group(impl):
    sizes = [1, 17, 0, 4099, 9000, 5]  # across BLOCK (4096), with an empty tensor
    ref = _lion_lists(sizes, seed=30, dev=device(impl))
    ref[1][3][:40] = 0  # c = 0 exactly: sign(0) = 0
    ref[2][3][:40] = 0
    got = [[t.clone() for t in ts] for ts in ref]
    launches = 0
    for lr in (1e-3, 2e-4):  # runtime lr
        ops.lion_update(*ref, lr=lr, weight_decay=0.05, impl="reference")
        ops.lion_update(*got, lr=lr, weight_decay=0.05, impl=impl)
        launches += _launches(*got)
    assert launches == 2  # one dtype group, two steps
    for a, b in zip(got[0] + got[2], ref[0] + ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", [TRITON])
def test_lion_plan_reused_across_steps_and_rebuilt_only_on_new_storage(impl):
    """Tables are built once; a step with the same tensors, or with new gradient tensors at the same addresses,
    reuses them; gradients at new addresses rewrite only the gradient rows; a new dtype rebuilds the plan; a new
    parameter address too (and the results stay right throughout)."""
    plans = _plans()
    sizes = [5000, 3, 2100]
    ref = _lion_lists(sizes, seed=35, dev=device(impl))
    got = [[t.clone() for t in ts] for ts in ref]
    builds, launches = plans.builds, 0

    def step(grads_got, grads_ref, lr):
        nonlocal launches
        ops.lion_update(ref[0], grads_ref, ref[2], lr=lr, weight_decay=0.05, impl="reference")
        ops.lion_update(got[0], grads_got, got[2], lr=lr, weight_decay=0.05, impl=impl)
        launches += plans.plans[tuple(map(id, got[0]))].launches_per_step
        for a, b in zip(got[0] + got[2], ref[0] + ref[2]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    step(got[1], ref[1], 1e-3)
    plan = plans.get(got[0], got[1], got[2])
    step(got[1], ref[1], 3e-3)                       # same tensors, new lr: no rebuild
    assert plans.builds - builds == 1
    fresh = [g.clone() for g in got[1]]              # new tensors at new addresses: gradient rows rewritten
    step(fresh, ref[1], 2e-3)
    assert plans.builds - builds == 1 and plan.grad_moves == 1
    refilled = [torch.empty_like(g) for g in fresh]  # new objects, then moved onto the same storage
    for r, f in zip(refilled, fresh):
        r.set_(f.untyped_storage(), f.storage_offset(), f.shape, f.stride())
    step(refilled, ref[1], 1e-3)                     # same addresses and layouts: nothing to do
    assert plans.builds - builds == 1 and plan.grad_moves == 1
    assert launches == 4
    bf = [g.to(torch.bfloat16) for g in fresh]       # another dtype: a new plan (a new dtype group)
    step(bf, [g.to(torch.bfloat16).float() for g in fresh], 1e-3)
    assert plans.builds - builds == 2
    got[0] = [p.clone() for p in got[0]]             # new parameter storage: rebuilt
    step(bf, [g.to(torch.bfloat16).float() for g in fresh], 1e-3)
    assert plans.builds - builds == 3


@pytest.mark.parametrize("impl", [TRITON])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_lion_optimizer_steps_reuse_tables_with_zero_grad_both_ways(impl, set_to_none):
    from mae_fast.optim import Lion

    plans, dev = _plans(), device(impl)
    g = gen(36)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.GELU(), torch.nn.Linear(30, 5)).to(dev)
    ref = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1, impl=impl)
    opt_ref = Lion(ref, lr=1e-2, weight_decay=0.1, impl="reference")
    builds = plans.builds
    for _ in range(3):
        x = torch.randn(7, 40, generator=g).to(dev)
        opt.zero_grad(set_to_none=set_to_none)
        opt_ref.zero_grad(set_to_none=set_to_none)
        model(x).square().sum().backward()
        for p, r in zip(model.parameters(), ref):
            r.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    if not set_to_none:
        assert plans.builds - builds == 1
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", [TRITON])
def test_lion_mixed_dtypes_launch_per_group(impl):
    dev = device(impl)
    a = _lion_lists([100, 5000], seed=33, dev=dev)
    b = _lion_lists([300], seed=34, dtypes=(torch.float32, torch.float32, torch.bfloat16), dev=dev)
    params, grads, moms = (x + y for x, y in zip(a, b))
    ref = [[t.clone() for t in ts] for ts in (params, grads, moms)]
    ops.lion_update(params, grads, moms, lr=1e-3, impl=impl)
    ops.lion_update(*ref, lr=1e-3, impl="reference")
    assert _launches(params, grads, moms) == 2
    for x, y in zip(params + moms, ref[0] + ref[2]):
        # bfloat16 momentum: the interpreter truncates instead of rounding, at most one bf16 ulp apart
        torch.testing.assert_close(x.float(), y.float(), rtol=8e-3, atol=1e-7)
