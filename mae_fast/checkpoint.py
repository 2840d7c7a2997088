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
    save_config(model.cfg, directory, extra)
    return directory


def save_config(cfg, directory: str, extra: dict | None = None) -> None:
    """`directory/config.json`: the model config and `extra` keys (a sharded checkpoint has it without weights)."""
    atomic_write_json(os.path.join(directory, CONFIG_NAME), {"mae_fast_config": cfg.to_dict(), **(extra or {})})


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
            meta = json.load(f)
        return _config_of(meta["mae_fast_config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
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
