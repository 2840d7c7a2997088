"""The channel-batched CA-MAE decoder against the per-channel loop it replaces (OpenPhenom's computation: for each
channel the shared cross-attention on that channel's queries, the shared MLP, then that channel's own stack of
`Block`s, one module call after another). Forward and every parameter's gradient, float64 and float32, odd shapes,
with and without activation checkpointing; the parameter names (OpenPhenom's checkpoint keys) stay per channel."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from mae_fast import ops
from mae_fast.compiling import compile_blocks, repeated_blocks, selective_checkpointing
from mae_fast.models import MaskedAutoencoder, model_config
from mae_fast.models.mae import Block, CAMAEDecoder, stack_block_weights, stacked_block_forward


def _loop_decoder(dec: CAMAEDecoder, x, ids_restore, in_chans):
    """The reference: one channel at a time, through the decoder's own modules."""
    full = ops.unshuffle(x[:, 1:], dec.mask_token, ids_restore, dec.pos_embed[0, 1:])
    B, N, Dd = full.shape
    L = N // in_chans
    full = full + torch.cat([t.expand(1, L, Dd) for t in dec.modality_tokens], dim=1)
    context = dec.context_norm(full)
    outs = []
    for c, stack in enumerate(dec.decoders):
        y = dec.cross_attention(dec.query_norm(full[:, c * L:(c + 1) * L]), context)
        y = y + dec.mlp(dec.out_norm(y))
        for blk in stack:
            y = blk(y)
        outs.append(y)
    return torch.cat(outs, dim=1)


def _perturbed_decoder(cfg, dtype, seed=0):
    """A decoder whose every parameter (LayerNorm affines and biases included) is random and distinct per channel."""
    torch.manual_seed(seed)
    dec = CAMAEDecoder(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
    return dec


def _inputs(cfg, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C, L = cfg.in_chans, cfg.num_patches
    keep = int(C * L * (1 - cfg.mask_ratio))
    ids_restore = torch.argsort(torch.rand(batch, C * L, generator=g), dim=1)
    x = torch.randn(batch, 1 + keep, cfg.decoder_dim, generator=g, dtype=dtype)
    return x, ids_restore


CASES = [  # (in_chans, img_size, patch, decoder_dim, depth, heads, cross_heads, batch)
    (3, 48, 16, 32, 2, 4, 2, 3),
    (5, 40, 8, 24, 1, 3, 4, 2),     # odd channel count, 5x5 grid, head dim 8 / 6
    (2, 32, 8, 16, 3, 2, 8, 1),
]


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])


@pytest.mark.parametrize("case", CASES, ids=[f"C{c[0]}-p{c[2]}-d{c[3]}x{c[4]}" for c in CASES])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_batched_decoder_equals_the_channel_loop(case, dtype, tol, checkpointing, device):
    C, img, p, Dd, depth, heads, cross, batch = case
    cfg = model_config("camae_vit_micro_patch16_256", in_chans=C, img_size=img, patch_size=p, decoder_dim=Dd,
                     decoder_depth=depth, decoder_heads=heads, decoder_cross_heads=cross,
                     grad_checkpointing=checkpointing)
    dec = _perturbed_decoder(cfg, dtype).to(device)
    x, ids_restore = (t.to(device) for t in _inputs(cfg, batch, dtype))
    # a loss that weighs every output differently
    weight = torch.randn(batch, C * cfg.num_patches, Dd, dtype=dtype).to(device)

    def run(fn):
        dec.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        out = fn(dec, xg, ids_restore, C)
        (out * weight).sum().backward()
        grads = {n: q.grad.clone() for n, q in dec.named_parameters()}
        return out.detach(), xg.grad, grads

    out, gx, grads = run(lambda d, *a: d(*a))
    ref, gx_ref, grads_ref = run(_loop_decoder)
    assert out.shape == (batch, C * cfg.num_patches, Dd) and torch.isfinite(out).all()
    _assert_close(out, ref, tol, "output")
    _assert_close(gx, gx_ref, tol, "input gradient")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert grads_ref[name].abs().sum() > 0, name  # every parameter takes part
        _assert_close(grads[name], grads_ref[name], tol, name)


