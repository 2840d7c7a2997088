"""The MAE loss kernels (C++: csrc/mae_loss.cpp; Triton: kernels/mae_loss.py) against the reference: loss and the
gradient wrt pred written in the same pass (poisoned with NaN first), per-dtype tolerances (tests/helpers.py
LOSS_GRAD_TOL), the loss on the full prediction (masked_mae_loss) and its backward. The C++ kernels at the ViT-L/8
MAE token counts, the Triton ones at interpreter sizes with alpha large enough that an error in the Fourier
gradient cannot hide under the MSE term."""
from __future__ import annotations

import math

import pytest
import torch

from mae_fast import ops
from mae_fast.ops.mae_loss import KERNELS
from tests.helpers import assert_loss_grad_close
from tests.kernels.cases import (CPP, IMPLS, TOL, TRITON, close, device, gen, impl_cases, nan, runs_by_default,
                                 triton_ready)

# the Triton loss's dots are exact float32 in the interpreter; on a GPU ask for ieee products at kernel level (tf32
# is covered by the tolerance tables of tests/gpu)
KERNEL_ARGS = {"cpp": {}, "triton": {"dot_precision": "ieee"}}
# rtol of the fused op's loss against the reference's: the Triton default on a GPU forms the spectra from tf32
LOSS_RTOL = {"cpp": 1e-5, "triton": 1e-3}


def _fused_grad_kind(impl, dtype) -> str:
    """The op's default precision: exact float32 on a CPU (C++, the interpreter), tf32 spectra on a GPU."""
    if impl == "triton" and torch.cuda.is_available():
        return "tf32"
    return str(dtype).removeprefix("torch.")


