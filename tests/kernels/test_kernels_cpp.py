"""The C++ CPU kernels (mae_fast._C, csrc/) against the reference ops, at realistic sizes (256^2 crops, the
ViT-L/8 MAE token counts at batch 3). Fresh random inputs, odd shapes (batch 3, 5 channels), outputs poisoned with
NaN before each call and checked fully written, forward and backward, per-dtype tolerances."""
from __future__ import annotations

import pytest
import torch

from mae_fast import ops
from tests.helpers import (
    assert_loss_grad_close, assert_unit_std, images_with_spread, ops_making, standardised_planes,
    UNSHUFFLE_DTYPES, UNSHUFFLE_IDS, unshuffle_expected,
)

pytest.importorskip("mae_fast._C", reason="C++ extension not built (python setup.py build_ext --inplace)")
from mae_fast.backends import cpp as cpu_ops  # noqa: E402

# (rtol, atol as a fraction of the reference's largest magnitude) per dtype of the compared tensor
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 8e-3), torch.float16: (2e-3, 1e-3)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(B, C, H, dtype, seed):
    g = _gen(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (B, C, H, H), generator=g, dtype=torch.uint8)
    if dtype in (torch.uint16, torch.int32):
        return torch.randint(0, 65536, (B, C, H, H), generator=g, dtype=torch.int32).to(dtype)
    return torch.rand(B, C, H, H, generator=g).to(dtype)


def _nan(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


PATCHIFY_TOL = (2e-6, 2e-6)  # standardised pixels: float32 rounding of a few operations


def _close(got, expected, dtype=None, tol=None):
    dtype = dtype or got.dtype
    got, expected = got.detach(), expected.detach()
    rtol, atol = tol or TOL[dtype]
    assert torch.isfinite(got).all(), "output not fully written (NaN poison survived) or non-finite"
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol,
                               atol=atol * float(expected.float().abs().max()))


def test_cpp_backends_are_registered_and_default_on_cpu():
    for op in ("masked_patchify", "unshuffle", "mae_loss", "lion_update"):
        assert "cpp" in ops.available_impls(op)
    x = torch.randn(3, 4, 64)
    ops.mae_loss(x, x + 1, patch_size=8, layout="channel")
    assert ops.last_impl("mae_loss") == "cpp"


# --------------------------------------------------------------------------------------------------------------
# masked patchify
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_masked_patchify_matches_reference(layout, p, ratio):
    images = _images(3, 5, 256, torch.uint16, seed=p + int(100 * ratio))
    L = (256 // p) ** 2 * (5 if layout == "channel" else 1)
    masking = ops.random_masking(3, L, ratio, generator=_gen(p))
    ref = ops.masked_patchify(images, p, ratio, layout, masking=masking, impl="reference")
    visible, target = _nan(ref.visible.shape), _nan(ref.target.shape)
    out = cpu_ops.masked_patchify_cpp(images, p, masking, layout, visible=visible, target=target)
    assert out.visible is visible and out.target is target
    _close(visible, ref.visible, tol=PATCHIFY_TOL)
    _close(target, ref.target, tol=PATCHIFY_TOL)
    assert ops.masked_patchify(images, p, ratio, layout, masking=masking).visible.shape == ref.visible.shape
    assert ops.last_impl("masked_patchify") == "cpp"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.int32, torch.float32, torch.bfloat16])
def test_masked_patchify_pixel_dtypes_and_strides(dtype):
    images = _images(3, 5, 64, dtype, seed=3)
    images = images.contiguous(memory_format=torch.channels_last)  # non-contiguous NCHW strides
    masking = ops.random_masking(3, 64, 0.75, generator=_gen(4))
    ref = ops.masked_patchify(images, 8, 0.75, masking=masking, impl="reference")
    out = cpu_ops.masked_patchify_cpp(images, 8, masking, "standard", visible=_nan(ref.visible.shape),
                                      target=_nan(ref.target.shape))
    _close(out.visible, ref.visible, tol=PATCHIFY_TOL)
    _close(out.target, ref.target, tol=PATCHIFY_TOL)


