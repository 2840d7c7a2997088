"""The masked patchify kernels (C++: csrc/masked_patchify.cpp; Triton: kernels/masked_patchify.py) against the
reference: fresh random inputs, odd shapes (batch 3, 5 channels), outputs poisoned with NaN before each call and
checked fully written. The C++ kernels at realistic sizes (256^2 crops), the Triton ones at interpreter sizes."""
from __future__ import annotations

import pytest
import torch

from mae_fast import ops
from mae_fast.ops.masked_patchify import KERNELS
from tests.helpers import assert_unit_std, images_with_spread, standardised_planes
from tests.kernels.cases import CPP, IMPLS, PATCHIFY_TOL, TRITON, close, device, gen, impl_cases, nan, runs_by_default

SIZE = {"cpp": 256, "triton": 32}  # image side of the main comparison


def _images(B, C, H, dtype, seed, dev="cpu"):
    g = gen(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (B, C, H, H), generator=g, dtype=torch.uint8)
    elif dtype in (torch.uint16, torch.int32):
        x = torch.randint(0, 65536, (B, C, H, H), generator=g, dtype=torch.int32).to(dtype)
    else:
        x = torch.rand(B, C, H, H, generator=g).to(dtype)
    return x.to(dev)


def _write(impl, images, p, masking, layout, visible, target, stats=None):
    """The kernel alone, into the given (poisoned) buffers."""
    mean, rstd = (None, None) if stats is None else stats
    KERNELS[impl](images, mean, rstd, masking.ids_restore.contiguous(), masking.len_keep, p, layout == "channel",
                  visible, target)
    return ops.MaskedPatches(visible, target, masking)


def _channel_stats(impl):
    if impl == "cpp":
        from mae_fast.ops.cpp import channel_stats_cpp

        return channel_stats_cpp
    from mae_fast.kernels.masked_patchify import channel_stats_triton

    return channel_stats_triton