def _assert_close(actual, expected, tol, what):
    """Equal up to rounding: error within tol of the tensor's largest magnitude (summation order differs)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def test_stacked_block_is_each_channels_block():
    torch.manual_seed(0)
    C, B, N, D, heads = 3, 2, 7, 12, 3
    blocks = [Block(D, heads, norm_eps=1e-5) for _ in range(C)]
    with torch.no_grad():
        for blk in blocks:
            for q in blk.parameters():
                q.add_(0.2 * torch.randn_like(q))
    x = torch.randn(C, B, N, D)
    out = torch.full((C, B, N, D), float("nan"))
    out.copy_(stacked_block_forward(x, heads, 1e-5, *stack_block_weights(blocks)))
    for c, blk in enumerate(blocks):
        torch.testing.assert_close(out[c], blk(x[c]), rtol=1e-5, atol=1e-5)


def test_decoder_keeps_the_per_channel_parameter_names():
    cfg = model_config("camae_vit_micro_patch16_256", in_chans=3, img_size=32)
    keys = set(MaskedAutoencoder(cfg).state_dict())
    per_channel = {k for k in keys if k.startswith("decoder.decoders.")}
    # OpenPhenom's names: decoder.decoders.{channel}.{layer}.{Block parameter}
    block_keys = set(Block(cfg.decoder_dim, cfg.decoder_heads).state_dict())
    assert per_channel == {f"decoder.decoders.{c}.{i}.{k}" for c in range(3) for i in range(cfg.decoder_depth)
                           for k in block_keys}
    assert not any("channel_layers" in k for k in keys)  # the stacked layers own nothing


def test_the_stacked_layers_are_the_blocks_that_compile_checkpoint_and_shard():
    """repeated_blocks (regional compilation, selective checkpointing, FSDP units) lists the encoder's blocks and the
    decoder's channel-stacked layers -- the modules that run -- not the per-channel blocks they compute with."""
    model = MaskedAutoencoder(model_config("camae_vit_micro_patch16_256", in_chans=3, img_size=32))
    assert repeated_blocks(model) == list(model.encoder.blocks) + list(model.decoder.channel_layers)
    # a copy's stacked layers compute with the copy's blocks
    copied = copy.deepcopy(model).decoder
    for i, layer in enumerate(copied.channel_layers):
        assert all(a is b for a, b in zip(layer.blocks, [stack[i] for stack in copied.decoders], strict=True))


@pytest.mark.parametrize("transform", ["regional_compile", "selective_checkpointing"])
def test_block_transforms_keep_the_decoder_computation(transform):
    cfg = model_config("camae_vit_micro_patch16_256", in_chans=3, img_size=32, patch_size=8, decoder_dim=16,
                     decoder_depth=2, decoder_heads=2, decoder_cross_heads=2)
    dec = _perturbed_decoder(cfg, torch.float32)
    x, ids_restore = _inputs(cfg, 2, torch.float32)

    def run():
        dec.zero_grad(set_to_none=True)
        out = dec(x, ids_restore, 3)
        (out * out.detach()).sum().backward()
        return out.detach(), {n: q.grad.clone() for n, q in dec.named_parameters()}

    ref, ref_grads = run()
    torch._dynamo.reset()
    counters.clear()
    if transform == "regional_compile":
        assert compile_blocks(dec, backend="eager") == cfg.decoder_depth
    else:
        assert selective_checkpointing(dec) == cfg.decoder_depth
    out, grads = run()
    if transform == "regional_compile":
        assert all(layer._compiled_call_impl is not None for layer in dec.channel_layers)
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # traced, whole
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_decoder_refuses_another_channel_count():
    cfg = model_config("camae_vit_micro_patch16_256", in_chans=3, img_size=32)
    dec = CAMAEDecoder(cfg)
    x, ids_restore = _inputs(cfg, 1, torch.float32)
    with pytest.raises(ValueError, match="built for 3 channels, got 4"):
        dec(x, ids_restore, 4)
