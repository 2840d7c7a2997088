"""The OpenPhenom computation, checked against a second, independent computation of the same network written from
the published facts (docs/DESIGN.md §2) in plain matrix algebra (float64): timm 0.9.7's ParallelScalingBlock bias
routing, OpenPhenom's pooling (mean of the un-normalised tokens) and its input standardisation (uint8 / 255,
instance norm, eps 1e-5). One block, then a whole CA-MAE ViT-S/16. The comparison with Recursion's own code runs
outside the repository (see the README's "Using OpenPhenom")."""
import functools
import math

import pytest
import torch

from mae_fast import ops
from mae_fast.interop import timm_parallel_bias_is_legacy, to_timm_state_dict
from mae_fast.models import MAEConfig, create_model, model_config
from mae_fast.models.mae import ParallelScalingBlock


def _layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _block_by_algebra(x, p, heads, legacy):
    """One parallel scaling block on tokens x (N, D), float64, from the facts: [h | q | k | v] = LN(x) W^T, then
    the bias: legacy (timm 0.9.7): h[:3D] none, h[3D:4D] += b[:D], q += b[D:2D], k += b[2D:3D], v += b[3D:4D];
    otherwise h += b. QK-LayerNorm per head, softmax(q k^T / sqrt(d)) v, out = attn W_o^T + b_o + gelu(h) W_2^T + b_2,
    x + gamma * out."""
    N, D = x.shape
    b = p["mlp_bias"]
    assert b.numel() == 4 * D  # the facts are stated for mlp_ratio 4
    z = _layer_norm(x, p["in_norm.weight"], p["in_norm.bias"], 1e-6) @ p["in_proj.weight"].T
    h, q, k, v = z[:, :4 * D], z[:, 4 * D:5 * D], z[:, 5 * D:6 * D], z[:, 6 * D:]
    if legacy:
        h = h + torch.cat([torch.zeros(3 * D, dtype=x.dtype), b[:D]])
        q, k, v = q + b[D:2 * D], k + b[2 * D:3 * D], v + b[3 * D:]
    else:
        h = h + b
    d = D // heads
    outs = []
    for i in range(heads):
        qi = _layer_norm(q[:, i * d:(i + 1) * d], p["q_norm.weight"], p["q_norm.bias"], 1e-6)
        ki = _layer_norm(k[:, i * d:(i + 1) * d], p["k_norm.weight"], p["k_norm.bias"], 1e-6)
        scores = qi @ ki.T / math.sqrt(d)
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        outs.append(weights / weights.sum(-1, keepdim=True) @ v[:, i * d:(i + 1) * d])
    attn = torch.cat(outs, dim=1)
    out = attn @ p["attn_out_proj.weight"].T + p["attn_out_proj.bias"] \
        + _gelu(h) @ p["mlp_out_proj.weight"].T + p["mlp_out_proj.bias"]
    return x + p["ls.gamma"] * out


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.named_parameters():
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
            if name.endswith("mlp_bias"):
                t.copy_(0.5 * noise)            # N(0, 0.5): the routing matters
            elif name.endswith("ls.gamma"):
                t.copy_(0.1 + 0.05 * noise)     # LayerScale large enough for every block to count
            else:
                t.add_(0.05 * noise)
    return module


def _params(module, prefix=""):
    return {k[len(prefix):]: v.detach().double() for k, v in module.state_dict().items() if k.startswith(prefix)}


def test_legacy_bias_is_the_fixed_rearrangement_of_mlp_bias():
    D = 8
    blk = _perturb(ParallelScalingBlock(D, 2, legacy_bias=True), seed=0)
    b = blk.mlp_bias.detach()
    full = blk.in_proj_bias().detach()  # split [h (4D) | q | k | v]
    assert full.shape == (7 * D,)
    assert torch.equal(full[:3 * D], torch.zeros(3 * D))      # first 3D hidden units: no bias
    assert torch.equal(full[3 * D:4 * D], b[:D])              # last D hidden units: b[:D]
    assert torch.equal(full[4 * D:5 * D], b[D:2 * D])         # q
    assert torch.equal(full[5 * D:6 * D], b[2 * D:3 * D])     # k
    assert torch.equal(full[6 * D:], b[3 * D:])               # v
    fixed = ParallelScalingBlock(D, 2)
    fixed.load_state_dict(blk.state_dict())
    assert torch.equal(fixed.in_proj_bias().detach(), torch.cat([b, torch.zeros(3 * D)]))
    assert blk.in_proj.bias is None  # one matmul, its bias built from mlp_bias: no extra parameter


