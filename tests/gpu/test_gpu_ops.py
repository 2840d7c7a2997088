"""The Triton kernels on a GPU against the reference ops, at ViT-L/8 MAE per-image sizes (batch 8), float32 and
bfloat16, with per-(op, dtype) tolerance tables. Skipped without CUDA; run on a lent GPU:

    python -m pytest -q tests/gpu -m gpu

Fresh random inputs (never zeros), odd shapes where the op allows (batch 3, 5 channels), outputs poisoned with NaN
before each call and checked fully written, forward and backward. Tolerances are relative to the largest magnitude
of the reference (`atol`) plus a relative part (`rtol`).
"""
from __future__ import annotations

import pytest
import torch

from mae_fast import ops
from mae_fast.ops.lion import LionScalars
from tests.helpers import assert_loss_grad_close, unshuffle_expected

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

if torch.cuda.is_available():
    from mae_fast.kernels import lion, mae_loss, masked_patchify, unshuffle

DEV = torch.device("cuda")

# (op, dtype of the compared tensor) -> (rtol, atol as a fraction of max |reference|)
TOL = {
    ("masked_patchify", torch.float32): (1e-5, 1e-6),
    ("masked_patchify", torch.bfloat16): (2**-8, 1e-6),  # one rounding to bf16 (half an ulp) of the float32 value
    ("unshuffle", torch.float32): (0.0, 0.0),          # a gather + one add, rounded once: bitwise
    ("unshuffle", torch.bfloat16): (0.0, 0.0),
    ("unshuffle_token_grad", torch.float32): (1e-5, 1e-6),  # float32 sums (vs float64) in another order
    ("unshuffle_token_grad", torch.bfloat16): (1e-2, 1e-3),  # that sum rounded to a bf16 mask token
    ("unshuffle_pos_grad", torch.float32): (1e-5, 1e-6),    # grad_out summed over 8 images
    ("unshuffle_pos_grad", torch.bfloat16): (1e-2, 1e-3),   # ... in bf16, or rounded to bf16 positions
    ("mae_loss", torch.float32): (1e-4, 1e-6),          # loss value, tf32 DFT products (Fourier term * alpha)
    ("mae_loss", torch.bfloat16): (1e-4, 1e-6),         # loss from bf16 pred: computed in float32 by both
    ("mae_loss_grad", torch.float32): (1e-3, 1e-4),     # zero-spectrum case: no sign ties there
    ("lion", torch.float32): (2.5e-7, 0.0),             # op-by-op roundings as torch's CUDA ops: <= 1 ulp
    ("lion", torch.bfloat16): (8e-3, 0.0),              # <= 1 bf16 ulp
}


def _close(got, expected, key):
    rtol, atol = TOL[key]
    got, expected = got.detach(), expected.detach()
    assert torch.isfinite(got).all(), f"{key}: output not fully written (NaN poison survived) or non-finite"
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol,
                               atol=atol * float(expected.float().abs().max()))


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _nan(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _images(B, C, H, dtype, seed):
    g = _gen(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (B, C, H, H), generator=g, device=DEV, dtype=torch.uint8)
    if dtype == torch.uint16:
        return torch.randint(0, 65536, (B, C, H, H), generator=g, device=DEV, dtype=torch.int32).to(torch.uint16)
    return torch.rand(B, C, H, H, generator=g, device=DEV).to(dtype)


def _compiled_variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in kernel.cache.values())


def test_triton_is_the_default_on_cuda():
    x = torch.randn(3, 4, 64, device=DEV)
    ops.mae_loss(x, x + 1, patch_size=8, layout="channel")
    assert ops.last_impl("mae_loss") == "triton"


