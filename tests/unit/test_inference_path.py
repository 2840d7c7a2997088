"""Inference's front end and the encoder block's folded biases: `ops.standardized_tokens` (the fused masked-patchify
with nothing masked) equals standardise + patchify for every backend here, both layouts, p = 8 and 16, odd grids and
every pixel dtype; `embed` runs it; the block's addmm form equals the textbook formula."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mae_fast import ops
from mae_fast.models import MaskedAutoencoder, model_config
from mae_fast.models.mae import ParallelScalingBlock

FAST = [b for b in ("cpp", "triton") if b in ops.available_impls("masked_patchify")]


def _images(dtype, batch, channels, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        return torch.rand(batch, channels, size, size, generator=g)
    top = 256 if dtype == torch.uint8 else 65536
    return torch.randint(0, top, (batch, channels, size, size), generator=g, dtype=torch.int32).to(dtype)


@pytest.mark.parametrize("impl", FAST or [pytest.param("cpp", marks=pytest.mark.skip(reason="no fused backend"))])
@pytest.mark.parametrize("layout", ["standard", "channel"])
@pytest.mark.parametrize("patch_size,size", [(8, 40), (16, 48)])  # 5x5 and 3x3 grids
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
def test_standardized_tokens_fused_equals_reference(impl, layout, patch_size, size, dtype):
    images = _images(dtype, 3, 5, size)
    expected = ops.patchify(ops.self_standardize(images), patch_size, layout)
    got = ops.standardized_tokens(images, patch_size, layout, impl=impl)
    assert ops.last_impl("masked_patchify") == impl
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    ref = ops.standardized_tokens(images, patch_size, layout, impl="reference")
    assert ops.last_impl("masked_patchify") == "reference"
    torch.testing.assert_close(ref, expected)


def test_standardized_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ops.standardized_tokens(_images(torch.uint8, 1, 3, 20), 8)
    with pytest.raises(ValueError, match="layout"):
        ops.standardized_tokens(_images(torch.uint8, 1, 3, 16), 8, "diagonal")
    with pytest.raises(TypeError, match="uint8, uint16 or float"):
        ops.standardized_tokens(torch.zeros(1, 3, 16, 16, dtype=torch.int8), 8)


@pytest.mark.skipif(not FAST, reason="no fused masked_patchify backend here")
def test_embed_runs_the_fused_front_end():
    cfg = model_config("mae_vit_micro_patch16_256", img_size=64)
    model = MaskedAutoencoder(cfg).eval()
    model.embed(_images(torch.uint8, 2, cfg.in_chans, 64))
    assert ops.last_impl("masked_patchify") in FAST


def test_parallel_block_folded_biases_equal_the_formula():
    torch.manual_seed(0)
    blk = ParallelScalingBlock(32, 4, mlp_ratio=2.0, init_values=0.5).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # non-zero biases: a dropped bias changes the output
    x = torch.randn(3, 7, 32)
    B, N, D = x.shape
    h, q, k, v = torch.split(blk.in_proj(blk.in_norm(x)), blk.in_split, dim=-1)
    q = blk.q_norm(q.view(B, N, 4, 8)).transpose(1, 2)
    k = blk.k_norm(k.view(B, N, 4, 8)).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v.view(B, N, 4, 8).transpose(1, 2)).transpose(1, 2).reshape(B, N, D)
    y = blk.attn_out_proj(a) + blk.mlp_out_proj(F.gelu(h + blk.mlp_bias))
    torch.testing.assert_close(blk(x), x + blk.ls.gamma * y, atol=1e-5, rtol=1e-5)
    # gradients reach every parameter, the folded MLP bias included
    blk(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())
