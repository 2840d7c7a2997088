"""Our model checkpoints: a directory with `model.safetensors` (weights) + `config.json`, written atomically
(`mae_fast.io`). `save_model` / `load_model` write and rebuild an MAE / CA-MAE or a baseline; foreign formats
(timm, OpenPhenom) are in `mae_fast.interop`, whose `load_any` takes ours or theirs; `mae_fast.hub` adds the
Hugging Face Hub (from_pretrained / save_pretrained / push_to_hub).

config.json is a Hub-style model config, flat: `model_type` "mae_fast", `architecture` (the model class:
MaskedAutoencoder, WSLClassifier, MaskedUNet), the model config's fields (a baseline's with its `family`), then any
metadata the writer adds (training step, crops, WSL class names). Folders written before this layout hold the config
nested under `mae_fast_config` (metadata beside it); they still load, as do configs that still hold the optimiser
settings (lr, weight_decay, betas, ...: now the training side's, `mae_fast.training.recipes`), which are dropped.
"""
from __future__ import annotations

import json
import os

import torch

from mae_fast.io import atomic_write, atomic_write_json
# the modules, not the `mae_fast.models` package: its __init__ imports mae_fast.hub, which reads checkpoints
from mae_fast.models.baseline_common import RETIRED_KEYS as BASELINE_RETIRED_KEYS
from mae_fast.models.mae import RETIRED_KEYS as MAE_RETIRED_KEYS
from mae_fast.models.mae import MAEConfig
from mae_fast.models.registry import CONFIG_CLASSES, config_from_dict, create_model, model_config

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPE = "mae_fast"           # config.json's `model_type`: the folder is ours
LEGACY_CONFIG_KEY = "mae_fast_config"  # the nested layout of earlier folders
ARCHITECTURES = {"mae": "MaskedAutoencoder", "wsl": "WSLClassifier", "munet": "MaskedUNet"}  # family -> class


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the file and the offending keys."""


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_model(model: torch.nn.Module, directory: str, extra: dict | None = None) -> str:
    """Write `directory/model.safetensors` + `directory/config.json` for any model with `cfg.to_dict()` (MAE,
    baselines); `extra` keys go into config.json beside the config. Returns the directory."""
    from safetensors.torch import save_file

    meta = config_json(model.cfg, extra)
    state = _contiguous_cpu(model.state_dict())
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(directory, CONFIG_NAME), meta)
    return directory


def save_config(cfg, directory: str, extra: dict | None = None) -> None:
    """`directory/config.json` alone (a sharded training checkpoint has it beside its shards, without weights)."""
    atomic_write_json(os.path.join(directory, CONFIG_NAME), config_json(cfg, extra))


def config_json(cfg, extra: dict | None = None) -> dict:
    """The flat Hub-style config.json of a model config (see the module doc); `extra` must not reuse its keys."""
    family = getattr(cfg, "family", "mae")
    fields = cfg.to_dict()
    if family != "mae":
        fields["family"] = family
    head = {"model_type": MODEL_TYPE, "architecture": ARCHITECTURES[family]}
    clash = sorted(set(extra or {}) & (set(fields) | set(head)))
    if clash:
        raise ValueError(f"checkpoint metadata keys {clash} clash with the model config's keys")
    return {**head, **fields, **(extra or {})}


def is_our_config(meta) -> bool:
    """Whether a parsed config.json is ours (either layout)."""
    return isinstance(meta, dict) and (LEGACY_CONFIG_KEY in meta or meta.get("model_type") == MODEL_TYPE)


def split_config(meta: dict):
    """(model config, metadata) of our parsed config.json, either layout; ValueError/KeyError/TypeError when it
    does not describe a model."""
    if LEGACY_CONFIG_KEY in meta:
        return _config_of(meta[LEGACY_CONFIG_KEY]), {k: v for k, v in meta.items() if k != LEGACY_CONFIG_KEY}
    families = {name: family for family, name in ARCHITECTURES.items()}
    family = families.get(meta.get("architecture"))
    if family is None:
        raise ValueError(f"architecture {meta.get('architecture')!r} is not one of {sorted(families)}")
    cls = MAEConfig if family == "mae" else CONFIG_CLASSES[family]
    names = set(cls.__dataclass_fields__) - {"family"}
    fields = {k: v for k, v in meta.items() if k in names}
    if family != "mae":
        fields["family"] = family
    # the optimiser keys of folders written before the model config held the architecture only: neither model
    # config nor metadata (a save_pretrained of the loaded model leaves them out)
    retired = MAE_RETIRED_KEYS if family == "mae" else BASELINE_RETIRED_KEYS
    metadata = {k: v for k, v in meta.items()
                if k not in names and k not in retired and k not in ("model_type", "architecture", "family")}
    return _config_of(fields), metadata


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that reports every missing, unexpected and wrongly shaped key in one clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _config_of(saved: dict):
    """The model config saved by `save_model`: a baseline's (its `family` key names the class) or an MAEConfig."""
    if isinstance(saved, dict) and "family" in saved:
        return config_from_dict(saved)
    return MAEConfig.from_dict(saved)



def read_config(directory: str):
    """The model config of a checkpoint folder's config.json (written by `save_model` / `save_config`)."""
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"checkpoint file {cfg_path} does not exist")
    try:
        with open(cfg_path) as f:
            return split_config(json.load(f))[0]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{cfg_path} is not a mae_fast config: {err}") from err


def load_model(directory: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a checkpoint written by `save_model`: a MaskedAutoencoder, or a baseline (WSLClassifier / MaskedUNet)
    when the saved config has a baseline `family`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        raise CheckpointError(f"checkpoint file {weights_path} does not exist")
    cfg = read_config(directory)
    try:
        state = load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {err}") from err
    model = create_model(cfg)
    load_state_dict_strict(model, state, weights_path)
    return model


# what makes a preset what it is (its size); img_size, channels and training settings may differ from the preset's
ARCHITECTURE_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "decoder_dim", "decoder_depth",
                     "decoder_heads", "channel_agnostic", "growth_rate", "block_config", "num_init_features",
                     "neck_dim", "widths", "encoder_units", "decoder_units")


def describe_model(cfg) -> str:
    """The model's name for messages: its preset's name, or `PRESET modified (the differences)` when its
    architecture is not that preset's (a hand-edited config.json, or a run with model overrides), so that no output
    reports it as the preset. The config itself keeps its name (a checkpoint loads as it was saved)."""
    try:
        preset = model_config(cfg.name)
    except (KeyError, ValueError):  # not a preset's name
        return cfg.name
    if type(preset) is not type(cfg):
        return cfg.name
    diffs = [f"{k} {getattr(cfg, k)} (preset {getattr(preset, k)})" for k in ARCHITECTURE_KEYS
             if hasattr(cfg, k) and getattr(cfg, k) != getattr(preset, k)]
    return f"{cfg.name} modified ({', '.join(diffs)})" if diffs else cfg.name
