"""The Hugging Face Hub, without network: save_pretrained -> from_pretrained bit-identical, the flat Hub-style
config.json (and the older nested layout), and repo ids read offline from a Hub cache laid out here the way
huggingface_hub stores it (models--ORG--NAME/refs/main, snapshots/<sha>/ linking into blobs/) for each folder kind:
ours, a timm encoder folder, OpenPhenom's repo layout."""
import hashlib
import json
import os
import shutil

import pytest
import torch

import mae_fast
from mae_fast.checkpoint import CheckpointError
from mae_fast.hub import from_pretrained, save_pretrained
from mae_fast.interop import save_timm
from mae_fast.models import MaskedAutoencoder, create_model
from tests.helpers import openphenom_layout_state

pytest.importorskip("huggingface_hub", reason="huggingface_hub comes with timm (pip install mae_fast[test])")

REPO = "someorg/some-model"


def _perturbed(name, **kw):
    torch.manual_seed(3)
    model = create_model(name, img_size=32, **kw).eval()
    with torch.no_grad():  # away from the init values, so that every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _images(C):
    return torch.randint(0, 256, (2, C, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _hub_cache(home, repo_id, folder, sha="0123456789abcdef0123456789abcdef01234567"):
    """`folder`'s files as huggingface_hub caches a download of `repo_id` at commit `sha` under HF_HOME=home."""
    repo = os.path.join(home, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(sha)
    snapshot = os.path.join(repo, "snapshots", sha)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "blobs"))
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return str(home)


def test_save_pretrained_round_trip_is_bit_identical_and_writes_a_hub_folder(tmp_path):
    model = _perturbed("camae_vit_micro_patch16_256", in_chans=3)
    evaluation = "| source | CORUM |\n|---|---|\n| model | 0.42 |"
    model.save_pretrained(str(tmp_path / "m"), training={"step": 1200, "crops": 76800}, evaluation=evaluation)
    assert sorted(os.listdir(tmp_path / "m")) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mae_fast" and config["architecture"] == "MaskedAutoencoder"
    assert "mae_fast_config" not in config and config["embed_dim"] == 192 and config["channel_agnostic"] is True
    assert (config["step"], config["crops"]) == (1200, 76800)
    card = (tmp_path / "m" / "README.md").read_text()
    for text in ("camae_vit_micro_patch16_256", "1,200 steps", "76,800 crops", "## Evaluation", "| model | 0.42 |",
                 f"{sum(p.numel() for p in model.parameters()):,}", "library_name: mae_fast"):
        assert text in card, text
    loaded = mae_fast.from_pretrained(str(tmp_path / "m"))
    assert type(loaded) is MaskedAutoencoder and loaded.cfg == model.cfg and not loaded.training
    _same_weights(model, loaded)
    x = _images(3)
    assert torch.equal(loaded.embed(x), model.embed(x))
    assert loaded.pretrained_info == {"step": 1200, "crops": 76800}
    loaded.save_pretrained(str(tmp_path / "again"))  # the training record travels with the model
    assert "1,200 steps" in (tmp_path / "again" / "README.md").read_text()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()


def test_folders_in_the_old_nested_layout_still_load(tmp_path):
    model = _perturbed("mae_vit_micro_patch16_256")
    save_pretrained(model, str(tmp_path / "m"))
    old = {"mae_fast_config": model.cfg.to_dict(), "step": 7}  # as written before the flat layout
    (tmp_path / "m" / "config.json").write_text(json.dumps(old))
    loaded = MaskedAutoencoder.from_pretrained(str(tmp_path / "m"))
    assert loaded.cfg == model.cfg and loaded.pretrained_info == {"step": 7}
    _same_weights(model, loaded)


def test_baselines_save_and_load_and_the_model_class_refuses_them(tmp_path):
    model = create_model("munet_micro_256", img_size=64)
    save_pretrained(model, str(tmp_path / "u"))
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    assert (config["architecture"], config["family"]) == ("MaskedUNet", "munet")
    loaded = from_pretrained(str(tmp_path / "u"))
    assert loaded.cfg == model.cfg
    _same_weights(model, loaded)
    with pytest.raises(CheckpointError, match="holds a MaskedUNet, not a MaskedAutoencoder"):
        MaskedAutoencoder.from_pretrained(str(tmp_path / "u"))


def _ours(model, folder):
    save_pretrained(model, folder)


def _timm(model, folder):
    save_timm(model, folder)


def _timm_without_our_entry(model, folder):  # as timm's own Hub export writes it: the config from the weights
    save_timm(model, folder)
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    del config["mae_fast"]
    json.dump(config, open(path, "w"))


def _openphenom(model, folder):  # the released layout: a torch pickle named model.safetensors + Hydra-style config
    os.makedirs(folder)
    torch.save({"state_dict": openphenom_layout_state(model)}, os.path.join(folder, "model.safetensors"))
    decoder = {"num_heads": model.cfg.decoder_heads, "norm_layer": {"_partial_": True, "eps": 1e-6}}
    json.dump({"decoder": decoder, "model_type": "MAE"}, open(os.path.join(folder, "config.json"), "w"))


KINDS = {
    "ours": ("camae_vit_micro_patch16_256", {}, _ours, True),
    "timm-camae": ("camae_vit_micro_patch16_256", {}, _timm, False),
    "timm-foreign": ("mae_vit_micro_patch16_256", {}, _timm_without_our_entry, False),
    "openphenom": ("camae_vit_micro_patch16_256", dict(legacy_parallel_bias=True, pooling="openphenom",
                                                        decoder_heads=4, fc_norm=True), _openphenom, True),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_repo_ids_load_offline_from_the_hub_cache(tmp_path, offline_hub, kind):
    name, overrides, write, whole_model = KINDS[kind]
    model = _perturbed(name, in_chans=3 if "camae" in name else 6, **overrides)
    write(model, str(tmp_path / "folder"))
    _hub_cache(offline_hub, REPO, str(tmp_path / "folder"))
    loaded = mae_fast.from_pretrained(REPO)
    assert isinstance(loaded, MaskedAutoencoder) and not loaded.training
    x = _images(model.cfg.in_chans)
    assert torch.equal(loaded.embed(x), model.embed(x))
    if whole_model:  # the decoder too (a timm folder holds the encoder only)
        _same_weights(model, loaded)
    else:
        assert loaded.cfg.embed_dim == model.cfg.embed_dim and loaded.cfg.channel_agnostic == model.cfg.channel_agnostic
        for k, v in model.encoder.state_dict().items():
            assert torch.equal(loaded.encoder.state_dict()[k], v), k
    assert torch.equal(MaskedAutoencoder.from_pretrained(REPO).embed(x), model.embed(x))


def test_missing_repo_offline_and_missing_paths_are_one_clear_error(tmp_path, offline_hub):
    with pytest.raises(CheckpointError, match="someorg/absent .*HF_HUB_OFFLINE is set"):
        mae_fast.from_pretrained("someorg/absent")
    with pytest.raises(CheckpointError, match="does not exist"):
        mae_fast.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_embed_resolves_a_repo_id_like_a_folder(tmp_path, offline_hub):
    from mae_fast.inference.embed import EmbedConfig, load_embedding_model

    model = _perturbed("camae_vit_micro_patch16_256", in_chans=3)
    save_pretrained(model, str(tmp_path / "folder"))
    snapshot = _hub_cache(offline_hub, REPO, str(tmp_path / "folder"))
    loaded, kind = load_embedding_model(EmbedConfig(checkpoint=REPO))
    assert kind == "ours"
    _same_weights(model, loaded)
    shutil.rmtree(os.path.dirname(snapshot))  # the cache emptied: offline, the id no longer resolves
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        load_embedding_model(EmbedConfig(checkpoint=REPO))


def test_load_pretrained_names_the_kind_of_a_timm_folder_and_reads_repo_ids(tmp_path, offline_hub):
    from mae_fast.training.pretrained import load_pretrained

    model = _perturbed("mae_vit_micro_patch16_256")
    save_timm(model, str(tmp_path / "timm"))
    loaded, kind = load_pretrained(str(tmp_path / "timm"))
    assert kind == "timm"  # init_weights_from then fills the encoder only
    _hub_cache(offline_hub, REPO, str(tmp_path / "timm"))
    loaded, kind = load_pretrained(REPO)
    assert kind == "timm" and torch.equal(loaded.embed(_images(6)), model.embed(_images(6)))
