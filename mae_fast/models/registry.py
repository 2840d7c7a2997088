"""Every model preset by name, and one constructor for all of them.

    MAE / CA-MAE ViTs   `mae.py` (PRESETS: mae_vit_{small,base,large}_patch{8,16}_256, camae_..., micro presets)
    WSL DenseNet-161    `wsl.py`    } the CNN baselines of Kraus et al. 2023 (BASELINE_PRESETS below)
    MU-Net-M / -L       `munet.py`  }

`create_model(name, **overrides)` builds any of them; `model_config(name)` returns its config; `list_models()` lists
every name.
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch.nn as nn

from mae_fast.models.mae import MAEConfig, MaskedAutoencoder, get_config, list_presets
from mae_fast.models.munet import MaskedUNet, MUNetConfig
from mae_fast.models.wsl import WSLClassifier, WSLConfig

BaselineConfig = WSLConfig | MUNetConfig
CONFIG_CLASSES: dict[str, type] = {"wsl": WSLConfig, "munet": MUNetConfig}


def config_from_dict(d: dict) -> BaselineConfig:
    """Inverse of `cfg.to_dict()` (checkpoints): the `family` key picks the config class."""
    d = dict(d)
    family = d.pop("family", None)
    if family not in CONFIG_CLASSES:
        raise ValueError(f"not a baseline config: family {family!r} (expected one of {sorted(CONFIG_CLASSES)})")
    cls = CONFIG_CLASSES[family]
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


BASELINE_PRESETS: dict[str, BaselineConfig] = {
    "wsl_densenet161_256": WSLConfig("wsl_densenet161_256"),
    "wsl_densenet161_adabn_256": WSLConfig("wsl_densenet161_adabn_256", adabn=True),
    "munet_m_256": MUNetConfig("munet_m_256"),
    "munet_l_256": MUNetConfig("munet_l_256", widths=(32, 64, 128, 256, 512, 1024), encoder_units=(1,) * 6,
                               decoder_units=(1,) * 5, bottleneck_units=1),
    # not in the paper: CPU demo and tests
    "wsl_densenet_micro_256": WSLConfig("wsl_densenet_micro_256", growth_rate=8, block_config=(2, 2, 2, 2),
                                        num_init_features=16, bn_size=2, neck_dim=32),
    "wsl_densenet_micro_adabn_256": WSLConfig("wsl_densenet_micro_adabn_256", growth_rate=8,
                                              block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2,
                                              neck_dim=32, adabn=True, virtual_batch_size=8),
    "munet_micro_256": MUNetConfig("munet_micro_256", widths=(8, 16, 32, 64), encoder_units=(1,) * 4,
                                   decoder_units=(1,) * 3, kernel_size=3),
}


def list_baselines() -> list[str]:
    return sorted(BASELINE_PRESETS)


def is_baseline(name: str) -> bool:
    return name in BASELINE_PRESETS


def get_baseline_config(name: str, **overrides) -> BaselineConfig:
    """A preset by name with field overrides (`get_baseline_config("wsl_densenet161_256", num_classes=1139)`)."""
    if name not in BASELINE_PRESETS:
        raise KeyError(f"unknown baseline preset {name!r}; available: {', '.join(list_baselines())}")
    return _override(BASELINE_PRESETS[name], overrides)


def _override(cfg: BaselineConfig, overrides: dict) -> BaselineConfig:
    if not overrides:
        return cfg
    valid = {f.name for f in fields(cfg)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown config keys {bad} for {type(cfg).__name__}; valid keys: {sorted(valid)}")
    return replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def create_baseline(name_or_cfg: str | BaselineConfig, **overrides) -> "WSLClassifier | MaskedUNet":
    """timm-style constructor: `create_baseline("munet_m_256")`, `create_baseline("wsl_densenet161_256",
    num_classes=17064)`."""
    if isinstance(name_or_cfg, str):
        cfg = get_baseline_config(name_or_cfg, **overrides)
    else:
        cfg = _override(name_or_cfg, overrides)
    return WSLClassifier(cfg) if cfg.family == "wsl" else MaskedUNet(cfg)


def list_models() -> list[str]:
    """Every preset name: the MAE / CA-MAE ViTs, then the CNN baselines."""
    return list_presets() + list_baselines()


def model_config(name: str, **overrides) -> MAEConfig | BaselineConfig:
    """The config of any preset, with field overrides."""
    return get_baseline_config(name, **overrides) if is_baseline(name) else get_config(name, **overrides)


def create_model(name_or_cfg: str | MAEConfig | BaselineConfig, **overrides) -> nn.Module:
    """timm-style constructor of any model: `create_model("mae_vit_large_patch8_256")`,
    `create_model("wsl_densenet161_256", num_classes=1139)`, or from a config object with overrides."""
    if isinstance(name_or_cfg, (WSLConfig, MUNetConfig)) or (isinstance(name_or_cfg, str) and is_baseline(name_or_cfg)):
        return create_baseline(name_or_cfg, **overrides)
    cfg = get_config(name_or_cfg, **overrides) if isinstance(name_or_cfg, str) else replace(name_or_cfg, **overrides)
    return MaskedAutoencoder(cfg)