@pytest.mark.parametrize("impl", IMPLS)
def test_kernels_are_registered(impl):
    for op in ("masked_patchify", "unshuffle", "mae_loss", "masked_mae_loss", "lion_update"):
        assert impl in ops.available_impls(op)
    if runs_by_default(impl):
        x = torch.randn(3, 4, 64, device=device(impl))
        ops.mae_loss(x, x + 1, patch_size=8, layout="channel")
        assert ops.last_impl("mae_loss") == impl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("p", [8, 16])
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_masked_patchify_matches_reference(impl, layout, p, ratio):
    dev, H = device(impl), SIZE[impl]
    images = _images(3, 5, H, torch.uint16, seed=p + int(100 * ratio), dev=dev)
    L = (H // p) ** 2 * (5 if layout == "channel" else 1)
    masking = ops.random_masking(3, L, ratio, device=dev, generator=gen(p, dev))
    ref = ops.masked_patchify(images, p, ratio, layout, masking=masking, impl="reference")
    visible, target = nan(ref.visible.shape, dev=dev), nan(ref.target.shape, dev=dev)
    out = _write(impl, images, p, masking, layout, visible, target)
    assert out.visible is visible and out.target is target
    close(visible, ref.visible, tol=PATCHIFY_TOL)
    close(target, ref.target, tol=PATCHIFY_TOL)
    if runs_by_default(impl):
        assert ops.masked_patchify(images, p, ratio, layout, masking=masking).visible.shape == ref.visible.shape
        assert ops.last_impl("masked_patchify") == impl


@pytest.mark.parametrize("impl,dtype", impl_cases({
    "cpp": [(torch.uint8,), (torch.uint16,), (torch.int32,), (torch.float32,), (torch.bfloat16,)],
    "triton": [(torch.uint8,), (torch.float32,)]}))
def test_masked_patchify_pixel_dtypes_and_strides(impl, dtype):
    dev, H = device(impl), {"cpp": 64, "triton": 32}[impl]
    images = _images(3, 5, H, dtype, seed=3, dev=dev)
    images = images.contiguous(memory_format=torch.channels_last)  # non-contiguous NCHW strides
    masking = ops.random_masking(3, (H // 8) ** 2, 0.75, device=dev, generator=gen(4, dev))
    ref = ops.masked_patchify(images, 8, 0.75, masking=masking, impl="reference")
    out = _write(impl, images, 8, masking, "standard", nan(ref.visible.shape, dev=dev), nan(ref.target.shape, dev=dev))
    close(out.visible, ref.visible, tol=PATCHIFY_TOL)
    close(out.target, ref.target, tol=PATCHIFY_TOL)


# (batch, channels, side, brightness, layout, p) per implementation: the interpreter takes the smaller images
_SPREAD_CASES = {
    "cpp": [(3, 5, 64, b, layout, p) for b in (300, 3000, 30000, 62000) for layout in ops.LAYOUTS for p in (8, 16)],
    "triton": [(2, 3, 32, b, layout, 8) for b in (300, 30000, 62000) for layout in ops.LAYOUTS],
}


@pytest.mark.parametrize("impl,B,C,H,brightness,layout,p", impl_cases(_SPREAD_CASES))
def test_16_bit_channels_standardise_to_unit_std_at_every_brightness(impl, B, C, H, brightness, layout, p):
    dev = device(impl)
    images = images_with_spread(B, C, H, brightness, 20, seed=brightness + p).to(dev)  # std 20 counts
    L = (H // p) ** 2 * (C if layout == "channel" else 1)
    masking = ops.random_masking(B, L, 0.75, device=dev, generator=gen(p, dev))
    ref = ops.masked_patchify(images, p, 0.75, layout, masking=masking, impl="reference")
    out = _write(impl, images, p, masking, layout, nan(ref.visible.shape, dev=dev), nan(ref.target.shape, dev=dev))
    assert_unit_std(standardised_planes(out, p, C, layout))
    # float32 rounding of x / 65535 at a bright level is ~1e-4 of a 20-count std: compared absolutely
    torch.testing.assert_close(out.visible.cpu(), ref.visible.cpu(), rtol=0, atol=1e-3)
    torch.testing.assert_close(out.target.cpu(), ref.target.cpu(), rtol=0, atol=1e-3)


# image shape, and (rtol of the mean, rtol of rstd): the C++ kernel sums exactly; Triton merges per-tile
# (mean, M2) in float32 (Chan), which keeps it accurate where E[x^2] - E[x]^2 would cancel
STATS_CASES = {"cpp": [((3, 5, 256, 256), 1e-7, 1e-6)], "triton": [((3, 5, 48, 40), 1e-6, 1e-4)]}


@pytest.mark.parametrize("impl,shape,mean_rtol,rstd_rtol", impl_cases(STATS_CASES))
def test_channel_stats_precise_on_low_contrast_16_bit(impl, shape, mean_rtol, rstd_rtol):
    """A bright plane with tiny variation (mean 0.6, std 1e-4 of full scale) needs exact sums."""
    base = torch.randint(39300, 39310, shape, generator=gen(5), dtype=torch.int32)
    images = base.to(torch.uint16).to(device(impl))
    mean, rstd = _channel_stats(impl)(images)
    x = base.double() / 65535.0  # exact: float32 x/65535 would move the variance by ~1e-5 at this spread
    var = x.var(dim=(2, 3), unbiased=False)
    torch.testing.assert_close(mean.cpu().double(), x.mean(dim=(2, 3)), rtol=mean_rtol, atol=0)
    torch.testing.assert_close(rstd.cpu().double(), torch.rsqrt(var + ops.standardize_eps(torch.uint16)),
                               rtol=rstd_rtol, atol=0)


@pytest.mark.parametrize("impl", [CPP])
def test_masked_patchify_given_stats(impl):
    images = _images(3, 5, 64, torch.uint8, seed=6)
    masking = ops.random_masking(3, 64, 0.75, generator=gen(6))
    stats = (torch.rand(3, 5, generator=gen(7)), torch.rand(3, 5, generator=gen(8)) + 0.5)
    ref = ops.masked_patchify(images, 8, 0.75, masking=masking, stats=stats, impl="reference")
    out = ops.masked_patchify(images, 8, 0.75, masking=masking, stats=stats, impl=impl)
    close(out.visible, ref.visible, tol=PATCHIFY_TOL)
    close(out.target, ref.target, tol=PATCHIFY_TOL)


@pytest.mark.parametrize("impl", [CPP])
def test_masked_patchify_out_dtype_and_autocast(impl):
    """Visible tokens in the requested dtype (the C++ kernel writes float32, the op casts), by default in the
    autocast dtype; the target stays float32; the reference rounds the same float32 values."""
    images = _images(2, 3, 32, torch.uint16, seed=9)
    masking = ops.random_masking(2, 16, 0.75, generator=gen(9))
    ref = ops.masked_patchify(images, 8, 0.75, masking=masking, impl="reference")
    ref_bf16 = ops.masked_patchify(images, 8, 0.75, masking=masking, impl="reference", out_dtype=torch.bfloat16)
    assert torch.equal(ref_bf16.visible, ref.visible.to(torch.bfloat16)) and ref_bf16.target.dtype == torch.float32
    out = ops.masked_patchify(images, 8, 0.75, masking=masking, impl=impl, out_dtype=torch.bfloat16)
    assert out.visible.dtype == torch.bfloat16 and out.target.dtype == torch.float32
    close(out.visible, ref.visible, tol=(2**-8, 1e-6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ops.masked_patchify(images, 8, 0.75, masking=masking, impl=impl)
    assert auto.visible.dtype == torch.bfloat16 and torch.equal(auto.visible, out.visible)
    assert ops.masked_patchify(images, 8, 0.75, masking=masking, impl=impl).visible.dtype == torch.float32


# every layout, patch size and output dtype, in four cases rather than eight (the interpreter is slow; the output
# dtype changes only the final store)
@pytest.mark.parametrize("impl", [TRITON])
@pytest.mark.parametrize("layout, p, out_dtype", [
    ("standard", 8, torch.float32), ("standard", 16, torch.bfloat16),
    ("channel", 8, torch.bfloat16), ("channel", 16, torch.float32),
])
def test_masked_patchify_chunks_odd_shapes_and_out_dtype(impl, layout, p, out_dtype, monkeypatch):
    """48 x 48 images: token blocks that do not divide the row (column masks); L2 chunks of 2 images over a batch of
    3 (the stats of chunk 2 must not mix with chunk 1's); statistics merged from 12 tiles per plane of a row ramp
    (tile means differ: the merge's between-tile term matters); visible written in `out_dtype` (the interpreter
    truncates to bfloat16 where a GPU rounds: within one bfloat16 ulp); statistics passed in skip the stats launch."""
    from mae_fast.kernels import masked_patchify

    dev = device(impl)
    ramp = torch.arange(48, dtype=torch.int32)[:, None] * 800
    images = (_images(3, 5, 48, torch.uint16, seed=50 + p).to(torch.int32) // 4 + ramp).to(torch.uint16)
    images = images.to(dev)
    assert 48 // p % masked_patchify.block_tokens(p, 5, 48 // p, layout == "channel")  # an uneven last block
    monkeypatch.setattr(masked_patchify, "L2_CHUNK_BYTES", 2 * images[0].numel() * 2)
    monkeypatch.setattr(masked_patchify, "STATS_TILE", 256)  # 4 x 64 tiles: 12 per plane
    assert masked_patchify._stats_tile(48, 48) == (4, 64)
    assert masked_patchify.chunk_images(images) == 2
    L = (48 // p) ** 2 * (5 if layout == "channel" else 1)
    masking = ops.random_masking(3, L, 0.75, device=dev, generator=gen(p, dev))
    ref = ops.masked_patchify(images, p, 0.75, layout, masking=masking, impl="reference")
    tol = dict(tol=(2e-6, 2e-6)) if out_dtype == torch.float32 else dict(tol=(2**-7, 2**-7 / 8))
    for stats in (None, masked_patchify.channel_stats_triton(images)):
        visible, target = nan(ref.visible.shape, out_dtype, dev), nan(ref.target.shape, dev=dev)
        out = _write(impl, images, p, masking, layout, visible, target, stats)
        assert out.visible is visible and visible.dtype == out_dtype and target.dtype == torch.float32
        close(visible, ref.visible, **tol)
        close(target, ref.target, tol=(2e-6, 2e-6))
    fused = ops.masked_patchify(images, p, 0.75, layout, masking=masking, impl=impl, out_dtype=out_dtype)
    assert fused.visible.dtype == out_dtype
    close(fused.visible, ref.visible, **tol)


@pytest.mark.parametrize("impl", [TRITON])
def test_masked_patchify_visible_in_autocast_dtype(impl):
    dev = device(impl)
    images = _images(2, 3, 32, torch.uint8, seed=60, dev=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        out = ops.masked_patchify(images, 8, 0.75, impl=impl)
        ref = ops.masked_patchify(images, 8, 0.75, masking=out.masking, impl="reference")
    assert out.visible.dtype == ref.visible.dtype == torch.bfloat16 and out.target.dtype == torch.float32
    close(out.visible, ref.visible, tol=(2**-7, 2**-7 / 8))
