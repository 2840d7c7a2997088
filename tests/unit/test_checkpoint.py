"""Checkpoints: safetensors round trip, atomic writes, timm interop against real timm, OpenPhenom import."""
import json
import os
import pickle

import pytest
import torch

from mae_fast import ops
from mae_fast.checkpoint import CheckpointError, load_model, save_model
from mae_fast.interop import from_timm_state_dict, load_any, load_openphenom, timm_vit_kwargs, to_timm_state_dict
from mae_fast.io import atomic_write
from mae_fast.models import create_model, model_config
from tests.helpers import openphenom_layout_state



def _perturbed(name, **kw):
    torch.manual_seed(1)
    model = create_model(name, img_size=64, **kw).eval()
    with torch.no_grad():  # move away from the init values so that every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _images(C=6, B=3):
    return torch.randint(0, 65536, (B, C, 64, 64), dtype=torch.int32).to(torch.uint16)


def test_save_load_round_trip(tmp_path):
    model = _perturbed("camae_vit_micro_patch16_256", in_chans=5)
    save_model(model, str(tmp_path / "ckpt"), extra={"step": 7})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]  # no temp files left
    loaded = load_model(str(tmp_path / "ckpt")).eval()
    assert loaded.cfg == model.cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    x = _images(5)
    assert torch.equal(model.embed(x), loaded.embed(x))
    assert load_any(str(tmp_path / "ckpt")).cfg == model.cfg


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "f.txt")
    atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def broken(tmp):
        open(tmp, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_corrupt_and_wrong_shaped_checkpoints_name_the_problem(tmp_path):
    model = _perturbed("mae_vit_micro_patch16_256")
    d = str(tmp_path / "ckpt")
    save_model(model, d)
    weights = os.path.join(d, "model.safetensors")
    with open(weights, "r+b") as f:  # truncate: corrupt file
        f.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_model(d)
    # a checkpoint of another architecture under this config
    other = _perturbed("mae_vit_micro_patch16_256", embed_dim=96, num_heads=3)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    del state["encoder.blocks.0.mlp_bias"]
    save_file(state, weights)
    with pytest.raises(CheckpointError) as err:
        load_model(d)
    msg = str(err.value)
    assert "missing keys: encoder.blocks.0.mlp_bias" in msg
    assert "shape mismatches: encoder.blocks.0.attn_out_proj.bias: checkpoint (96,) vs model (192,)" in msg
    assert "in all)" in msg  # long lists are cut, with the total
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))


def test_timm_round_trip_gives_the_same_features():
    pytest.importorskip("timm", reason="timm is a test dependency (pip install mae_fast[test])")
    from timm.models.vision_transformer import VisionTransformer

    cfg = model_config("mae_vit_micro_patch16_256", img_size=64, in_chans=5)
    model = _perturbed("mae_vit_micro_patch16_256", in_chans=5)
    reference = VisionTransformer(**timm_vit_kwargs(cfg)).eval()
    reference.load_state_dict(to_timm_state_dict(model), strict=True)
    x = _images(5)
    standardised = ops.self_standardize(x)
    with torch.no_grad():
        timm_features = reference(standardised)
    ours = model.embed(x)
    assert ours.shape == timm_features.shape == (3, 192)
    torch.testing.assert_close(ours, timm_features, rtol=1e-5, atol=1e-5)
    back = from_timm_state_dict(reference.state_dict(), cfg).eval()
    torch.testing.assert_close(back.embed(x), timm_features, rtol=1e-5, atol=1e-5)


def test_timm_import_refuses_learned_positions():
    cfg = model_config("mae_vit_micro_patch16_256", img_size=64)
    state = to_timm_state_dict(_perturbed("mae_vit_micro_patch16_256"))
    state["pos_embed"] = state["pos_embed"] + 0.1
    with pytest.raises(CheckpointError, match="not the fixed 2-D sin-cos"):
        from_timm_state_dict(state, cfg)


