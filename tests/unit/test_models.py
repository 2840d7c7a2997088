"""Models: parameter counts, shapes, masking plumbing, CA-MAE channel flexibility, bad input."""
import pytest
import torch

from mae_fast import attention, ops
from mae_fast.models import (
    MaskedAutoencoder,
    count_parameters,
    create_model,
    list_models,
    list_presets,
    model_config,
    sincos_pos_embed,
)

PAPER_ENCODER_PARAMS = {"small": 22e6, "base": 86e6, "large": 304e6}


@pytest.mark.parametrize("name", list_models("mae"))
def test_every_preset_parameter_count(name):
    cfg = model_config(name)
    with torch.device("meta"):
        model = MaskedAutoencoder(cfg)
    enc = count_parameters(model.encoder)
    size = name.split("_")[2]
    if size in PAPER_ENCODER_PARAMS:
        # CA-MAE's shared 1-channel patch projection is C times smaller than the standard one
        tolerance = 0.05 if cfg.channel_agnostic else 0.03
        assert abs(enc - PAPER_ENCODER_PARAMS[size]) / PAPER_ENCODER_PARAMS[size] < tolerance, enc
    if not cfg.channel_agnostic and size != "micro":
        dec = count_parameters(model.decoder) + count_parameters(model.encoder_decoder_proj) \
            + count_parameters(model.decoder_pred)
        dec_blocks = count_parameters(model.decoder)
        assert abs(dec_blocks - 25.2e6) / 25.2e6 < 0.03, dec_blocks
        assert dec > dec_blocks
    assert name in list_presets()


def test_preset_details_match_the_paper():
    from mae_fast.training.recipes import optimizer_recipe  # the optimiser settings are the training side's

    large, large_opt = model_config("mae_vit_large_patch8_256"), optimizer_recipe("mae_vit_large_patch8_256")
    assert (large.embed_dim, large.depth, large.num_heads, large.patch_size) == (1024, 24, 16, 8)
    assert large.drop_path == 0.3 and large_opt.lr == 3e-5
    small, small_opt = model_config("mae_vit_small_patch16_256"), optimizer_recipe("mae_vit_small_patch16_256")
    assert small.drop_path == 0.1 and small_opt.lr == 1e-4 and small_opt.betas == (0.9, 0.95)
    assert small_opt.weight_decay == 0.05 and small.mask_ratio == 0.75 and small.fourier_alpha == 0.01
    model = create_model("mae_vit_micro_patch16_256")
    blk = model.encoder.blocks[-1]
    assert torch.allclose(blk.ls.gamma, torch.full_like(blk.ls.gamma, 1e-4))
    assert blk.in_proj.bias is None and blk.q_norm.eps == 1e-6
    rates = [b.drop_path.p for b in create_model("mae_vit_small_patch16_256", depth=3).encoder.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1])


def test_one_registry_for_every_family():
    """timm's pattern: register_model (a config, or a decorated function named as its preset), create_model builds
    any preset of any family, list_models filters by family and name pattern; a name is registered once."""
    from mae_fast.models import MAEConfig, register_model
    from mae_fast.models.registry import _PRESETS

    assert set(list_models()) == set(list_models("mae")) | set(list_models("baseline"))
    assert list_presets() == list_models("mae") and "munet_m_256" in list_models("munet")
    assert list_models("mae", "camae_*_patch8_256") == [n for n in list_presets() if n.startswith("camae")
                                                         and n.endswith("patch8_256")]
    try:
        @register_model
        def mae_vit_test_registry_256():
            return MAEConfig("mae_vit_test_registry_256", img_size=32, embed_dim=24, depth=1, num_heads=2,
                             decoder_dim=16, decoder_depth=1, decoder_heads=2)

        assert "mae_vit_test_registry_256" in list_models("mae")
        model = create_model("mae_vit_test_registry_256", in_chans=3)
        assert isinstance(model, MaskedAutoencoder) and model.cfg.in_chans == 3
        with pytest.raises(ValueError, match="registered already"):
            register_model(model_config("mae_vit_test_registry_256"))
        with pytest.raises(ValueError, match="returns a config named"):
            register_model(lambda: MAEConfig("other"))
    finally:
        _PRESETS.pop("mae_vit_test_registry_256", None)


def test_unknown_preset_and_key_are_clear_errors():
    with pytest.raises(KeyError, match="available presets: .*mae_vit_large_patch8_256"):
        model_config("mae_vit_huge_patch14_256")
    with pytest.raises(ValueError, match="unknown config keys \\['depht'\\]"):
        model_config("mae_vit_small_patch16_256", depht=3)


def test_sincos_positions():
    pos = sincos_pos_embed(32, 4, channels=3)
    assert pos.shape == (1, 1 + 3 * 16, 32)
    assert torch.all(pos[0, 0] == 0)
    assert torch.equal(pos[0, 1:17], pos[0, 17:33])          # repeated per channel
    assert len({tuple(r.tolist()) for r in pos[0, 1:17]}) == 16  # distinct per position


