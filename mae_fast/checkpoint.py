"""Our model checkpoints: a directory with `model.safetensors` (weights) + `config.json` (the MAEConfig, or a
baseline's WSLConfig / MUNetConfig, told apart by its `family` key), written atomically (`mae_fast.io`).
`save_model` / `load_model` write and rebuild either kind; foreign formats (timm, OpenPhenom) are in
`mae_fast.interop`, whose `load_any` takes ours or theirs.
"""
from __future__ import annotations

import json
import os

import torch

from mae_fast.io import atomic_write, atomic_write_json
from mae_fast.models import MAEConfig, config_from_dict, create_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the file and the offending keys."""


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_model(model: torch.nn.Module, directory: str, extra: dict | None = None) -> str:
    """Write `directory/model.safetensors` + `directory/config.json` for any model with `cfg.to_dict()` (MAE,
    baselines); `extra` keys go into config.json beside the config. Returns the directory."""
    from safetensors.torch import save_file

    state = _contiguous_cpu(model.state_dict())
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    meta = {"mae_fast_config": model.cfg.to_dict(), **(extra or {})}
    atomic_write_json(os.path.join(directory, CONFIG_NAME), meta)
    return directory


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



def load_model(directory: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a checkpoint written by `save_model`: a MaskedAutoencoder, or a baseline (WSLClassifier / MaskedUNet)
    when the saved config has a baseline `family`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for path in (cfg_path, weights_path):
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
        cfg = _config_of(meta["mae_fast_config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_path} is not a mae_fast config: {err}") from err
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
    from mae_fast.models import BASELINE_PRESETS, PRESETS

    preset = PRESETS.get(cfg.name) or BASELINE_PRESETS.get(cfg.name)
    if preset is None or type(preset) is not type(cfg):
        return cfg.name
    diffs = [f"{k} {getattr(cfg, k)} (preset {getattr(preset, k)})" for k in ARCHITECTURE_KEYS
             if hasattr(cfg, k) and getattr(cfg, k) != getattr(preset, k)]
    return f"{cfg.name} modified ({', '.join(diffs)})" if diffs else cfg.name