@pytest.mark.parametrize("in_chans", [3, 5])
def test_camae_timm_round_trip_gives_the_same_features(in_chans):
    # CA-MAE in timm: one single-channel ViT over the channels stacked top to bottom (exact for the exported count)
    pytest.importorskip("timm", reason="timm is a test dependency (pip install mae_fast[test])")
    from timm.models.vision_transformer import VisionTransformer

    from mae_fast.interop import timm_input

    model = _perturbed("camae_vit_micro_patch16_256", in_chans=5)
    reference = VisionTransformer(**timm_vit_kwargs(model.cfg, in_chans)).eval()
    reference.load_state_dict(to_timm_state_dict(model, in_chans=in_chans), strict=True)
    x = _images(in_chans)
    with torch.no_grad():
        timm_tokens = reference.forward_features(timm_input(x, model.cfg))
        timm_features = reference.forward_head(timm_tokens)
    assert timm_features.shape == (3, 192)
    torch.testing.assert_close(model.embed(x), timm_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encoder.forward_features(x).detach(), timm_tokens, rtol=1e-5, atol=1e-5)
    back = from_timm_state_dict(reference.state_dict(), model.cfg).eval()
    torch.testing.assert_close(back.embed(x), timm_features, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1..11 channels"):
        to_timm_state_dict(model, in_chans=12)
    with pytest.raises(ValueError, match="only applies to CA-MAE"):
        to_timm_state_dict(_perturbed("mae_vit_micro_patch16_256"), in_chans=5)


@pytest.mark.parametrize("fc_norm", [False, True])
def test_openphenom_import(tmp_path, fc_norm):
    # the computation the released code does: legacy bias routing, mean of the un-normalised tokens, 8-head
    # cross-attention (the preset's default), decoder LayerNorm eps 1e-6, 16 decoder heads (not in the weights)
    model = _perturbed("camae_vit_micro_patch16_256", in_chans=6, fc_norm=fc_norm, legacy_parallel_bias=True,
                       pooling="openphenom", decoder_heads=16)
    directory = tmp_path / "openphenom"
    directory.mkdir()
    torch.save({"state_dict": openphenom_layout_state(model)}, directory / "model.safetensors")  # a pickle, as released
    loaded = load_openphenom(str(directory)).eval()
    assert loaded.cfg.channel_agnostic and loaded.cfg.in_chans == 6 and loaded.cfg.fc_norm == fc_norm
    assert (loaded.cfg.embed_dim, loaded.cfg.depth, loaded.cfg.num_heads) == (192, 4, 3)
    assert (loaded.cfg.legacy_parallel_bias, loaded.cfg.pooling, loaded.cfg.decoder_cross_heads,
            loaded.cfg.decoder_norm_eps) == (True, "openphenom", 8, 1e-6)
    x = torch.randint(0, 256, (2, 6, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.embed(x, per_channel=True), model.embed(x, per_channel=True), rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(loaded(x, generator=g).pred, model(x, generator=g.manual_seed(0)).pred, rtol=0, atol=0)
    assert load_any(str(directory)).cfg.channel_agnostic
    # save_model / load_model keep the OpenPhenom computation (config.json records it)
    save_model(loaded, str(tmp_path / "ours"))
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (meta["legacy_parallel_bias"], meta["pooling"], meta["decoder_cross_heads"]) == (True, "openphenom", 8)
    again = load_model(str(tmp_path / "ours")).eval()
    assert again.cfg == loaded.cfg
    torch.testing.assert_close(again.embed(x), model.embed(x), rtol=0, atol=0)


def test_openphenom_import_reads_decoder_settings_from_the_released_config(tmp_path):
    model = _perturbed("camae_vit_micro_patch16_256", legacy_parallel_bias=True, pooling="openphenom")
    torch.save({"state_dict": openphenom_layout_state(model)}, tmp_path / "model.safetensors")
    hf = {"decoder": {"num_heads": 4, "norm_layer": {"_partial_": True, "_target_": "torch.nn.LayerNorm"}}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_any(str(tmp_path)).cfg  # an OpenPhenom folder: its config.json is not ours
    assert (cfg.decoder_heads, cfg.decoder_norm_eps) == (4, 1e-5)  # no eps given: nn.LayerNorm's default
    hf["decoder"]["norm_layer"]["eps"] = 1e-6
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert load_openphenom(str(tmp_path / "model.safetensors")).cfg.decoder_norm_eps == 1e-6


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_openphenom_import_never_executes_pickles(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(CheckpointError, match="neither safetensors nor a weights-only torch checkpoint"):
        load_openphenom(str(path))


def test_openphenom_import_reports_missing_keys(tmp_path):
    model = _perturbed("camae_vit_micro_patch16_256")
    state = openphenom_layout_state(model)
    del state["decoder_pred.weight"]
    torch.save({"state_dict": state}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: decoder_pred.weight"):
        load_openphenom(str(tmp_path / "model.safetensors"))