def _small(name, **kw):
    torch.manual_seed(0)
    return create_model(name, img_size=64, **kw)


@pytest.mark.parametrize("name,patch", [("mae_vit_micro_patch16_256", 16), ("mae_vit_micro_patch8_256", 8),
                                        ("camae_vit_micro_patch16_256", 16), ("camae_vit_micro_patch8_256", 8)])
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_forward_shapes_and_backward(name, patch, ratio):
    C = 5
    model = _small(name, in_chans=C)
    x = torch.randint(0, 256, (3, C, 64, 64), dtype=torch.uint8)
    out = model(x, mask_ratio=ratio)
    L_spatial = (64 // patch) ** 2
    L = L_spatial * (C if model.cfg.channel_agnostic else 1)
    P = patch * patch * (1 if model.cfg.channel_agnostic else C)
    keep = int(L * (1 - ratio))
    assert out.pred.shape == (3, L, P)
    assert out.target.shape == (3, L - keep, P)
    assert out.masking.mask.shape == (3, L) and int(out.masking.mask[0].sum()) == L - keep
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_embed_standard_and_channel_agnostic_channels():
    model = _small("mae_vit_micro_patch16_256").eval()
    x = torch.randint(0, 65536, (2, 6, 64, 64), dtype=torch.int32).to(torch.uint16)
    assert model.embed(x).shape == (2, 192)
    with pytest.raises(ValueError, match="per-channel embeddings need a channel-agnostic"):
        model.embed(x, per_channel=True)
    ca = _small("camae_vit_micro_patch16_256").eval()
    for C in (1, 3, 6, 11):
        xc = torch.randint(0, 256, (2, C, 64, 64), dtype=torch.uint8)
        assert ca.embed(xc).shape == (2, 192)
        assert ca.embed(xc, per_channel=True).shape == (2, C * 192)
    with pytest.raises(ValueError, match="1..11 channels"):
        ca.embed(torch.randint(0, 256, (1, 12, 64, 64), dtype=torch.uint8))


def test_embed_is_mean_of_non_cls_tokens_and_deterministic():
    model = _small("mae_vit_micro_patch16_256").eval()
    x = torch.randint(0, 256, (2, 6, 64, 64), dtype=torch.uint8)
    tokens = ops.patchify(ops.self_standardize(x), 16)
    seq = model.encoder.forward_tokens(tokens)
    assert torch.allclose(model.embed(x), seq[:, 1:].mean(1), atol=1e-6)
    assert torch.equal(model.embed(x), model.embed(x))


@pytest.mark.parametrize("name, per_channel", [("mae_vit_micro_patch16_256", False),
                                               ("camae_vit_micro_patch16_256", True)])
def test_block_embeddings_pool_each_blocks_output(name, per_channel):
    """embed(blocks=): each block's tokens through the final norm, pooled as the plain embedding; the last block is
    the plain embedding, a block of a shallower model with the same weights is that model's embedding."""
    model = _small(name).eval()
    depth = model.cfg.depth
    x = torch.randint(0, 256, (3, 6, 64, 64), dtype=torch.uint8)
    every = model.embed(x, per_channel=per_channel, blocks=list(range(1, depth + 1)))
    plain = model.embed(x, per_channel=per_channel)
    assert every.shape == (3, depth, plain.shape[1])
    torch.testing.assert_close(every[:, -1], plain, rtol=0, atol=0)
    shallow = _small(name, depth=2).eval()
    shallow.load_state_dict(model.state_dict(), strict=False)  # blocks 1-2 and the final norm
    torch.testing.assert_close(model.embed(x, per_channel=per_channel, blocks=[2])[:, 0],
                               shallow.embed(x, per_channel=per_channel), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(every[:, 0], every[:, 1])
    torch.testing.assert_close(model.embed(x, per_channel=per_channel, blocks=[3, 1, 3]), every[:, [0, 2]])
    for bad in ([0], [depth + 1], []):
        with pytest.raises(ValueError, match=f"block numbers 1..{depth}"):
            model.embed(x, blocks=bad)


def test_uint8_and_uint16_inputs_are_self_standardised_alike():
    model = _small("mae_vit_micro_patch16_256").eval()
    x8 = torch.randint(0, 256, (2, 6, 64, 64), dtype=torch.uint8)
    x16 = (x8.to(torch.int32) * 257).to(torch.uint16)  # the same intensities at 16 bits
    # the standardised inputs differ only through each bit depth's eps (1 - rstd ratio ~ 6e-5 at this spread)
    torch.testing.assert_close(model.embed(x8), model.embed(x16), rtol=0, atol=5e-4)


def test_masking_is_reproducible_by_generator():
    model = _small("mae_vit_micro_patch16_256")
    x = torch.randint(0, 256, (2, 6, 64, 64), dtype=torch.uint8)
    a = model(x, generator=torch.Generator().manual_seed(3))
    b = model(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.masking.ids_shuffle, b.masking.ids_shuffle)
    model.eval()
    assert torch.equal(model(x, generator=torch.Generator().manual_seed(3)).loss,
                       model(x, generator=torch.Generator().manual_seed(3)).loss)


@pytest.mark.parametrize("shape,dtype,match", [
    ((2, 5, 64, 64), torch.uint8, "expects 6 channels, got 5"),
    ((2, 6, 64, 48), torch.uint8, "must be square"),
    ((2, 6, 32, 32), torch.uint8, "must be 64x64 crops"),
    ((6, 64, 64), torch.uint8, "must be \\(B, C, H, W\\)"),
])
def test_bad_image_shapes(shape, dtype, match):
    model = _small("mae_vit_micro_patch16_256")
    x = torch.randint(0, 200, shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_float_input_outside_unit_range_is_refused():
    model = _small("mae_vit_micro_patch16_256")
    x = torch.rand(2, 6, 64, 64) * 255
    with pytest.raises(ValueError, match="scaled to \\[0, 1\\]"):
        model(x)
    model(torch.rand(2, 6, 64, 64))  # in range: fine


def test_attention_reports_backend():
    model = _small("mae_vit_micro_patch16_256")
    model(torch.randint(0, 256, (1, 6, 64, 64), dtype=torch.uint8))
    assert attention.last_backend() == "sdpa"  # CPU float32 never takes flash_attn


def test_gradient_checkpointing_gives_same_gradients():
    x = torch.randint(0, 256, (2, 6, 64, 64), dtype=torch.uint8)
    grads = []
    for ckpt in (False, True):
        model = _small("mae_vit_micro_patch16_256", grad_checkpointing=ckpt, drop_path=0.0)
        model(x, generator=torch.Generator().manual_seed(0)).loss.backward()
        grads.append(model.encoder.patch_embed.proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_decoder_places_the_class_token_in_the_unshuffle(x_dtype):
    """MAEDecoder's blocks get what unshuffle + torch.cat used to build -- the class token + its position, then every
    patch token in original order + its position -- in the promoted dtype, with no cat: bitwise in float32; from
    bf16 tokens (autocast) a float32 sequence where each token is added to its float32 position once (the former
    path rounded that sum to bf16 first, so it agrees within bf16 rounding)."""
    model = _small("mae_vit_micro_patch16_256")
    dec, Dd, L = model.decoder, model.cfg.decoder_dim, model.cfg.num_patches
    with torch.no_grad():
        dec.mask_token.normal_()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1 + L // 4, Dd, generator=g).to(x_dtype)
    ids = torch.argsort(torch.rand(2, L, generator=g), dim=1)
    seen = []
    dec.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    dec(x, ids, model.cfg.in_chans)
    assert ops.last_impl("unshuffle") == "cpp" or "cpp" not in ops.available_impls("unshuffle")

    def cat_path(tokens, out_dtype=None):
        full = ops.unshuffle(tokens[:, 1:], dec.mask_token, ids, dec.pos_embed[0, 1:], impl="reference",
                             out_dtype=out_dtype)
        return torch.cat([tokens[:, :1] + dec.pos_embed[:, :1], full], dim=1)

    seq = seen[0]
    assert seq.dtype == torch.float32 and seq.shape == (2, 1 + L, Dd)
    assert torch.equal(seq, cat_path(x.float()))
    if x_dtype == torch.bfloat16:
        former = cat_path(x, out_dtype=torch.bfloat16)  # the former op's output stayed in x's dtype
        assert former.dtype == torch.float32 and not torch.equal(seq, former)
        torch.testing.assert_close(seq, former, rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("name", ["mae_vit_micro_patch16_256", "camae_vit_micro_patch16_256"])
def test_encoder_feature_api_trains_and_equals_embed(name):
    # fine-tuning: forward_features / forward_head (timm's pair) carry gradients to every encoder weight and give
    # what the no-grad `embed` gives
    torch.manual_seed(0)
    model = create_model(name, img_size=32, in_chans=3, drop_path=0.0)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tokens = model.encoder.forward_features(x)
    assert tokens.shape == (2, 1 + model.cfg.tokens(3), model.encoder.num_features) and tokens.requires_grad
    features = model.encoder.forward_head(tokens)
    head = torch.nn.Linear(model.encoder.num_features, 4)
    torch.nn.functional.cross_entropy(head(features), torch.tensor([1, 3])).backward()
    missing = [n for n, p in model.encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert head.weight.grad is not None and model.decoder_pred.weight.grad is None  # the decoder is not used
    embedded = model.embed(x)
    assert not embedded.requires_grad
    torch.testing.assert_close(features.detach(), embedded, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.encoder(x), embedded, rtol=1e-6, atol=1e-6)
    if model.cfg.channel_agnostic:
        per_channel = model.encoder.forward_head(tokens, per_channel=True)
        assert per_channel.shape == (2, 3 * model.encoder.num_features)
        torch.testing.assert_close(per_channel.detach(), model.embed(x, per_channel=True), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expects 3 channels|takes 1..11"):
        model.encoder.forward_features(torch.zeros(1, 12, 32, 32, dtype=torch.uint8))