@pytest.mark.parametrize("legacy", [True, False])
def test_parallel_block_equals_matrix_algebra(legacy):
    D, heads, N = 48, 3, 11
    blk = _perturb(ParallelScalingBlock(D, heads, legacy_bias=legacy), seed=1).double().eval()
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        got = blk(x)
    p = _params(blk)
    expected = torch.stack([_block_by_algebra(x[i], p, heads, legacy) for i in range(2)])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    other = _block_by_algebra(x[0], p, heads, not legacy)
    assert (other - expected[0]).abs().max() > 0.1  # the routing changes the function: the check can tell


def _sincos(dim, grid):
    """[sin(h w_k), cos(h w_k), sin(x w_k), cos(x w_k)], w_k = 10000^(-k / (dim/4)), positions row-major."""
    k = torch.arange(dim // 4, dtype=torch.float64)
    omega = 10000.0 ** (-k / (dim // 4))
    rows = []
    for h in range(grid):
        for w in range(grid):
            rows.append(torch.cat([torch.sin(h * omega), torch.cos(h * omega), torch.sin(w * omega),
                                   torch.cos(w * omega)]))
    return torch.stack(rows)


def _openphenom_embedding_by_algebra(model, image):
    """OpenPhenom's predict() for one uint8 image (C, H, W): x/255, per-channel standardisation (eps 1e-5), the
    shared 1-channel patch projection per channel (channel-major tokens, (p, q) pixel order), the same sin-cos
    positions for every channel, class token first, legacy blocks, no final norm (fc_norm model), then the mean of
    the non-class tokens: (D,) and per channel (C, D)."""
    cfg = model.cfg
    p, D = cfg.patch_size, cfg.embed_dim
    C, H, _ = image.shape
    u = image.double() / 255
    u = (u - u.mean((1, 2), keepdim=True)) / torch.sqrt(u.var((1, 2), unbiased=False, keepdim=True) + 1e-5)
    enc = _params(model.encoder)
    w_patch = enc["patch_embed.proj.weight"].reshape(D, p * p)
    g = H // p
    pos = _sincos(D, g)
    tokens = []
    for c in range(C):
        patches = u[c].reshape(g, p, g, p).permute(0, 2, 1, 3).reshape(g * g, p * p)
        tokens.append(patches @ w_patch.T + enc["patch_embed.proj.bias"] + pos)
    x = torch.cat([enc["cls_token"].reshape(1, D)] + tokens)
    for i in range(cfg.depth):
        x = _block_by_algebra(x, {k[len(f"blocks.{i}."):]: v for k, v in enc.items() if k.startswith(f"blocks.{i}.")},
                              cfg.num_heads, legacy=True)
    body = x[1:]
    return body.mean(0), body.reshape(C, g * g, D).mean(1)


def test_camae_vit_s16_openphenom_embedding_equals_matrix_algebra():
    openphenom = {"fc_norm": True, "legacy_parallel_bias": True, "pooling": "openphenom"}
    model = create_model("camae_vit_small_patch16_256", **openphenom).eval()
    _perturb(model.encoder, seed=3)
    image = torch.randint(0, 256, (1, 2, 256, 256), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    mean, per_channel = _openphenom_embedding_by_algebra(model, image[0])
    got_mean = model.embed(image)[0].double()
    got_channels = model.embed(image, per_channel=True)[0].double()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(got_mean, mean) < 1e-5
    assert rel(got_channels, per_channel.flatten()) < 1e-5
    # the same weights under the current routing or timm's fc_norm pooling compute something else
    for change in ({"legacy_parallel_bias": False}, {"pooling": "timm_avg"}):
        other = create_model("camae_vit_small_patch16_256", **{**openphenom, **change}).eval()
        other.load_state_dict(model.state_dict())
        assert rel(other.embed(image)[0].double(), mean) > 1e-2, change


def test_block_routing_matches_the_installed_timm():
    vt = pytest.importorskip("timm.models.vision_transformer")
    D = 32
    ours = _perturb(ParallelScalingBlock(D, 2, legacy_bias=timm_parallel_bias_is_legacy()), seed=5).eval()
    theirs = vt.ParallelScalingBlock(D, 2, qkv_bias=False, qk_norm=True, init_values=1e-4,
                                     norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_timm_export_refuses_a_change_of_bias_routing():
    model = create_model("mae_vit_micro_patch16_256", img_size=64, legacy_parallel_bias=True)
    _perturb(model.encoder, seed=7)
    with pytest.raises(ValueError, match="would compute a different function"):
        to_timm_state_dict(model, timm_legacy_bias=False)
    assert "blocks.0.mlp_bias" in to_timm_state_dict(model, timm_legacy_bias=True)  # same routing: fine
    with torch.no_grad():
        for blk in model.encoder.blocks:
            blk.mlp_bias.zero_()
    assert "blocks.0.mlp_bias" in to_timm_state_dict(model, timm_legacy_bias=False)  # zero bias: same function


def test_config_fields_defaults_and_old_configs():
    cfg = model_config("camae_vit_small_patch16_256")
    assert (cfg.decoder_cross_heads, cfg.decoder_norm_eps, cfg.pooling, cfg.legacy_parallel_bias) == \
        (8, 1e-6, "timm_avg", False)
    model = create_model("camae_vit_micro_patch16_256")
    assert model.decoder.cross_attention.num_heads == 8
    assert {m.eps for m in model.decoder.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    eps5 = create_model("camae_vit_micro_patch16_256", decoder_norm_eps=1e-5)
    assert {m.eps for m in eps5.decoder.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    # a CA-MAE config written before decoder_cross_heads existed used decoder_heads there
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("decoder_cross_heads", "pooling",
                                                                "legacy_parallel_bias", "decoder_norm_eps")}
    again = MAEConfig.from_dict(old)
    assert again.decoder_cross_heads == cfg.decoder_heads == 16
    assert (again.pooling, again.legacy_parallel_bias, again.decoder_norm_eps) == ("timm_avg", False, 1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        model_config("camae_vit_small_patch16_256", pooling="max")
    with pytest.raises(ValueError, match="not divisible by its 7 heads"):
        create_model("camae_vit_micro_patch16_256", decoder_cross_heads=7)


def test_uint8_standardisation_is_openphenoms_and_16_bit_is_not_damped():
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    expected = torch.nn.functional.instance_norm(images.float() / 255.0, eps=1e-5)  # OpenPhenom's input_norm
    assert torch.equal(ops.self_standardize(images), expected)
    assert ops.standardize_eps(torch.uint8) == 1e-5
    assert ops.standardize_eps(torch.uint16) == pytest.approx(1e-5 * (255 / 65535) ** 2)


def test_ca_mean_embedding_does_not_depend_on_the_channel_order():
    """No channel embedding in the CA-MAE encoder: permuting the channels permutes the per-channel embeddings and
    leaves their mean unchanged (README, Using OpenPhenom)."""
    model = _perturb(create_model("camae_vit_micro_patch16_256", img_size=64, legacy_parallel_bias=True,
                                  pooling="openphenom", fc_norm=True), seed=9).eval()
    images = torch.randint(0, 256, (2, 4, 64, 64), generator=torch.Generator().manual_seed(10), dtype=torch.uint8)
    order = [2, 0, 3, 1]
    torch.testing.assert_close(model.embed(images[:, order]), model.embed(images), rtol=1e-5, atol=1e-5)
    per_channel = model.embed(images, per_channel=True).reshape(2, 4, -1)
    torch.testing.assert_close(model.embed(images[:, order], per_channel=True).reshape(2, 4, -1),
                               per_channel[:, order], rtol=1e-5, atol=1e-5)