# --------------------------------------------------------------------------------------------------------------
# masked patchify
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
@pytest.mark.parametrize("ratio", [0.25, 0.75])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_masked_patchify(layout, p, ratio, dtype, out_dtype):
    B, C = 3, 5
    images = _images(B, C, 256, dtype, seed=p)
    L = (256 // p) ** 2 * (C if layout == "channel" else 1)
    masking = ops.random_masking(B, L, ratio, device=DEV, generator=_gen(p + 1))
    ref = ops.masked_patchify(images, p, ratio, layout, masking=masking, impl="reference")
    out = ops.MaskedPatches(_nan(ref.visible.shape, out_dtype), _nan(ref.target.shape), masking)
    masked_patchify.masked_patchify_write(images, None, None, masking.ids_restore, masking.len_keep, p,
                                          layout == "channel", out.visible, out.target)
    assert out.visible.dtype == out_dtype
    _close(out.visible, ref.visible, ("masked_patchify", out_dtype))
    _close(out.target, ref.target, ("masked_patchify", torch.float32))


def test_masked_patchify_is_reproducible_by_seed():
    images = _images(3, 5, 256, torch.uint16, seed=3)
    a = ops.masked_patchify(images, 8, 0.75, seed=11)
    b = ops.masked_patchify(images, 8, 0.75, seed=11)
    assert ops.last_impl("masked_patchify") == "triton"
    assert torch.equal(a.masking.ids_shuffle, b.masking.ids_shuffle)
    assert torch.equal(a.visible, b.visible) and torch.equal(a.target, b.target)


# --------------------------------------------------------------------------------------------------------------
# unshuffle
# --------------------------------------------------------------------------------------------------------------

# (x dtype, mask token and pos dtype, out_dtype argument): float32; the decoder under autocast (bf16 tokens, float32
# parameters -> float32 out); bf16 throughout; an override narrower than x
UNSHUFFLE_DTYPES = [(torch.float32, torch.float32, None), (torch.bfloat16, torch.float32, None),
                    (torch.bfloat16, torch.bfloat16, None), (torch.float32, torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtypes", UNSHUFFLE_DTYPES, ids=["f32", "bf16-in-f32-out", "bf16", "f32-in-bf16-out"])
@pytest.mark.parametrize("prefix", [0, 1])
def test_unshuffle(dtypes, prefix):
    """Bitwise against the reference: a token rounded to the output dtype, + pos in float32, rounded once; grad_x
    grad_out's values converted to x's dtype. The mask token's and the positions' gradients: float32 sums."""
    x_dtype, param_dtype, out_arg = dtypes
    B, L, D = 8, 1024, 512
    K = 256
    g = _gen(4)
    x = torch.randn(B, 1 + prefix + K, D, generator=g, device=DEV).to(x_dtype)[:, 1:]  # strided, as CA-MAE's
    token = torch.randn(D, generator=g, device=DEV).to(param_dtype)
    pos = torch.randn(prefix + L, D, generator=g, device=DEV).to(param_dtype)
    ids = torch.argsort(torch.rand(B, L, generator=g, device=DEV), dim=1)
    out_dtype = out_arg or torch.promote_types(x_dtype, param_dtype)
    grad_out = torch.randn(B, prefix + L, D, generator=g, device=DEV).to(out_dtype)
    exp = unshuffle_expected(x, token, ids, pos, grad_out, prefix, out_arg)  # the reference's own out and grad_x

    out = unshuffle.unshuffle_forward_triton(x, token.to(out_dtype), ids, pos.to(out_dtype), prefix,
                                             out=_nan((B, prefix + L, D), out_dtype))
    _close(out, exp["out"], ("unshuffle", out_dtype))
    grad_x = _nan((B, prefix + K, D), x_dtype)
    gt = unshuffle.unshuffle_backward_triton(grad_out, ids, grad_x, prefix)
    _close(grad_x, exp["grad_x"], ("unshuffle", x_dtype))
    _close(gt, exp["grad_token"], ("unshuffle_token_grad", torch.float32))

    leaves = [t.detach().clone().requires_grad_() for t in (x, token, pos)]
    fused = ops.unshuffle(*leaves[:2], ids, leaves[2], prefix=prefix, out_dtype=out_arg)
    assert ops.last_impl("unshuffle") == "triton" and fused.dtype == out_dtype
    gx, gt, gp = torch.autograd.grad(fused, leaves, grad_out)
    assert gx.dtype == x_dtype and gt.dtype == gp.dtype == param_dtype
    _close(fused, exp["out"], ("unshuffle", out_dtype))
    _close(gx, exp["grad_x"], ("unshuffle", x_dtype))
    _close(gt, exp["grad_token"], ("unshuffle_token_grad", param_dtype))
    coarser = max(param_dtype, out_dtype, key=lambda d: torch.finfo(d).eps)
    _close(gp, exp["grad_pos"], ("unshuffle_pos_grad", coarser))


# --------------------------------------------------------------------------------------------------------------
# MAE loss
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_mae_loss(layout, p, dtype, masked):
    B, C = 3, 5
    N = (256 // p) ** 2 * (C if layout == "channel" else 1) * 3 // 4
    P = p * p * (C if layout == "standard" else 1)
    g = _gen(5 + p)
    pred = torch.randn(B, N, P, generator=g, device=DEV).to(dtype)
    target = torch.randn(B, N, P, generator=g, device=DEV)
    mask = (torch.rand(B, N, generator=g, device=DEV) < 0.6).float() if masked else None
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, mask, patch_size=p, layout=layout, alpha=0.01, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref * 1.5, leaf)

    weight, uniform = ops.token_weights(mask, B, N)
    w_max = 1.0 / (B * N) if mask is None else float(mask.max() / mask.sum())
    shape = dict(alpha=0.01, p=p, planes=P // (p * p), weight_max=w_max, scale=1.5)
    # (spectra, adjoint) precisions: the default split, tf32 throughout, exact
    kinds = {("tf32", "bf16"): "bf16_adjoint", ("tf32", "tf32"): "tf32", ("ieee", "ieee"): "float32"}
    for (fwd, adj), kind in kinds.items():
        if fwd == "ieee" and dtype != torch.float32:
            continue
        grad = _nan(pred.shape, dtype)
        loss = mae_loss.mae_loss_forward_triton(pred, target, weight, uniform, p, P // (p * p), 0.01, grad,
                                                dot_precision=fwd, adjoint_precision=adj)
        _close(loss, ref, ("mae_loss", dtype))
        assert_loss_grad_close(grad * 1.5, ref_grad, kind="bfloat16" if dtype == torch.bfloat16 else kind, **shape)

    leaf2 = pred.clone().requires_grad_()
    fused = ops.mae_loss(leaf2, target, mask, patch_size=p, layout=layout, alpha=0.01)
    assert ops.last_impl("mae_loss") == "triton"
    (grad,) = torch.autograd.grad(fused * 1.5, leaf2)
    _close(fused, ref, ("mae_loss", dtype))
    assert_loss_grad_close(grad, ref_grad, kind="bfloat16" if dtype == torch.bfloat16 else "bf16_adjoint", **shape)


@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_mae_loss_on_full_prediction(layout, p, dtype):
    """The one-op loss on the full prediction (B, L, P) against the reference on the gathered masked tokens."""
    B, C = 3, 5
    L = (256 // p) ** 2 * (C if layout == "channel" else 1)
    P = p * p * (C if layout == "standard" else 1)
    masking = ops.random_masking(B, L, 0.75, device=DEV, generator=_gen(40 + p))
    pred = torch.randn(B, L, P, generator=_gen(41 + p), device=DEV).to(dtype)
    target = torch.randn(B, L - masking.len_keep, P, generator=_gen(42 + p), device=DEV)
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(ops.gather_tokens(leaf, masking.ids_masked), target, patch_size=p, layout=layout,
                       alpha=0.01, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref * 1.5, leaf)
    leaf2 = pred.clone().requires_grad_()
    fused = ops.masked_mae_loss(leaf2, target, masking, patch_size=p, layout=layout, alpha=0.01, impl="triton")
    (grad,) = torch.autograd.grad(fused * 1.5, leaf2)
    _close(fused, ref, ("mae_loss", dtype))
    shape = dict(alpha=0.01, p=p, planes=P // (p * p), weight_max=1.0 / (B * (L - masking.len_keep)), scale=1.5)
    assert_loss_grad_close(grad, ref_grad, kind="bfloat16" if dtype == torch.bfloat16 else "bf16_adjoint", **shape)
    assert (grad[masking.mask == 0] == 0).all()


def test_mae_loss_zero_spectrum_is_finite():
    target = torch.randn(3, 7, 64 * 5, generator=_gen(6), device=DEV)
    zero = torch.zeros_like(target, requires_grad=True)
    (grad,) = torch.autograd.grad(ops.mae_loss(zero, target, patch_size=8), zero)
    (ref,) = torch.autograd.grad(ops.mae_loss(zero, target, patch_size=8, impl="reference"), zero)
    _close(grad, ref, ("mae_loss_grad", torch.float32))


# --------------------------------------------------------------------------------------------------------------
# Lion
# --------------------------------------------------------------------------------------------------------------

def _lion_state(dtypes, seed, sizes=(1, 17, 4099, 70001, 1 << 20)):
    g = _gen(seed)
    params = [torch.randn(n, generator=g, device=DEV).to(dtypes[0]) for n in sizes]
    grads = [torch.randn(n, generator=g, device=DEV).to(dtypes[1]) for n in sizes]
    moms = [(torch.randn(n, generator=g, device=DEV) * 0.1).to(dtypes[2]) for n in sizes]
    grads[2][:64] = 0  # c = 0 exactly: sign(0) = 0
    moms[2][:64] = 0
    return params, grads, moms


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16,) * 3,
                                    (torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16, torch.float32)])
def test_lion(dtypes):
    ref = _lion_state(dtypes, seed=7)
    got = [[t.clone() for t in ts] for ts in ref]
    for lr in (1e-3, 3e-4, 1e-4):
        ops.lion_update(*ref, lr=lr, weight_decay=0.05, impl="reference")
        ops.lion_update(*got, lr=lr, weight_decay=0.05)
    assert ops.last_impl("lion_update") == "triton"
    for a, b in zip(got[0] + got[2], ref[0] + ref[2]):
        _close(a, b, ("lion", a.dtype))


def test_lion_no_recompilation_when_lr_changes_and_one_launch_per_group():
    params, grads, moms = _lion_state((torch.float32,) * 3, seed=8)
    ops.lion_update(params, grads, moms, lr=1e-3, weight_decay=0.05)
    variants = _compiled_variants(lion._lion_kernel)
    launches = 0
    for step in range(5):
        ops.lion_update(params, grads, moms, lr=1e-3 / (step + 2), weight_decay=0.05 * step)
        launches += lion.plans.get(params, grads, moms).launches_per_step
    assert _compiled_variants(lion._lion_kernel) == variants
    assert launches == 5


def test_lion_launches_per_optimiser_step_of_vit_large():
    """All ~329M parameters of mae_vit_large_patch8_256 in float32: Lion's param groups (decay / no decay) give
    one launch each."""
    from mae_fast.models import create_model
    from mae_fast.optim import Lion, lion_param_groups

    model = create_model("mae_vit_large_patch8_256").to(DEV)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = Lion(lion_param_groups(model, 0.05), lr=3e-5, weight_decay=0.05)
    opt.step()
    launches = sum(lion.plans.get(*bucket).launches_per_step
                   for index, group in enumerate(opt.param_groups) for bucket in opt._buckets(index, group))
    assert launches == len(opt.param_groups) == 2


def test_lion_step_captured_in_a_cuda_graph():
    """The fused step has no host synchronisation and no table upload once planned: capture it, change lr between
    replays through the plan's pinned hyperparameters (LionPlan.write_scalars), and match the reference."""
    ref = _lion_state((torch.float32,) * 3, seed=9)
    got = [[t.clone() for t in ts] for ts in ref]
    ops.lion_update(*ref, lr=1e-3, weight_decay=0.05, impl="reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, builds the plan) on a side stream, as graphs require
        ops.lion_update(*got, lr=1e-3, weight_decay=0.05, impl="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.lion_update(*got, lr=1e-3, weight_decay=0.05, impl="triton")
    plan = lion.plans.get(*got)
    for lr in (2e-3, 5e-4, 1e-4):
        plan.write_scalars(LionScalars.make(lr, 0.9, 0.95, 0.05))
        graph.replay()
        ops.lion_update(*ref, lr=lr, weight_decay=0.05, impl="reference")
    torch.cuda.synchronize()
    for a, b in zip(got[0] + got[2], ref[0] + ref[2]):
        _close(a, b, ("lion", a.dtype))
