"""Properties of the plain-PyTorch reference ops (the oracle every fused kernel is tested against) and of the
dispatcher. Fresh random inputs, odd shapes (batch 3, 5 channels)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mae_fast import ops
from tests.helpers import assert_unit_std, images_with_spread, standardised_planes


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(B, C, H, dtype, seed=0):
    g = _gen(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (B, C, H, H), generator=g, dtype=torch.uint8)
    if dtype == torch.uint16:
        return torch.randint(0, 65536, (B, C, H, H), generator=g, dtype=torch.int32).to(torch.uint16)
    return torch.rand(B, C, H, H, generator=g, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [16, 49, 64, 1024])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_masking_keeps_int_L_times_one_minus_r(L, ratio):
    m = ops.random_masking(3, L, ratio, generator=_gen(L))
    K = int(L * (1 - ratio))
    assert m.len_keep == K
    assert m.ids_keep.shape == (3, K) and m.ids_masked.shape == (3, L - K)
    assert torch.equal(m.mask.sum(1), torch.full((3,), float(L - K)))


def test_masking_ids_restore_inverts_ids_shuffle():
    m = ops.random_masking(5, 77, 0.75, generator=_gen(1))
    rows = torch.arange(5)[:, None]
    assert torch.equal(m.ids_shuffle[rows, m.ids_restore], torch.arange(77).expand(5, 77))
    assert torch.equal(m.ids_restore[rows, m.ids_shuffle], torch.arange(77).expand(5, 77))
    # mask is 1 exactly at the tokens outside the kept prefix
    assert torch.equal(m.mask, (m.ids_restore >= m.len_keep).float())
    for b in range(5):  # every row is a permutation
        assert torch.equal(m.ids_shuffle[b].sort().values, torch.arange(77))


def test_masking_rejects_bad_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.random_masking(2, 10, 1.0)


def test_masked_patchify_seed_is_reproducible():
    images = _images(3, 5, 32, torch.uint8)
    a = ops.masked_patchify(images, 8, 0.75, seed=7, impl="reference")
    b = ops.masked_patchify(images, 8, 0.75, seed=7, impl="reference")
    c = ops.masked_patchify(images, 8, 0.75, seed=8, impl="reference")
    d = ops.masked_patchify(images, 8, 0.75, generator=_gen(7), impl="reference")
    assert torch.equal(a.masking.ids_shuffle, b.masking.ids_shuffle)
    assert torch.equal(a.masking.ids_shuffle, d.masking.ids_shuffle)
    assert not torch.equal(a.masking.ids_shuffle, c.masking.ids_shuffle)
    assert torch.equal(a.visible, b.visible) and torch.equal(a.target, b.target)
    with pytest.raises(ValueError, match="either generator or seed"):
        ops.masked_patchify(images, 8, 0.75, generator=_gen(7), seed=7)


# --------------------------------------------------------------------------------------------------------------
# patchify, standardisation, masked patchify
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
def test_patchify_unpatchify_round_trip(layout, p):
    x = torch.randn(3, 5, 4 * p, 4 * p, generator=_gen(p))
    tokens = ops.patchify(x, p, layout)
    expected = (3, 16, p * p * 5) if layout == "standard" else (3, 5 * 16, p * p)
    assert tokens.shape == expected
    assert torch.equal(ops.unpatchify(tokens, p, 5, layout), x)


@pytest.mark.parametrize("layout", ops.LAYOUTS)
def test_patchify_token_order_matches_the_convention(layout):
    """standard: token (h, w) row-major, pixel (p, q, c); channel: token c*L + h*w + w, pixel (p, q)."""
    p, C, H = 8, 5, 24
    x = torch.randn(3, C, H, H, generator=_gen(3))
    tokens = ops.patchify(x, p, layout)
    g = H // p
    for b, c, hi, wi, pp, q in [(0, 0, 0, 0, 0, 0), (2, 4, 2, 1, 7, 3), (1, 3, 1, 2, 5, 6)]:
        pixel = x[b, c, hi * p + pp, wi * p + q]
        if layout == "standard":
            value = tokens[b, hi * g + wi, (pp * p + q) * C + c]
        else:
            value = tokens[b, c * g * g + hi * g + wi, pp * p + q]
        assert value == pixel


def test_standardize_equals_instance_norm():
    x = torch.rand(3, 5, 24, 40, generator=_gen(4)) * 3 + 1
    torch.testing.assert_close(ops.standardize(x, 1e-5), F.instance_norm(x, eps=1e-5), rtol=1e-5, atol=1e-5)


def test_to_unit_float_scales_and_rejects():
    assert ops.to_unit_float(torch.tensor([255], dtype=torch.uint8)).item() == 1.0
    assert ops.to_unit_float(torch.tensor([65535], dtype=torch.int32).to(torch.uint16)).item() == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ops.to_unit_float(torch.tensor([2.0]))
    with pytest.raises(TypeError, match="uint8, uint16"):
        ops.to_unit_float(torch.tensor([2], dtype=torch.int16))


@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
def test_masked_patchify_reference_gathers_standardised_tokens(layout, dtype):
    images = _images(3, 5, 32, dtype, seed=5)
    out = ops.masked_patchify(images, 8, 0.75, layout, generator=_gen(5), impl="reference")
    tokens = ops.patchify(ops.self_standardize(images), 8, layout)
    m = out.masking
    torch.testing.assert_close(out.visible, ops.gather_tokens(tokens, m.ids_keep))
    torch.testing.assert_close(out.target, ops.gather_tokens(tokens, m.ids_masked))
    # given statistics reproduce the computed ones
    stats = ops.channel_stats(ops.to_unit_float(images), ops.standardize_eps(dtype))
    again = ops.masked_patchify(images, 8, 0.75, layout, masking=m, stats=stats, impl="reference")
    torch.testing.assert_close(again.visible, out.visible, rtol=1e-5, atol=1e-5)


def test_masked_patchify_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ops.masked_patchify(_images(3, 5, 36, torch.uint8), 8, 0.75)
    with pytest.raises(ValueError, match="layout"):
        ops.masked_patchify(_images(3, 5, 32, torch.uint8), 8, 0.75, layout="columns")
    with pytest.raises(ValueError, match="masking covers"):
        ops.masked_patchify(_images(3, 5, 32, torch.uint8), 8, 0.75, masking=ops.random_masking(3, 10, 0.5))
    bad = ops.random_masking(3, 16, 0.75, generator=_gen(2))
    bad.ids_restore = bad.ids_restore.flip(1)
    with pytest.raises(ValueError, match="inverse permutation"):
        ops.masked_patchify(_images(3, 5, 32, torch.uint8), 8, 0.75, masking=bad)
    bad.ids_restore = bad.ids_restore + 100
    with pytest.raises(ValueError, match="outside"):
        ops.masked_patchify(_images(3, 5, 32, torch.uint8), 8, 0.75, masking=bad)


# --------------------------------------------------------------------------------------------------------------
# MAE loss: MSE + Fourier
# --------------------------------------------------------------------------------------------------------------

def _fourier_loss_independent(pred, target, p, layout):
    """Per-token mean over channels and frequencies of | |fft2(pred plane)| - |fft2(target plane)| |, planes cut
    out pixel by pixel from the documented token layout (no reshape shared with the library)."""
    B, N, P = pred.shape
    C = P // (p * p) if layout == "standard" else 1
    out = torch.zeros(B, N, dtype=torch.float64)
    r, q = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    for c in range(C):
        index = (r * p + q) * C + c  # (p, q, c) order; C = 1 gives (p, q)
        xp = pred.double()[:, :, index]     # (B, N, p, p)
        xt = target.double()[:, :, index]
        d = (torch.fft.fft2(xp).abs() - torch.fft.fft2(xt).abs()).abs()
        out += d.mean(dim=(-2, -1)) / C
    return out


@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
def test_fourier_loss_matches_independent_fft2(layout, p):
    P = p * p * (5 if layout == "standard" else 1)
    pred = torch.randn(3, 7, P, generator=_gen(p), dtype=torch.float64)
    target = torch.randn(3, 7, P, generator=_gen(p + 1), dtype=torch.float64)
    expected = _fourier_loss_independent(pred, target, p, layout).mean()
    got = ops.mae_loss(pred, target, patch_size=p, layout=layout, alpha=1.0, impl="reference")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    mse = ops.mae_loss(pred, target, patch_size=p, layout=layout, alpha=0.0, impl="reference")
    torch.testing.assert_close(mse, ((pred - target) ** 2).mean(), rtol=1e-12, atol=0)


def test_loss_mask_averages_over_masked_tokens():
    pred = torch.randn(3, 7, 64, generator=_gen(10))
    target = torch.randn(3, 7, 64, generator=_gen(11))
    mask = (torch.rand(3, 7, generator=_gen(12)) > 0.5).float()
    per_token = torch.stack([
        ops.mae_loss(pred[b:b + 1, n:n + 1], target[b:b + 1, n:n + 1], patch_size=8, layout="channel",
                     impl="reference")
        for b in range(3) for n in range(7)
    ]).reshape(3, 7)
    expected = (per_token * mask).sum() / mask.sum()
    got = ops.mae_loss(pred, target, mask, patch_size=8, layout="channel", impl="reference")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("layout", ops.LAYOUTS)
def test_loss_is_zero_for_identical_inputs(layout):
    P = 64 * (5 if layout == "standard" else 1)
    pred = torch.randn(3, 7, P, generator=_gen(13), requires_grad=True)
    loss = ops.mae_loss(pred, pred.detach().clone(), patch_size=8, layout=layout, impl="reference")
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(grad).all() and grad.abs().max() == 0


def test_loss_gradient_is_finite_where_the_spectrum_vanishes():
    """A zero prediction has |F| = 0 at every frequency: d|F| is defined as 0 there (as torch.abs), no NaN."""
    target = torch.randn(3, 7, 64 * 5, generator=_gen(14))
    pred = torch.zeros_like(target, requires_grad=True)
    loss = ops.mae_loss(pred, target, patch_size=8, impl="reference")
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("layout", ops.LAYOUTS)
def test_loss_gradcheck_float64(layout):
    p = 4
    P = p * p * (3 if layout == "standard" else 1)
    pred = torch.randn(1, 3, P, generator=_gen(15), dtype=torch.float64, requires_grad=True)
    target = torch.randn(1, 3, P, generator=_gen(16), dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: ops.mae_loss(x, target, mask, patch_size=p, layout=layout, alpha=0.3, impl="reference"), (pred,)
    )


def test_unshuffle_reference_gradcheck_float64():
    B, K, L, D = 2, 3, 7, 5
    x = torch.randn(B, K, D, generator=_gen(17), dtype=torch.float64, requires_grad=True)
    token = torch.randn(D, generator=_gen(18), dtype=torch.float64, requires_grad=True)
    pos = torch.randn(L, D, generator=_gen(19), dtype=torch.float64, requires_grad=True)
    ids = torch.argsort(torch.rand(B, L, generator=_gen(20)), dim=1)
    assert torch.autograd.gradcheck(lambda a, t, q: ops.unshuffle(a, t, ids, q, impl="reference"), (x, token, pos))


def test_loss_rejects_bad_shapes():
    a = torch.randn(2, 3, 64)
    with pytest.raises(ValueError, match="differ in shape"):
        ops.mae_loss(a, torch.randn(2, 3, 128), patch_size=8)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ops.mae_loss(torch.randn(2, 3, 65), torch.randn(2, 3, 65), patch_size=8)
    with pytest.raises(ValueError, match="channel-layout"):
        ops.mae_loss(torch.randn(2, 3, 128), torch.randn(2, 3, 128), patch_size=8, layout="channel")


# --------------------------------------------------------------------------------------------------------------
# Lion reference and dispatch
# --------------------------------------------------------------------------------------------------------------

def test_lion_reference_matches_the_formula_in_float64():
    g = _gen(21)
    p, grad, m = (torch.randn(1000, generator=g) for _ in range(3))
    lr, b1, b2, wd = 1e-2, 0.9, 0.95, 0.05
    p64, g64, m64 = p.double(), grad.double(), m.double()
    expected_p = p64 * (1 - lr * wd) - lr * torch.sign(b1 * m64 + (1 - b1) * g64)
    expected_m = b2 * m64 + (1 - b2) * g64
    ops.lion_update([p], [grad], [m], lr=lr, beta1=b1, beta2=b2, weight_decay=wd, impl="reference")
    torch.testing.assert_close(p.double(), expected_p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.double(), expected_m, rtol=1e-6, atol=1e-7)


def test_dispatch_falls_back_on_unsupported_input_and_reports_it():
    pred = torch.randn(2, 3, 64, dtype=torch.float64)
    ops.mae_loss(pred, pred + 1, patch_size=8, layout="channel")  # float64: no fused kernel takes it
    assert ops.last_impl("mae_loss") == "reference"
    for impl in ops.available_impls("mae_loss"):
        if impl in ("cpp", "triton"):
            with pytest.raises(RuntimeError, match="cannot take these inputs"):
                ops.mae_loss(pred, pred + 1, patch_size=8, layout="channel", impl=impl)


def test_dispatch_env_override(monkeypatch):
    monkeypatch.setenv("MAE_FAST_IMPL", "reference")
    x = torch.randn(2, 3, 64)
    ops.mae_loss(x, x + 1, patch_size=8, layout="channel")
    assert ops.last_impl("mae_loss") == "reference"
    monkeypatch.setenv("MAE_FAST_IMPL", "fastest")
    with pytest.raises(ValueError, match="MAE_FAST_IMPL"):
        ops.mae_loss(x, x + 1, patch_size=8, layout="channel")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.mae_loss(x, x + 1, patch_size=8, layout="channel", impl="fastest")


# 16-bit (and float) self-standardisation: unit std at every brightness (docs/DESIGN.md §2, self-standardise)
@pytest.mark.parametrize("brightness", [300, 3000, 30000, 62000])
@pytest.mark.parametrize("spread", [20, 200])
@pytest.mark.parametrize("dtype", [torch.uint16, torch.float32])
def test_16_bit_channels_standardise_to_unit_std_at_every_brightness(brightness, spread, dtype):
    images = images_with_spread(2, 3, 64, brightness, spread, seed=brightness + spread)
    if dtype == torch.float32:  # the same intensities as floats in [0, 1]
        images = images.to(torch.int32).float() / 65535.0
    assert_unit_std(ops.self_standardize(images))
    for layout in ops.LAYOUTS:
        out = ops.masked_patchify(images, 8, 0.75, layout, generator=_gen(1), impl="reference")
        assert_unit_std(standardised_planes(out, 8, 3, layout))
    # float32 pixels hold the 16-bit intensity to 2^-24: the standardised values match a float64 computation
    x = images.to(torch.int32).double() / 65535.0 if images.dtype == torch.uint16 else images.double()
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    exact = (x - x.mean(dim=(2, 3), keepdim=True)) / torch.sqrt(var + ops.standardize_eps(torch.uint16))
    torch.testing.assert_close(ops.self_standardize(images).double(), exact, rtol=0, atol=5e-4)


def test_8_bit_spread_of_20_counts_also_standardises_to_unit_std():
    assert_unit_std(ops.self_standardize(images_with_spread(2, 3, 64, 128, 20, dtype=torch.uint8, seed=3)))


# --------------------------------------------------------------------------------------------------------------
# masked_mae_loss: the loss of the full prediction on its masked tokens
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,p", [("standard", 8), ("channel", 16)])
def test_masked_mae_loss_reference_is_gather_then_mae_loss(layout, p):
    g = torch.Generator().manual_seed(3)
    B, L = 3, 7
    P = p * p * (3 if layout == "standard" else 1)
    masking = ops.random_masking(B, L, 0.6, generator=g)
    pred = torch.randn(B, L, P, generator=g, requires_grad=True)
    target = torch.randn(B, L - masking.len_keep, P, generator=g)
    loss = ops.masked_mae_loss(pred, target, masking, patch_size=p, layout=layout, alpha=0.3, impl="reference")
    assert ops.last_impl("masked_mae_loss") == "reference"
    (grad,) = torch.autograd.grad(loss, pred)
    pred2 = pred.detach().clone().requires_grad_()
    expected = ops.mae_loss(ops.gather_tokens(pred2, masking.ids_masked), target, patch_size=p, layout=layout,
                            alpha=0.3, impl="reference")
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, pred2.grad)
    visible = masking.ids_keep
    assert torch.all(torch.gather(grad, 1, visible.unsqueeze(-1).expand(-1, -1, P)) == 0)  # no loss on visible tokens


def test_masked_mae_loss_refuses_mismatched_shapes():
    masking = ops.random_masking(2, 8, 0.75)
    pred = torch.randn(2, 8, 64)
    with pytest.raises(ValueError, match="target must be"):
        ops.masked_mae_loss(pred, torch.randn(2, 8, 64), masking, patch_size=8)
    with pytest.raises(ValueError, match="masking covers"):
        ops.masked_mae_loss(torch.randn(2, 9, 64), torch.randn(2, 7, 64), masking, patch_size=8)
