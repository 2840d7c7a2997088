"""The optimiser recipes (`mae_fast.training.recipes`, issue 25): the model configs hold the architecture only; each
preset's optimiser settings are the training side's and equal what its model config held before; the moved
`model.*` keys are refused naming the training key; configs written before the move still load on every path
(checkpoint, hub, embed, export, init_from) and a saved run's `model.lr`, ... map onto the training keys."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

from mae_fast.checkpoint import load_model, read_config, save_model
from mae_fast.hub import from_pretrained, save_pretrained
from mae_fast.interop import load_any, save_timm
from mae_fast.models import MAEConfig, config_from_dict, create_model, list_models, model_config
from mae_fast.training.config import (
    ConfigError, DataConfig, TrainConfig, build_config, upgrade_saved_config, validate,
)
from mae_fast.training.recipes import OptimizerRecipe, build_optimizer, optimizer_recipe

MOVED = {"lr", "weight_decay", "betas", "momentum", "nesterov", "lr_batch", "optimizer", "schedule"}

# config.json of our checkpoint folders as the version before this change wrote them (save_model of
# create_model(preset, img_size=32[, num_classes=3]) with extra={"step": 5, "crops": 40}), written out by hand
OLD_CONFIG_JSON = {
    "mae_vit_micro_patch16_256": {
        "model_type": "mae_fast", "architecture": "MaskedAutoencoder", "name": "mae_vit_micro_patch16_256",
        "img_size": 32, "patch_size": 16, "in_chans": 6, "embed_dim": 192, "depth": 4, "num_heads": 3,
        "mlp_ratio": 4.0, "drop_path": 0.0, "init_values": 0.0001, "channel_agnostic": False, "max_in_chans": 11,
        "fc_norm": False, "pooling": "timm_avg", "legacy_parallel_bias": False, "decoder_dim": 128,
        "decoder_depth": 2, "decoder_heads": 4, "decoder_cross_heads": 8, "decoder_norm_eps": 1e-06,
        "mask_ratio": 0.75, "fourier_alpha": 0.01, "norm_pix_loss": False, "grad_checkpointing": False,
        "lr": 0.0001, "weight_decay": 0.05, "betas": [0.9, 0.95], "step": 5, "crops": 40},
    "wsl_densenet_micro_256": {
        "model_type": "mae_fast", "architecture": "WSLClassifier", "family": "wsl", "name": "wsl_densenet_micro_256",
        "img_size": 32, "in_chans": 6, "growth_rate": 8, "block_config": [2, 2, 2, 2], "num_init_features": 16,
        "bn_size": 2, "compression": 0.5, "neck_dim": 32, "num_classes": 3, "label_smoothing": 0.0, "adabn": False,
        "virtual_batch_size": 128, "bn_momentum": 0.1, "optimizer": "sgd", "lr": 0.1, "lr_batch": 256,
        "momentum": 0.9, "nesterov": True, "weight_decay": 0.0001, "schedule": "one_cycle_cosine", "step": 5,
        "crops": 40},
    "munet_micro_256": {
        "model_type": "mae_fast", "architecture": "MaskedUNet", "family": "munet", "name": "munet_micro_256",
        "img_size": 32, "in_chans": 6, "widths": [8, 16, 32, 64], "encoder_units": [1, 1, 1, 1],
        "decoder_units": [1, 1, 1], "bottleneck_units": 1, "kernel_size": 3, "style": True, "mask_ratio": 0.25,
        "mask_patch": 16, "optimizer": "adamw", "lr": 0.001, "lr_batch": 0, "betas": [0.9, 0.95],
        "weight_decay": 0.05, "schedule": "one_cycle_cosine", "step": 5, "crops": 40},
}
OVERRIDES = {"mae_vit_micro_patch16_256": {"img_size": 32}, "munet_micro_256": {"img_size": 32},
             "wsl_densenet_micro_256": {"img_size": 32, "num_classes": 3}}


def old_folder(tmp_path, preset: str) -> tuple[torch.nn.Module, str]:
    """A checkpoint folder as the earlier version wrote it: our weights, the old config.json."""
    torch.manual_seed(0)
    model = create_model(preset, **OVERRIDES[preset]).eval()
    folder = str(tmp_path / preset)
    save_model(model, folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(OLD_CONFIG_JSON[preset], f)
    return model, folder


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def plan_of(preset: str, *overrides: str, global_batch: int = 4096, micro_batch: int = 256):
    return validate(build_config(preset, overrides=["data.root=/x", "steps=1", f"global_batch={global_batch}",
                                                    f"micro_batch={micro_batch}", *overrides]))


# ------------------------------------------------------------------------------------------------------------
# the recipes: exactly the settings the model configs held
# ------------------------------------------------------------------------------------------------------------

def test_every_preset_has_the_optimiser_settings_its_model_config_held():
    presets = list_models()
    assert len(list_models("mae")) >= 20 and len(list_models("baseline")) >= 7
    for name in presets:
        r, family = optimizer_recipe(name), model_config(name).family
        got = (r.name, r.lr, r.lr_batch, r.weight_decay, r.betas, r.momentum, r.nesterov)
        if family == "mae":  # the old MAEConfig: Lion, registry _SIZES lr (3e-5 for large), wd 0.05, betas
            lr = 3e-5 if "_large_" in name else 1e-4
            assert got == ("lion", lr, 0, 0.05, (0.9, 0.95), None, False), name
        elif family == "wsl":  # the old WSLConfig: SGD 0.1 per 256 crops, Nesterov momentum 0.9, wd 1e-4
            assert got == ("sgd", 0.1, 256, 1e-4, None, 0.9, True), name
        else:  # the old MUNetConfig: AdamW 1e-3 (no scaling), betas (0.9, 0.95), wd 0.05
            assert got == ("adamw", 1e-3, 0, 0.05, (0.9, 0.95), None, False), name
        assert optimizer_recipe(model_config(name, img_size=128)) == r  # a preset with overrides keeps its recipe
    assert optimizer_recipe(MAEConfig()).lr == 1e-4  # a config of no preset: its family's recipe


def test_a_preset_of_your_own_gets_its_familys_recipe_or_its_own():
    from mae_fast.models import register_model
    from mae_fast.models.registry import _PRESETS
    from mae_fast.training import recipes

    name = "mae_vit_test_recipe_256"
    try:
        register_model(MAEConfig(name, img_size=32, embed_dim=24, depth=1, num_heads=2, decoder_dim=16,
                                 decoder_depth=1, decoder_heads=2))
        assert optimizer_recipe(name) == recipes.LION
        mine = OptimizerRecipe("lion", lr=5e-4, weight_decay=0.1, betas=(0.9, 0.99))
        recipes.register_recipe(name, mine)
        assert optimizer_recipe(name) == mine and plan_of(name, global_batch=256).lr == 5e-4
        with pytest.raises(ValueError, match="trains with lion, not adamw"):
            recipes.register_recipe(name, recipes.ADAMW)
    finally:
        _PRESETS.pop(name, None)
        recipes._PRESET_RECIPES.pop(name, None)


def test_model_configs_hold_the_architecture_only():
    for name in list_models():
        cfg = model_config(name)
        assert not MOVED & {f.name for f in dataclasses.fields(cfg)}, name
        assert not MOVED & set(cfg.to_dict()), name


@pytest.mark.parametrize("preset, lr, wd, betas, optimizer, momentum, nesterov", [
    ("mae_vit_small_patch16_256", 1e-4, 0.05, (0.9, 0.95), "lion", None, False),
    ("mae_vit_large_patch8_256", 3e-5, 0.05, (0.9, 0.95), "lion", None, False),
    ("camae_vit_base_patch16_256", 1e-4, 0.05, (0.9, 0.95), "lion", None, False),
    ("wsl_densenet161_256", 0.1 * 4096 / 256, 1e-4, None, "sgd", 0.9, True),
    ("wsl_densenet161_adabn_256", 0.1 * 4096 / 256, 1e-4, None, "sgd", 0.9, True),
    ("munet_m_256", 1e-3, 0.05, (0.9, 0.95), "adamw", None, False),
])
def test_a_runs_optimiser_is_its_presets_recipe(preset, lr, wd, betas, optimizer, momentum, nesterov):
    plan = plan_of(preset)
    assert (plan.lr, plan.weight_decay, plan.betas, plan.optimizer, plan.momentum, plan.nesterov) == \
        (lr, wd, betas, optimizer, momentum, nesterov)
    recipe = optimizer_recipe(preset)
    assert plan.lr == recipe.peak_lr(4096) and plan.weight_decay == recipe.weight_decay
    assert plan.betas == recipe.betas and (plan.momentum, plan.nesterov) == (recipe.momentum, recipe.nesterov)


def test_baseline_optimisers_are_built_from_the_plan():
    plan = plan_of("wsl_densenet_micro_256", "momentum=0.8", "nesterov=false", "weight_decay=0.001",
                   global_batch=1024)
    sgd = build_optimizer(create_model("wsl_densenet_micro_256", img_size=64), plan.recipe)
    g = sgd.param_groups
    assert isinstance(sgd, torch.optim.SGD) and g[0]["lr"] == 0.1 * 1024 / 256
    assert (g[0]["momentum"], g[0]["nesterov"], g[0]["weight_decay"], g[1]["weight_decay"]) == (0.8, False, 1e-3, 0.0)
    plan = plan_of("munet_micro_256", "betas=[0.8, 0.9]", "lr=0.01")
    adamw = build_optimizer(create_model("munet_micro_256", img_size=64), plan.recipe)
    assert isinstance(adamw, torch.optim.AdamW)
    assert (adamw.param_groups[0]["lr"], adamw.param_groups[0]["betas"]) == (0.01, (0.8, 0.9))
    with pytest.raises(ValueError, match="Lion is|the trainer's"):
        build_optimizer(create_model("mae_vit_micro_patch16_256"))
    with pytest.raises(ValueError, match="a sgd recipe needs momentum"):
        OptimizerRecipe("sgd", lr=0.1, weight_decay=0.0)


# ------------------------------------------------------------------------------------------------------------
# the training keys: overrides, checks, and the moved model keys refused
# ------------------------------------------------------------------------------------------------------------

def test_training_keys_override_the_recipe():
    plan = plan_of("mae_vit_micro_patch16_256", "lr=2e-3", "weight_decay=0.1", "betas=[0.8, 0.99]")
    assert (plan.lr, plan.weight_decay, plan.betas) == (2e-3, 0.1, (0.8, 0.99))
    plan = plan_of("wsl_densenet_micro_256", "momentum=0.5", "nesterov=false", "lr=0.3")
    assert (plan.lr, plan.momentum, plan.nesterov, plan.betas) == (0.3, 0.5, False, None)


@pytest.mark.parametrize("preset, key, value, message", [
    ("mae_vit_micro_patch16_256", "lr", "1e-3", "model.lr is a training setting now: use --set lr=..."),
    ("mae_vit_micro_patch16_256", "weight_decay", "0.1",
     "model.weight_decay is a training setting now: use --set weight_decay=..."),
    ("munet_micro_256", "betas", "[0.9, 0.99]", "model.betas is a training setting now: use --set betas=..."),
    ("wsl_densenet_micro_256", "momentum", "0.8", "model.momentum is a training setting now: use --set momentum=..."),
    ("wsl_densenet_micro_256", "nesterov", "false",
     "model.nesterov is a training setting now: use --set nesterov=..."),
    ("wsl_densenet_micro_256", "lr_batch", "512", "model.lr_batch is a training setting now: give the peak lr with "
                                                  "--set lr=..."),
    ("munet_micro_256", "optimizer", "sgd", "model.optimizer is a training setting now: each preset trains with its "
                                            "recipe's optimiser"),
    ("munet_micro_256", "schedule", "cosine", "model.schedule is a training setting now: the schedule is the "
                                              "trainer's one-cycle cosine"),
])
def test_moved_model_keys_are_refused_naming_the_training_key(tmp_path, preset, key, value, message):
    for make in (lambda: build_config(preset, overrides=[f"model.{key}={value}"]),
                 lambda: validate(TrainConfig(preset=preset, model={key: 1}, data=DataConfig(root="/x"), steps=1))):
        with pytest.raises(ConfigError) as err:
            make()
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    config = tmp_path / "run.yaml"
    config.write_text(f"preset: {preset}\nmodel:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{config}: {message}")):
        build_config(config_file=str(config))


@pytest.mark.parametrize("preset, overrides, message", [
    ("mae_vit_micro_patch16_256", ["lr=0"], "config key 'lr' must be > 0, got 0"),
    ("mae_vit_micro_patch16_256", ["weight_decay=-0.1"], "config key 'weight_decay' must be >= 0, got -0.1"),
    ("munet_micro_256", ["betas=[1.0, 0.9]"], r"config key 'betas' must be two numbers in \[0, 1\), got \[1.0, 0.9\]"),
    ("wsl_densenet_micro_256", ["momentum=1.5"], r"config key 'momentum' must be in \[0, 1\), got 1.5"),
    ("wsl_densenet_micro_256", ["momentum=0", "nesterov=true"], "config key 'nesterov' needs a momentum > 0"),
    ("mae_vit_micro_patch16_256", ["momentum=0.9"], "config key 'momentum' \\(0.9\\) does not apply to the MAE preset "
                                                    "mae_vit_micro_patch16_256: it trains with Lion, which has no "
                                                    "momentum; set betas instead"),
    ("munet_micro_256", ["nesterov=true"], "config key 'nesterov' \\(True\\) does not apply to the baseline "
                                           "munet_micro_256: it trains with AdamW, which has no nesterov$"),
    ("wsl_densenet_micro_256", ["betas=[0.9, 0.99]"], "does not apply to the baseline wsl_densenet_micro_256: it "
                                                      "trains with SGD \\(momentum\\), which has no betas; set "
                                                      "momentum instead"),
    ("wsl_densenet_micro_256", ["momentum=high"], "config key 'momentum': expected"),
])
def test_optimiser_keys_are_checked_one_line_naming_the_key(preset, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        plan_of(preset, *overrides)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------------------
# files written before the change
# ------------------------------------------------------------------------------------------------------------

def test_old_model_configs_load_without_their_optimiser_keys():
    for preset, meta in OLD_CONFIG_JSON.items():
        fields = {k: v for k, v in meta.items() if k not in ("model_type", "architecture", "step", "crops")}
        cfg = MAEConfig.from_dict(fields) if "family" not in fields else config_from_dict(fields)
        assert cfg == model_config(preset, **OVERRIDES[preset]), preset
    with pytest.raises(ValueError, match="unknown MAEConfig keys \\['depht'\\]"):  # other unknown keys still fail
        MAEConfig.from_dict({"depht": 3, "lr": 1e-4})


@pytest.mark.parametrize("preset", sorted(OLD_CONFIG_JSON))
def test_old_checkpoint_folders_load_on_every_path(tmp_path, preset):
    from mae_fast.inference.embed import EmbedConfig, load_embedding_model
    from mae_fast.training.checkpointer import export_checkpoint
    from mae_fast.training.pretrained import load_pretrained

    model, folder = old_folder(tmp_path, preset)
    assert read_config(folder) == model.cfg
    same_weights(load_model(folder), model)                                       # checkpoint.load_model
    same_weights(load_any(folder), model)                                         # interop.load_any
    loaded = from_pretrained(folder)                                              # hub (a local folder)
    same_weights(loaded, model)
    assert loaded.pretrained_info == {"step": 5, "crops": 40}  # the old optimiser keys are not metadata
    save_pretrained(loaded, str(tmp_path / "hub"))
    written = json.load(open(tmp_path / "hub" / "config.json"))
    assert not MOVED & set(written) and written["step"] == 5
    export_checkpoint(folder, str(tmp_path / "export"))                           # mae-fast export
    exported = json.load(open(tmp_path / "export" / "config.json"))
    assert not MOVED & set(exported) and exported["step"] == 5
    same_weights(load_model(str(tmp_path / "export")), model)
    embed_model, kind = load_embedding_model(EmbedConfig(checkpoint=folder, preset=preset,   # mae-fast embed
                                                         model={"img_size": 32}))
    assert kind == "ours"
    same_weights(embed_model, model)
    pretrained, kind = load_pretrained(folder)                                    # init_from
    assert kind == "ours"
    same_weights(pretrained, model)


def test_old_nested_and_timm_folders_load(tmp_path):
    model, folder = old_folder(tmp_path, "mae_vit_micro_patch16_256")
    old = OLD_CONFIG_JSON["mae_vit_micro_patch16_256"]
    nested = {"mae_fast_config": {k: v for k, v in old.items() if k not in ("model_type", "architecture", "step",
                                                                            "crops")}, "step": 7}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(nested, f)
    loaded = from_pretrained(folder)
    assert loaded.cfg == model.cfg and loaded.pretrained_info == {"step": 7}
    same_weights(loaded, model)
    timm = str(tmp_path / "timm")
    save_timm(model, timm)
    meta = json.load(open(os.path.join(timm, "config.json")))
    meta["mae_fast"]["config"].update(lr=1e-4, weight_decay=0.05, betas=[0.9, 0.95])  # save_timm's old entry
    json.dump(meta, open(os.path.join(timm, "config.json"), "w"))
    encoder = load_any(timm)
    assert encoder.cfg == model.cfg
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.encoder.state_dict().items())


def test_a_saved_run_config_maps_its_model_optimiser_keys_onto_the_training_keys():
    """A run's train_config.json (and a checkpoint's train state) of the earlier version: `--resume` goes on with
    the numbers the old trainer used."""
    old = {"preset": "mae_vit_micro_patch16_256", "global_batch": 8, "lr": None,
           "model": {"img_size": 64, "lr": 2e-4, "weight_decay": 0.1, "betas": [0.8, 0.9]}}
    cfg = TrainConfig.from_dict(old)
    assert (cfg.lr, cfg.weight_decay, cfg.betas, cfg.model) == (2e-4, 0.1, (0.8, 0.9), {"img_size": 64})
    # a top-level key that is set won in the old trainer: the model's had no effect
    assert TrainConfig.from_dict({**old, "lr": 1e-3, "weight_decay": 0.0}).lr == 1e-3
    assert TrainConfig.from_dict({**old, "lr": 1e-3, "weight_decay": 0.0}).weight_decay == 0.0
    # WSL: model.lr was per lr_batch crops, scaled with the global batch -> the peak lr the old trainer computed
    wsl = {"preset": "wsl_densenet_micro_256", "global_batch": 1024, "data": {"root": "/x"}, "steps": 1,
           "model": {"lr": 0.2, "lr_batch": 512, "momentum": 0.8, "nesterov": False, "weight_decay": 1e-3,
                     "optimizer": "sgd", "schedule": "one_cycle_cosine"}}
    cfg = TrainConfig.from_dict(wsl)
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.model) == (0.4, 0.8, False, 1e-3, {})
    plan = validate(cfg)
    assert (plan.lr, plan.momentum, plan.nesterov, plan.weight_decay) == (0.2 * 1024 / 512, 0.8, False, 1e-3)
    only_batch = TrainConfig.from_dict({**wsl, "model": {"lr_batch": 512}})
    assert only_batch.lr == 0.1 * 1024 / 512 and only_batch.momentum is None
    munet = TrainConfig.from_dict({"preset": "munet_micro_256", "global_batch": 4096, "model": {"lr": 2e-3}})
    assert munet.lr == 2e-3  # AdamW's lr never scaled (lr_batch 0)
    with pytest.raises(ConfigError, match="model.optimizer 'adamw' of this saved run is no setting any more: "
                                          "wsl_densenet_micro_256 trains with sgd"):
        TrainConfig.from_dict({**wsl, "model": {"optimizer": "adamw"}})
    new = TrainConfig(preset="munet_micro_256", lr=1e-3).to_dict()
    assert upgrade_saved_config(new) is new and TrainConfig.from_dict(new).to_dict() == new
