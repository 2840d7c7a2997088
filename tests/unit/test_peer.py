"""The peer stack (`mae_fast.perf.peer`) computes the same function as mae_fast from the same weights: the same embedding,
the same masked loss for the same masking noise, and it trains with timm's Lion. (If it did not, fused/peer ratios
would compare different work.)"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm", reason="the peer stack is built on timm")

from mae_fast.models import MaskedAutoencoder, model_config  # noqa: E402
from mae_fast.perf.peer import PeerMAE, peer_optimizer  # noqa: E402


def _pair(patch_size: int = 16):
    cfg = model_config(f"mae_vit_micro_patch{patch_size}_256", img_size=64, drop_path=0.0)
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg)
    with torch.no_grad():  # away from the initialisation (zero biases, tiny LayerScale) so every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model, PeerMAE(cfg).load_from(model)


@pytest.mark.parametrize("patch_size", [8, 16])
def test_peer_embeds_like_mae_fast(patch_size):
    cfg, model, peer = _pair(patch_size)
    images = torch.randint(0, 256, (3, cfg.in_chans, 64, 64), dtype=torch.uint8)
    ours, theirs = model.eval().embed(images), peer.eval().embed(images)
    assert theirs.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_peer_loss_matches_mae_fast_reference_for_the_same_masking(monkeypatch):
    monkeypatch.setenv("MAE_FAST_IMPL", "reference")
    cfg, model, peer = _pair()
    images = torch.randint(0, 65536, (2, cfg.in_chans, 64, 64), dtype=torch.int32).to(torch.uint16)
    ours = model(images, generator=torch.Generator().manual_seed(5)).loss
    theirs = peer(images, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    other = peer(images, generator=torch.Generator().manual_seed(6))  # another masking, another loss
    assert not torch.allclose(other, ours)


def test_peer_trains_with_timms_lion():
    cfg, _, peer = _pair()
    opt = peer_optimizer(peer)
    assert type(opt).__module__.startswith("timm")
    before = {n: p.detach().clone() for n, p in peer.named_parameters() if p.requires_grad}
    loss = peer(torch.randint(0, 256, (2, cfg.in_chans, 64, 64), dtype=torch.uint8))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in peer.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every trainable weight moved (Lion: sign updates)
    assert not peer.encoder.pos_embed.requires_grad  # fixed sin-cos positions


def test_peer_refuses_channel_agnostic_configs():
    with pytest.raises(ValueError, match="standard MAE"):
        PeerMAE(model_config("camae_vit_micro_patch16_256", img_size=64))