@pytest.mark.parametrize("brightness", [300, 3000, 30000, 62000])
@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
def test_16_bit_channels_standardise_to_unit_std_at_every_brightness(brightness, layout, p):
    images = images_with_spread(3, 5, 64, brightness, 20, seed=brightness + p)  # std 20 counts
    L = (64 // p) ** 2 * (5 if layout == "channel" else 1)
    masking = ops.random_masking(3, L, 0.75, generator=_gen(p))
    ref = ops.masked_patchify(images, p, 0.75, layout, masking=masking, impl="reference")
    out = cpu_ops.masked_patchify_cpp(images, p, masking, layout, visible=_nan(ref.visible.shape),
                                      target=_nan(ref.target.shape))
    assert_unit_std(standardised_planes(out, p, 5, layout))
    # float32 rounding of x / 65535 at a bright level is ~1e-4 of a 20-count std: compared absolutely
    torch.testing.assert_close(out.visible, ref.visible, rtol=0, atol=1e-3)
    torch.testing.assert_close(out.target, ref.target, rtol=0, atol=1e-3)


def test_channel_stats_precise_on_low_contrast_16_bit():
    """A bright plane with tiny variation (mean 0.6, std 1e-4 of full scale) needs exact sums."""
    g = _gen(5)
    base = torch.randint(39300, 39310, (3, 5, 256, 256), generator=g, dtype=torch.int32)
    images = base.to(torch.uint16)
    mean, rstd = cpu_ops.channel_stats_cpp(images)
    x = base.double() / 65535.0  # exact: float32 x/65535 would move the variance by ~1e-5 at this spread
    var = x.var(dim=(2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), x.mean(dim=(2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + ops.standardize_eps(torch.uint16)), rtol=1e-6, atol=0)


def test_masked_patchify_given_stats():
    images = _images(3, 5, 64, torch.uint8, seed=6)
    masking = ops.random_masking(3, 64, 0.75, generator=_gen(6))
    stats = (torch.rand(3, 5, generator=_gen(7)), torch.rand(3, 5, generator=_gen(8)) + 0.5)
    ref = ops.masked_patchify(images, 8, 0.75, masking=masking, stats=stats, impl="reference")
    out = ops.masked_patchify(images, 8, 0.75, masking=masking, stats=stats, impl="cpp")
    _close(out.visible, ref.visible, tol=PATCHIFY_TOL)
    _close(out.target, ref.target, tol=PATCHIFY_TOL)


def test_masked_patchify_out_dtype_and_autocast():
    """Visible tokens in the requested dtype (the C++ kernel writes float32, the op casts), by default in the
    autocast dtype; the target stays float32; the reference rounds the same float32 values."""
    images = _images(2, 3, 32, torch.uint16, seed=9)
    masking = ops.random_masking(2, 16, 0.75, generator=_gen(9))
    ref = ops.masked_patchify(images, 8, 0.75, masking=masking, impl="reference")
    ref_bf16 = ops.masked_patchify(images, 8, 0.75, masking=masking, impl="reference", out_dtype=torch.bfloat16)
    assert torch.equal(ref_bf16.visible, ref.visible.to(torch.bfloat16)) and ref_bf16.target.dtype == torch.float32
    out = ops.masked_patchify(images, 8, 0.75, masking=masking, impl="cpp", out_dtype=torch.bfloat16)
    assert out.visible.dtype == torch.bfloat16 and out.target.dtype == torch.float32
    _close(out.visible, ref.visible, tol=(2**-8, 1e-6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ops.masked_patchify(images, 8, 0.75, masking=masking, impl="cpp")
    assert auto.visible.dtype == torch.bfloat16 and torch.equal(auto.visible, out.visible)
    assert ops.masked_patchify(images, 8, 0.75, masking=masking, impl="cpp").visible.dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------
# unshuffle
# --------------------------------------------------------------------------------------------------------------



def _coarser(a, b):
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _unshuffle_inputs(B, K, L, D, prefix, x_dtype, param_dtype, with_pos, seed):
    g = _gen(seed)
    x = torch.randn(B, 1 + prefix + K, D, generator=g).to(x_dtype)[:, 1:]  # a strided view, as CA-MAE passes it
    token = torch.randn(D, generator=g).to(param_dtype)
    pos = torch.randn(prefix + L, D, generator=g).to(param_dtype) if with_pos else None
    ids = torch.argsort(torch.rand(B, L, generator=g), dim=1)
    return x, token, ids, pos


def _check_unshuffle(B, K, L, D, prefix, dtypes, with_pos, seed):
    """Kernel level on NaN-poisoned outputs, then through the dispatcher and autograd: out and grad_x bitwise (one
    rounding each, as the reference), grad_x in x's dtype, the mask token's and pos's gradients in their dtypes."""
    x_dtype, param_dtype, out_arg = dtypes
    x, token, ids, pos = _unshuffle_inputs(B, K, L, D, prefix, x_dtype, param_dtype, with_pos, seed)
    out_dtype = out_arg or torch.promote_types(x_dtype, param_dtype)
    grad_out = torch.randn(B, prefix + L, D, generator=_gen(seed + 1)).to(out_dtype)
    exp = unshuffle_expected(x, token, ids, pos, grad_out, prefix, out_arg)
    assert exp["out_dtype"] == out_dtype

    out = cpu_ops.unshuffle_forward_cpp(x, token.to(out_dtype), ids, None if pos is None else pos.to(out_dtype),
                                        prefix, out=_nan((B, prefix + L, D), out_dtype))
    assert torch.isfinite(out).all() and torch.equal(out, exp["out"]), "forward must round exactly as the reference"
    grad_x = _nan((B, prefix + K, D), x_dtype)
    grad_token = cpu_ops.unshuffle_backward_cpp(grad_out, ids, grad_x, prefix)
    assert torch.isfinite(grad_x).all() and torch.equal(grad_x, exp["grad_x"])
    _close(grad_token, exp["grad_token"], dtype=torch.float32)

    leaves = [t.detach().clone().requires_grad_() for t in (x, token, pos) if t is not None]
    fused = ops.unshuffle(*leaves[:2], ids, leaves[2] if with_pos else None, prefix=prefix, out_dtype=out_arg)
    assert ops.last_impl("unshuffle") == "cpp" and fused.dtype == out_dtype
    assert torch.equal(fused, exp["out"])
    # grad_x comes out of the backward op in x's dtype: no conversion pass of its size left to autograd
    grads, full_size = ops_making(grad_x.shape, lambda: torch.autograd.grad(fused, leaves, grad_out))
    assert full_size == ["mae_fast.unshuffle_cpp_backward.default"], full_size
    assert grads[0].dtype == x_dtype and torch.equal(grads[0], exp["grad_x"])
    assert grads[1].dtype == param_dtype
    _close(grads[1], exp["grad_token"], dtype=param_dtype)
    if with_pos:  # grad_out summed over images in the output dtype, then converted to pos's
        assert grads[2].dtype == param_dtype
        _close(grads[2], exp["grad_pos"], dtype=_coarser(param_dtype, out_dtype))


@pytest.mark.parametrize("dtypes", UNSHUFFLE_DTYPES, ids=UNSHUFFLE_IDS)
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
def test_unshuffle_dtypes_and_prefix(dtypes, prefix, with_pos):
    _check_unshuffle(3, 5, 13, 40, prefix, dtypes, with_pos, seed=9)  # odd shapes: D = 40, L = 13


@pytest.mark.parametrize("dtypes", UNSHUFFLE_DTYPES[:2], ids=UNSHUFFLE_IDS[:2])
def test_unshuffle_model_sizes(dtypes):
    """The decoder's call at ViT-L/8 token counts (batch 3): class token in place, 256 of 1024 visible, D = 512."""
    _check_unshuffle(3, 256, 1024, 512, 1, dtypes, True, seed=10)


def test_unshuffle_output_dtype_rules():
    """Default: the promotion of the three dtypes (pos included); an out_dtype the C++ kernel has no instance for
    (float64) runs the reference under "auto" and is refused by name; a non-float out_dtype is an error."""
    x, token, ids, pos = _unshuffle_inputs(2, 3, 7, 8, 1, torch.bfloat16, torch.bfloat16, True, seed=12)
    assert ops.unshuffle(x, token, ids, pos, prefix=1).dtype == torch.bfloat16
    assert ops.unshuffle(x, token, ids, pos.float(), prefix=1).dtype == torch.float32
    assert ops.unshuffle(x, token.half(), ids, prefix=1).dtype == torch.float32  # bf16 + f16 -> f32, as torch
    assert ops.last_impl("unshuffle") == "cpp"
    out = ops.unshuffle(x, token, ids, pos, prefix=1, out_dtype=torch.float64)
    assert out.dtype == torch.float64 and ops.last_impl("unshuffle") == "reference"
    with pytest.raises(RuntimeError, match="cannot take these inputs"):
        ops.unshuffle(x, token, ids, pos, prefix=1, out_dtype=torch.float64, impl="cpp")
    with pytest.raises(ValueError, match="out_dtype must be a floating-point dtype"):
        ops.unshuffle(x, token, ids, pos, prefix=1, out_dtype=torch.int32)


@pytest.mark.parametrize("prefix", [0, 1])
def test_unshuffle_rejects_out_of_range_ids(prefix):
    x = torch.randn(2, prefix + 3, 8)
    ids = torch.tensor([[0, 1, 2, 3, 9], [4, 3, 2, 1, 0]])
    with pytest.raises(RuntimeError, match="outside"):
        ops.unshuffle(x, torch.randn(8), ids, impl="cpp", prefix=prefix)


# --------------------------------------------------------------------------------------------------------------
# MAE loss
# --------------------------------------------------------------------------------------------------------------

def _loss_inputs(layout, p, dtype, seed, B=3, N=None):
    C = 5
    N = N or (256 // p) ** 2 * (C if layout == "channel" else 1) * 3 // 4  # masked tokens at ratio 0.75
    P = p * p * (C if layout == "standard" else 1)
    g = _gen(seed)
    pred = torch.randn(B, N, P, generator=g).to(dtype)
    target = torch.randn(B, N, P, generator=g)
    return pred, target


@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mae_loss_matches_reference(layout, p, dtype):
    pred, target = _loss_inputs(layout, p, dtype, seed=p)
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, patch_size=p, layout=layout, alpha=0.01, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref * 3.5, leaf)

    B, N, P = pred.shape
    grad = _nan(pred.shape, dtype)
    loss = cpu_ops.mae_loss_forward_cpp(pred, target, None, 1.0 / (B * N), p, P // (p * p), 0.01, grad)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)
    kind = str(dtype).removeprefix("torch.")
    shape = dict(kind=kind, alpha=0.01, p=p, planes=P // (p * p), weight_max=1.0 / (B * N), scale=3.5)
    assert_loss_grad_close(grad * 3.5, ref_grad, **shape)

    leaf2 = pred.clone().requires_grad_()
    fused = ops.mae_loss(leaf2, target, patch_size=p, layout=layout, alpha=0.01)
    assert ops.last_impl("mae_loss") == "cpp"
    (fused_grad,) = torch.autograd.grad(fused * 3.5, leaf2)
    assert_loss_grad_close(fused_grad, ref_grad, **shape)


@pytest.mark.parametrize("layout", ops.LAYOUTS)
def test_mae_loss_with_mask_and_large_alpha(layout):
    """alpha = 0.5 makes the Fourier gradient dominant enough to be checked tightly."""
    pred, target = _loss_inputs(layout, 8, torch.float32, seed=11, N=101)
    mask = (torch.rand(pred.shape[:2], generator=_gen(12)) < 0.6).float()
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, mask, patch_size=8, layout=layout, alpha=0.5, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    leaf2 = pred.clone().requires_grad_()
    got = ops.mae_loss(leaf2, target, mask, patch_size=8, layout=layout, alpha=0.5, impl="cpp")
    (grad,) = torch.autograd.grad(got, leaf2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    P = pred.shape[-1]
    assert_loss_grad_close(grad, ref_grad, kind="float32", alpha=0.5, p=8, planes=P // 64,
                     weight_max=float(mask.max() / mask.sum()))


@pytest.mark.parametrize("pred_dtype,target_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                     (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_mae_loss_dtype_combinations(pred_dtype, target_dtype):
    pred, target = _loss_inputs("standard", 8, pred_dtype, seed=21, N=33)
    target = target.to(target_dtype)
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, patch_size=8, alpha=0.5, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    leaf2 = pred.clone().requires_grad_()
    got = ops.mae_loss(leaf2, target, patch_size=8, alpha=0.5, impl="cpp")
    (grad,) = torch.autograd.grad(got, leaf2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    B, N, P = pred.shape
    assert_loss_grad_close(grad, ref_grad, kind=str(pred_dtype).removeprefix("torch."), alpha=0.5, p=8, planes=P // 64,
                     weight_max=1.0 / (B * N))


@pytest.mark.parametrize("p", [4, 6, 7])
def test_mae_loss_other_patch_sizes(p):
    """The C++ kernel is generic in p (the half spectrum also covers odd p)."""
    pred, target = _loss_inputs("standard", p, torch.float32, seed=p, N=9)
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, patch_size=p, alpha=0.5, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    leaf2 = pred.clone().requires_grad_()
    got = ops.mae_loss(leaf2, target, patch_size=p, alpha=0.5, impl="cpp")
    (grad,) = torch.autograd.grad(got, leaf2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    B, N, P = pred.shape
    assert_loss_grad_close(grad, ref_grad, kind="float32", alpha=0.5, p=p, planes=P // (p * p), weight_max=1.0 / (B * N))


def test_mae_loss_zero_spectrum_and_identical_inputs():
    target = torch.randn(3, 7, 64 * 5, generator=_gen(13))
    zero = torch.zeros_like(target, requires_grad=True)  # |F| = 0 everywhere: gradient defined as 0 there
    (grad,) = torch.autograd.grad(ops.mae_loss(zero, target, patch_size=8, impl="cpp"), zero)
    (ref,) = torch.autograd.grad(ops.mae_loss(zero, target, patch_size=8, impl="reference"), zero)
    assert torch.isfinite(grad).all()
    _close(grad, ref)
    same = target.clone().requires_grad_()
    loss = ops.mae_loss(same, target, patch_size=8, impl="cpp")
    (grad,) = torch.autograd.grad(loss, same)
    assert loss.item() == 0.0 and grad.abs().max() == 0


def test_mae_loss_backward_with_retain_graph():
    """Backward scales the stored gradient out of place, so a retained graph gives the same gradient again."""
    pred, target = _loss_inputs("channel", 8, torch.float32, seed=14, N=5)
    pred.requires_grad_()
    loss = ops.mae_loss(pred, target, patch_size=8, layout="channel", impl="cpp")
    (first,) = torch.autograd.grad(loss * 2.0, pred, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2.0, pred)
    assert torch.equal(first, second) and first.abs().max() > 0


# --------------------------------------------------------------------------------------------------------------
# Lion
# --------------------------------------------------------------------------------------------------------------

SIZES = [1, 17, 4099, 70001, 300_000]  # across the 65536-element work chunks


def _lion_state(p_dtype, g_dtype, m_dtype, seed):
    g = _gen(seed)
    params = [torch.randn(n, generator=g).to(p_dtype) for n in SIZES]
    grads = [torch.randn(n, generator=g).to(g_dtype) for n in SIZES]
    moms = [(torch.randn(n, generator=g) * 0.1).to(m_dtype) for n in SIZES]
    # exact zeros of c = b1*m + (1-b1)*g: sign(0) = 0 must leave p*(1-lr*wd)
    grads[2][:50] = 0
    moms[2][:50] = 0
    return params, grads, moms


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_dtype", [torch.float32, torch.bfloat16])
def test_lion_matches_reference_bitwise(p_dtype, g_dtype, m_dtype):
    """The kernel rounds op by op as the reference (two rounded products, one add, FMA for the momentum), so the
    results are bitwise equal; exact zeros of c keep p * (1 - lr * wd) (sign(0) = 0)."""
    ref = _lion_state(p_dtype, g_dtype, m_dtype, seed=15)
    got = [[t.clone() for t in ts] for ts in ref]
    decayed = ref[0][2][:50].float() * (1 - 1e-3 * 0.05)
    for step, lr in enumerate([1e-3, 3e-4, 1e-4]):  # lr changes between steps: runtime arguments
        ops.lion_update(*ref, lr=lr, beta1=0.9, beta2=0.95, weight_decay=0.05, impl="reference")
        ops.lion_update(*got, lr=lr, beta1=0.9, beta2=0.95, weight_decay=0.05, impl="cpp")
        if step == 0:
            torch.testing.assert_close(got[0][2][:50].float(), decayed.to(p_dtype).float(), rtol=0, atol=0)
    for a, b in zip(got[0] + got[2], ref[0] + ref[2]):
        assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} elements differ"


def test_lion_mixed_lists_and_non_contiguous_fall_back_per_tensor():
    g = _gen(17)
    p32 = torch.randn(33, generator=g)
    pbf = torch.randn(40, generator=g).bfloat16()
    p_t = torch.randn(8, 6, generator=g).t()  # non-contiguous: reference path for this one
    params = [p32, pbf, p_t]
    grads = [torch.randn_like(p) for p in params]
    moms = [torch.zeros_like(p) for p in params]
    ref = [[t.clone() for t in ts] for ts in (params, grads, moms)]
    ops.lion_update(params, grads, moms, lr=1e-2, weight_decay=0.1, impl="cpp")
    ops.lion_update(*ref, lr=1e-2, weight_decay=0.1, impl="reference")
    for a, b in zip(params + moms, ref[0] + ref[2]):
        torch.testing.assert_close(a, b)


def test_lion_op_rejects_mixed_dtypes_in_one_call():
    with pytest.raises(RuntimeError, match="share the dtypes"):
        torch.ops.mae_fast.lion_update_([torch.randn(3), torch.randn(3).bfloat16()], [torch.randn(3)] * 2,
                                        [torch.randn(3)] * 2, 0.1, 1.0, 0.9, 0.1, 0.95, 0.05)


@pytest.mark.parametrize("layout,p", [("standard", 8), ("channel", 16), ("standard", 16)])
def test_masked_mae_loss_cpp_matches_reference(layout, p):
    g = torch.Generator().manual_seed(11)
    B, L = 2, 9
    P = p * p * (5 if layout == "standard" else 1)
    masking = ops.random_masking(B, L, 0.7, generator=g)
    target = torch.randn(B, L - masking.len_keep, P, generator=g)
    pred = torch.randn(B, L, P, generator=g)
    grads, losses = [], []
    for impl in ("cpp", "reference"):
        x = pred.clone().requires_grad_()
        loss = ops.masked_mae_loss(x, target, masking, patch_size=p, layout=layout, alpha=0.2, impl=impl)
        assert ops.last_impl("masked_mae_loss") == impl
        loss.backward()
        losses.append(loss.detach())
        grads.append(x.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6 * float(grads[1].abs().max()))
