"""Every model preset by name, in one registry (timm's pattern), and one constructor for all of them.

    MAE / CA-MAE ViTs   `mae.py`    mae_vit_{micro,tiny,small,base,large}_patch{8,16}_256, camae_vit_...
    WSL DenseNet-161    `wsl.py`    } the CNN baselines of Kraus et al. 2023
    MU-Net-M / -L       `munet.py`  }

`register_model` adds a preset (a config, or a function returning one: then it is a decorator and the function's
name is the preset's); `create_model(name, **overrides)` builds any preset or config; `model_config(name,
**overrides)` returns a preset's config; `list_models(family)` lists the names ("mae", "wsl", "munet", "baseline").
"""
from __future__ import annotations

import fnmatch
from dataclasses import fields, replace
from typing import Callable

import torch.nn as nn

from mae_fast.models.baseline_common import RETIRED_KEYS
from mae_fast.models.mae import MAEConfig, MaskedAutoencoder
from mae_fast.models.munet import MaskedUNet, MUNetConfig
from mae_fast.models.wsl import WSLClassifier, WSLConfig

BaselineConfig = WSLConfig | MUNetConfig
ModelConfig = MAEConfig | WSLConfig | MUNetConfig
CONFIG_CLASSES: dict[str, type] = {"wsl": WSLConfig, "munet": MUNetConfig}
MODEL_CLASSES: dict[type, type[nn.Module]] = {MAEConfig: MaskedAutoencoder, WSLConfig: WSLClassifier,
                                              MUNetConfig: MaskedUNet}
BASELINE_FAMILIES = ("wsl", "munet")

_PRESETS: dict[str, ModelConfig] = {}


def register_model(preset: ModelConfig | Callable[[], ModelConfig]):
    """Add a preset: a config (named by its `name`), or a function returning one (named by the function; so this
    is also a decorator, as timm's). Returns its argument."""
    cfg = preset() if callable(preset) else preset
    name = preset.__name__ if callable(preset) else cfg.name
    if name != cfg.name:
        raise ValueError(f"preset {name!r} returns a config named {cfg.name!r}")
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is registered already")
    if type(cfg) not in MODEL_CLASSES:
        raise TypeError(f"preset {name!r}: {type(cfg).__name__} is no model config ({sorted(map(str, MODEL_CLASSES))})")
    _PRESETS[name] = cfg
    return preset


def list_models(family: str | None = None, pattern: str = "*") -> list[str]:
    """Sorted preset names, of one family ("mae", "wsl", "munet", or "baseline" for both CNNs) and matching a
    shell-style `pattern`."""
    families = BASELINE_FAMILIES if family == "baseline" else (family,)
    return sorted(name for name, cfg in _PRESETS.items()
                  if (family is None or cfg.family in families) and fnmatch.fnmatchcase(name, pattern))


def list_presets() -> list[str]:
    """The MAE / CA-MAE presets (`list_models("mae")`)."""
    return list_models("mae")


def model_config(name: str, **overrides) -> ModelConfig:
    """A preset's config with field overrides (`model_config("mae_vit_small_patch16_256", in_chans=5)`)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; available presets: {', '.join(list_models())}")
    return with_overrides(_PRESETS[name], overrides)


def with_overrides(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    if not overrides:
        return cfg
    valid = {f.name for f in fields(cfg)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown config keys {bad} for {type(cfg).__name__}; valid keys: {sorted(valid)}")
    return replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def create_model(name_or_cfg: str | ModelConfig, **overrides) -> nn.Module:
    """timm-style constructor of any model: `create_model("mae_vit_large_patch8_256")`,
    `create_model("wsl_densenet161_256", num_classes=1139)`, or from a config object with overrides."""
    if isinstance(name_or_cfg, str):
        cfg = model_config(name_or_cfg, **overrides)
    else:
        cfg = with_overrides(name_or_cfg, overrides)
    return MODEL_CLASSES[type(cfg)](cfg)


def config_from_dict(d: dict) -> BaselineConfig:
    """Inverse of a baseline's `cfg.to_dict()` (checkpoints): the `family` key picks the config class. Configs of
    earlier versions load too: their optimiser keys (`baseline_common.RETIRED_KEYS`) are dropped."""
    d = {k: v for k, v in d.items() if k not in RETIRED_KEYS}
    family = d.pop("family", None)
    if family not in CONFIG_CLASSES:
        raise ValueError(f"not a baseline config: family {family!r} (expected one of {sorted(CONFIG_CLASSES)})")
    cls = CONFIG_CLASSES[family]
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ------------------------------------------------------------------------------------------------------------
# The presets
# ------------------------------------------------------------------------------------------------------------

# name: (embed_dim, depth, heads, drop_path); each size's optimiser recipe is mae_fast.training.recipes'
_SIZES = {
    "micro": (192, 4, 3, 0.0),    # not in the paper: CPU demo and tests
    "tiny": (192, 12, 3, 0.1),
    "small": (384, 12, 6, 0.1),
    "base": (768, 12, 12, 0.1),
    "large": (1024, 24, 16, 0.3),
}
for _size, (_dim, _depth, _heads, _dp) in _SIZES.items():
    # the micro presets' decoders are small too (CPU demo and tests)
    _decoder = dict(decoder_dim=128, decoder_depth=2, decoder_heads=4) if _size == "micro" else {}
    for _patch in (8, 16):
        register_model(MAEConfig(f"mae_vit_{_size}_patch{_patch}_256", patch_size=_patch, embed_dim=_dim,
                                 depth=_depth, num_heads=_heads, drop_path=_dp, **_decoder))
        # CA-MAE decoder as in OpenPhenom's released config: 256-d, 4 blocks per channel, 16 heads (8 in the
        # shared cross-attention), LayerNorm eps 1e-6.
        register_model(MAEConfig(f"camae_vit_{_size}_patch{_patch}_256", patch_size=_patch, embed_dim=_dim,
                                 depth=_depth, num_heads=_heads, drop_path=_dp, channel_agnostic=True,
                                 **(_decoder or dict(decoder_dim=256, decoder_depth=4, decoder_heads=16))))

register_model(WSLConfig("wsl_densenet161_256"))
register_model(WSLConfig("wsl_densenet161_adabn_256", adabn=True))
register_model(MUNetConfig("munet_m_256"))
register_model(MUNetConfig("munet_l_256", widths=(32, 64, 128, 256, 512, 1024), encoder_units=(1,) * 6,
                           decoder_units=(1,) * 5, bottleneck_units=1))
# not in the paper: CPU demo and tests
register_model(WSLConfig("wsl_densenet_micro_256", growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16,
                         bn_size=2, neck_dim=32))
register_model(WSLConfig("wsl_densenet_micro_adabn_256", growth_rate=8, block_config=(2, 2, 2, 2),
                         num_init_features=16, bn_size=2, neck_dim=32, adabn=True, virtual_batch_size=8))
register_model(MUNetConfig("munet_micro_256", widths=(8, 16, 32, 64), encoder_units=(1,) * 4,
                           decoder_units=(1,) * 3, kernel_size=3))