def _loss_inputs(layout, p, dtype, seed, B=3, N=None, dev="cpu"):
    C = 5
    N = N or (256 // p) ** 2 * (C if layout == "channel" else 1) * 3 // 4  # masked tokens at ratio 0.75
    P = p * p * (C if layout == "standard" else 1)
    g = gen(seed)
    pred = torch.randn(B, N, P, generator=g).to(dtype)
    target = torch.randn(B, N, P, generator=g)
    return pred.to(dev), target.to(dev)


# (layout, p, pred dtype, with a mask, tokens (None: the ViT-L/8 count), alpha) per implementation
_MATCH_CASES = {
    "cpp": [(layout, p, dtype, False, None, 0.01) for layout in ops.LAYOUTS for p in (8, 16)
            for dtype in (torch.float32, torch.bfloat16)],
    "triton": [(layout, p, torch.float32, masked, 7, 0.3) for layout in ops.LAYOUTS for p in (8, 16)
               for masked in (False, True)],
}


@pytest.mark.parametrize("impl,layout,p,dtype,masked,N,alpha", impl_cases(_MATCH_CASES))
def test_mae_loss_matches_reference(impl, layout, p, dtype, masked, N, alpha):
    dev = device(impl)
    pred, target = _loss_inputs(layout, p, dtype, seed=p, N=N, dev=dev)
    B, N, P = pred.shape
    mask = (torch.rand(B, N, generator=gen(p)) < 0.6).float().to(dev) if masked else None
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, mask, patch_size=p, layout=layout, alpha=alpha, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref * 3.5, leaf)

    weight, uniform = ops.token_weights(mask, B, N)
    grad = nan(pred.shape, dtype, dev)
    loss = KERNELS[impl](pred, target, weight, uniform, p, P // (p * p), alpha, grad, **KERNEL_ARGS[impl])
    torch.testing.assert_close(loss.cpu(), ref.detach().cpu(), rtol=1e-5, atol=0)
    w_max = 1.0 / (B * N) if mask is None else float(mask.max() / mask.sum())
    shape = dict(alpha=alpha, p=p, planes=P // (p * p), weight_max=w_max, scale=3.5)
    assert_loss_grad_close(grad * 3.5, ref_grad, kind=str(dtype).removeprefix("torch."), **shape)

    leaf2 = pred.clone().requires_grad_()
    fused = ops.mae_loss(leaf2, target, mask, patch_size=p, layout=layout, alpha=alpha,
                         impl="auto" if runs_by_default(impl) else impl)
    assert ops.last_impl("mae_loss") == impl
    (fused_grad,) = torch.autograd.grad(fused * 3.5, leaf2)
    torch.testing.assert_close(fused.detach().cpu(), ref.detach().cpu(), rtol=LOSS_RTOL[impl], atol=0)
    assert_loss_grad_close(fused_grad, ref_grad, kind=_fused_grad_kind(impl, dtype), **shape)


# tolerance of the gradient at |F| = 0 (0 by definition there): the Triton default on a GPU takes tf32 spectra
ZERO_TOL = {"cpp": TOL[torch.float32], "triton": (1e-3, 1e-3)}


@pytest.mark.parametrize("impl", IMPLS)
def test_mae_loss_zero_spectrum_and_identical_inputs(impl):
    dev = device(impl)
    target = torch.randn(3, 7, 64 * 5, generator=gen(13)).to(dev)
    zero = torch.zeros_like(target, requires_grad=True)  # |F| = 0 everywhere: gradient defined as 0 there
    (grad,) = torch.autograd.grad(ops.mae_loss(zero, target, patch_size=8, impl=impl), zero)
    (ref,) = torch.autograd.grad(ops.mae_loss(zero, target, patch_size=8, impl="reference"), zero)
    assert torch.isfinite(grad).all()
    close(grad, ref, tol=ZERO_TOL[impl])
    same = target.clone().requires_grad_()
    loss = ops.mae_loss(same, target, patch_size=8, impl=impl)
    (grad,) = torch.autograd.grad(loss, same)
    assert loss.item() == 0.0 and grad.abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout,p", [("standard", 8), ("channel", 16), ("standard", 16)])
def test_masked_mae_loss_matches_reference(impl, layout, p):
    dev = device(impl)
    g = torch.Generator().manual_seed(11)
    B, L = 2, 9
    P = p * p * (5 if layout == "standard" else 1)
    masking = ops.random_masking(B, L, 0.7, generator=g)
    target = torch.randn(B, L - masking.len_keep, P, generator=g)
    pred = torch.randn(B, L, P, generator=g)
    masking = ops.Masking(*(t.to(dev) for t in (masking.ids_shuffle, masking.ids_restore, masking.mask)),
                          masking.len_keep)
    grads, losses = [], []
    for name in (impl, "reference"):
        x = pred.clone().to(dev).requires_grad_()
        loss = ops.masked_mae_loss(x, target.to(dev), masking, patch_size=p, layout=layout, alpha=0.2, impl=name)
        assert ops.last_impl("masked_mae_loss") == name
        loss.backward()
        losses.append(loss.detach().cpu())
        grads.append(x.grad.cpu())
    torch.testing.assert_close(losses[0], losses[1], rtol=LOSS_RTOL[impl], atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4 if impl == "cpp" else 1e-2,
                               atol=1e-6 * float(grads[1].abs().max()) if impl == "cpp" else 1e-3 * float(
                                   grads[1].abs().max()))


# --------------------------------------------------------------------------------------------------------------
# C++: dtypes, odd patch sizes, masks, retain_graph
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [CPP])
@pytest.mark.parametrize("layout", ops.LAYOUTS)
def test_mae_loss_with_mask_and_large_alpha(impl, layout):
    """alpha = 0.5 makes the Fourier gradient dominant enough to be checked tightly."""
    pred, target = _loss_inputs(layout, 8, torch.float32, seed=11, N=101)
    mask = (torch.rand(pred.shape[:2], generator=gen(12)) < 0.6).float()
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, mask, patch_size=8, layout=layout, alpha=0.5, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    leaf2 = pred.clone().requires_grad_()
    got = ops.mae_loss(leaf2, target, mask, patch_size=8, layout=layout, alpha=0.5, impl=impl)
    (grad,) = torch.autograd.grad(got, leaf2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    P = pred.shape[-1]
    assert_loss_grad_close(grad, ref_grad, kind="float32", alpha=0.5, p=8, planes=P // 64,
                           weight_max=float(mask.max() / mask.sum()))


@pytest.mark.parametrize("impl", [CPP])
@pytest.mark.parametrize("pred_dtype,target_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                     (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16)])
def test_mae_loss_dtype_combinations(impl, pred_dtype, target_dtype):
    pred, target = _loss_inputs("standard", 8, pred_dtype, seed=21, N=33)
    target = target.to(target_dtype)
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, patch_size=8, alpha=0.5, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    leaf2 = pred.clone().requires_grad_()
    got = ops.mae_loss(leaf2, target, patch_size=8, alpha=0.5, impl=impl)
    (grad,) = torch.autograd.grad(got, leaf2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    B, N, P = pred.shape
    assert_loss_grad_close(grad, ref_grad, kind=str(pred_dtype).removeprefix("torch."), alpha=0.5, p=8,
                           planes=P // 64, weight_max=1.0 / (B * N))


@pytest.mark.parametrize("impl", [CPP])
@pytest.mark.parametrize("p", [4, 6, 7])
def test_mae_loss_other_patch_sizes(impl, p):
    """The C++ kernel is generic in p (the half spectrum also covers odd p)."""
    pred, target = _loss_inputs("standard", p, torch.float32, seed=p, N=9)
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, patch_size=p, alpha=0.5, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    leaf2 = pred.clone().requires_grad_()
    got = ops.mae_loss(leaf2, target, patch_size=p, alpha=0.5, impl=impl)
    (grad,) = torch.autograd.grad(got, leaf2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    B, N, P = pred.shape
    assert_loss_grad_close(grad, ref_grad, kind="float32", alpha=0.5, p=p, planes=P // (p * p),
                           weight_max=1.0 / (B * N))


@pytest.mark.parametrize("impl", [CPP])
def test_mae_loss_backward_with_retain_graph(impl):
    """Backward scales the stored gradient out of place, so a retained graph gives the same gradient again."""
    pred, target = _loss_inputs("channel", 8, torch.float32, seed=14, N=5)
    pred.requires_grad_()
    loss = ops.mae_loss(pred, target, patch_size=8, layout="channel", impl=impl)
    (first,) = torch.autograd.grad(loss * 2.0, pred, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2.0, pred)
    assert torch.equal(first, second) and first.abs().max() > 0


# --------------------------------------------------------------------------------------------------------------
# Triton: the DFT tables, the GPU's precisions emulated, the persistent grid, the one-op masked loss
# --------------------------------------------------------------------------------------------------------------

def _triton_loss():
    from mae_fast.kernels import mae_loss

    return mae_loss


if triton_ready():
    import triton
    import triton.language as tl

    from mae_fast.kernels.mae_loss import _round_bf16

    @triton.jit
    def _round_bf16_probe(x, out, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out + i, _round_bf16(tl.load(x + i)))


@pytest.mark.parametrize("impl", [TRITON])
def test_dft_tables_give_fft2(impl):
    """vec(x) (K_re + i K_im) is the 2-D DFT of the row-major p x p plane x."""
    mae_loss = _triton_loss()
    for p in (8, 16):
        k_re, k_im = mae_loss.dft_tables(p, torch.device("cpu"))
        x = torch.randn(7, p, p, generator=gen(p), dtype=torch.float64)
        F = torch.complex(x.reshape(7, -1) @ k_re.double(), x.reshape(7, -1) @ k_im.double()).reshape(7, p, p)
        torch.testing.assert_close(F, torch.fft.fft2(x), rtol=1e-5, atol=1e-5 * p)
        assert torch.equal(k_re, k_re.T) and torch.equal(k_im, k_im.T)


@pytest.mark.parametrize("impl", [TRITON])
def test_dft_matrix_rows_then_columns_give_fft2(impl):
    """The separable kernel's tables: F = W X W (W symmetric), rows then columns."""
    mae_loss = _triton_loss()
    for p in (8, 16):
        w_re, w_im = mae_loss.dft_matrix(p, torch.device("cpu"))
        W = torch.complex(w_re.double(), w_im.double())
        x = torch.randn(7, p, p, generator=gen(p + 1), dtype=torch.float64)
        torch.testing.assert_close(W @ x.to(W.dtype) @ W, torch.fft.fft2(x), rtol=1e-5, atol=1e-5 * p)
        assert torch.equal(w_re, w_re.T) and torch.equal(w_im, w_im.T)
    assert not mae_loss.separable(8) and mae_loss.separable(16)


@pytest.mark.parametrize("impl", [TRITON])
def test_bf16_emulation_rounds_to_nearest_even(impl):
    """Under the interpreter bf16 products are emulated on bf16-rounded float32 values: the rounding must be a GPU's
    (nearest, ties to even; torch's CPU cast does the same), not the interpreter's truncation."""
    dev = device(impl)
    x = torch.cat([torch.randn(1000, generator=gen(70)) * 100,
                   torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-12), 0.0, -0.0])])
    x = torch.cat([x, torch.zeros(1024 - x.numel())]).to(dev)
    out = nan((1024,), dev=dev)
    _round_bf16_probe[(1,)](x, out, N=1024)
    assert torch.equal(out.cpu(), x.cpu().to(torch.bfloat16).float())


@pytest.mark.parametrize("impl", [TRITON])
def test_round_to_tf32(impl):
    x = torch.tensor([1.0, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-10 + 2**-12, -math.pi])
    r = _triton_loss().round_to_tf32(x)
    assert r[0] == 1.0 and r[1] == 1.0  # tie to even
    assert r[2] == 1 + 2**-9             # tie to even (upwards)
    assert r[3] == 1 + 2**-10
    assert abs(r[4] + math.pi) <= 2**-10 * math.pi


def _loss_case(layout, p, seed, N=7, dev="cpu"):
    P = p * p * (5 if layout == "standard" else 1)
    return (torch.randn(3, N, P, generator=gen(seed)).to(dev), torch.randn(3, N, P, generator=gen(seed + 1)).to(dev))


@pytest.mark.parametrize("impl", [TRITON])
@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
def test_mae_loss_bf16_adjoint(impl, layout, p):
    """The GPU's split of precisions, spectra exact here (tf32 on a GPU) and the gradient's adjoint products on
    bf16-rounded operands (emulated bit-exactly): loss as exact, gradient within the bf16_adjoint tolerance. 23
    tokens: a ragged last tile (p = 8: 64-plane tiles; p = 16: 8 planes per tile)."""
    mae_loss, dev = _triton_loss(), device(impl)
    pred, target = _loss_case(layout, p, seed=30 + p, N=23, dev=dev)
    B, N, P = pred.shape
    mask = (torch.rand(B, N, generator=gen(31 + p)) < 0.6).float().to(dev)
    alpha = 0.3
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(leaf, target, mask, patch_size=p, layout=layout, alpha=alpha, impl="reference")
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    weight, uniform = ops.token_weights(mask, B, N)
    grad = nan(pred.shape, dev=dev)
    loss = mae_loss.mae_loss_forward_triton(pred, target, weight, uniform, p, P // (p * p), alpha, grad,
                                            dot_precision="ieee", adjoint_precision="bf16")
    torch.testing.assert_close(loss.cpu(), ref.detach().cpu(), rtol=1e-5, atol=0)
    assert_loss_grad_close(grad, ref_grad, kind="bf16_adjoint", alpha=alpha, p=p, planes=P // (p * p),
                           weight_max=float(mask.max() / mask.sum()))
    exact = nan(pred.shape, dev=dev)
    mae_loss.mae_loss_forward_triton(pred, target, weight, uniform, p, P // (p * p), alpha, exact,
                                     dot_precision="ieee")
    assert (exact - grad).abs().max() > 0  # the bf16 path really rounded


@pytest.mark.parametrize("impl", [TRITON])
@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
def test_mae_loss_persistent_grid(impl, layout, p):
    """The persistent grid: however many programs walk the tiles (1: one program takes every tile; 2: an
    uneven share; one per tile: the plain grid), the gradient is the same bit for bit and the loss is the
    reference's."""
    import triton

    mae_loss, dev = _triton_loss(), device(impl)
    pred, target = _loss_case(layout, p, seed=40 + p, N=11, dev=dev)
    B, N, P = pred.shape
    planes = P // (p * p)
    alpha = 0.3
    ref = ops.mae_loss(pred, target, None, patch_size=p, layout=layout, alpha=alpha, impl="reference")
    block = 1 if mae_loss.separable(p) else 16  # tokens (separable) or planes (Kronecker) per tile
    n_tiles = triton.cdiv(B * N * (1 if mae_loss.separable(p) else planes), block)
    grads = {}
    for programs in (1, 2, n_tiles):
        grad = nan(pred.shape, dev=dev)
        loss = mae_loss.mae_loss_forward_triton(pred, target, None, 1.0 / (B * N), p, planes, alpha, grad,
                                                dot_precision="ieee", block_planes=block, programs=programs)
        torch.testing.assert_close(loss.cpu(), ref.cpu(), rtol=1e-5, atol=0)
        assert not grad.isnan().any()
        grads[programs] = grad
    assert n_tiles >= 3  # so that 2 programs share the tiles unevenly
    assert torch.equal(grads[1], grads[n_tiles]) and torch.equal(grads[2], grads[n_tiles])


@pytest.mark.parametrize("impl", [TRITON])
@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
def test_masked_mae_loss_on_full_prediction(impl, layout, p):
    """The one-op loss on the decoder's full prediction (B, L, P): equal to the reference loss of the gathered
    masked tokens, with the full gradient (zeros at visible tokens, scaled by the incoming gradient) from one
    scatter pass; the scatter's output poisoned with NaN first."""
    mae_loss, dev = _triton_loss(), device(impl)
    B, L = 3, 13
    P = p * p * (5 if layout == "standard" else 1)
    masking = ops.random_masking(B, L, 0.75, device=dev, generator=gen(p + 80, dev))
    pred = torch.randn(B, L, P, generator=gen(81 + p)).to(dev)
    target = torch.randn(B, L - masking.len_keep, P, generator=gen(82 + p)).to(dev)
    leaf = pred.clone().requires_grad_()
    ref = ops.mae_loss(ops.gather_tokens(leaf, masking.ids_masked), target, patch_size=p, layout=layout, alpha=0.3,
                       impl="reference")
    (ref_grad,) = torch.autograd.grad(ref * 2.5, leaf)
    leaf2 = pred.clone().requires_grad_()
    fused = ops.masked_mae_loss(leaf2, target, masking, patch_size=p, layout=layout, alpha=0.3, impl=impl)
    assert ops.last_impl("masked_mae_loss") == impl  # the public op runs this kernel
    (grad,) = torch.autograd.grad(fused * 2.5, leaf2)
    torch.testing.assert_close(fused.detach().cpu(), ref.detach().cpu(), rtol=1e-5, atol=0)
    shape = dict(alpha=0.3, p=p, planes=P // (p * p), weight_max=1.0 / (B * (L - masking.len_keep)), scale=2.5)
    assert_loss_grad_close(grad, ref_grad, kind="float32", **shape)
    assert (grad[masking.mask == 0] == 0).all()

    grad_masked = torch.randn(B, L - masking.len_keep, P, generator=gen(83)).to(dev)
    out = mae_loss.scatter_scaled_triton(grad_masked, torch.tensor(-1.5, device=dev), masking.ids_restore,
                                         out=nan((B, L, P), dev=dev))
    expected = torch.zeros(B, L, P, device=dev)
    expected.scatter_(1, masking.ids_masked[..., None].expand(-1, -1, P), -1.5 * grad_masked)
    close(out, expected, tol=(0, 0))


@pytest.mark.parametrize("impl", [TRITON])
def test_mae_loss_unsupported_patch_size_is_refused(impl):
    """p = 6 (p^2 = 36 is no tile size for tl.dot): the Triton kernel refuses when asked by name; "auto" then
    uses the reference."""
    dev = device(impl)
    pred, target = (torch.randn(3, 4, 36 * 5, generator=gen(s)).to(dev) for s in (21, 22))
    with pytest.raises(RuntimeError, match="cannot take these inputs"):
        ops.mae_loss(pred, target, patch_size=6, impl=impl)
