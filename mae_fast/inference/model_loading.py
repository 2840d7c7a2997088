"""Which model `embed` runs: a checkpoint (ours, OpenPhenom's, or a weights file with a preset's architecture),
checked against --preset, and whether it takes the dataset's channels."""
from __future__ import annotations

import torch

from mae_fast.checkpoint import CheckpointError
from mae_fast.models import model_config
from mae_fast.training.pretrained import load_pretrained
from mae_fast.training.config import ConfigError, check_model_ranges

# config keys that do not change what a model computes at inference (a --preset may differ from a checkpoint in them)
TRAINING_ONLY_KEYS = {
    "drop_path", "grad_checkpointing",                                                          # MAE
    "num_classes", "label_smoothing", "virtual_batch_size", "bn_momentum", "mask_ratio", "mask_patch",  # baselines
}


def preset_config(preset: str, overrides: dict):
    """The architecture of `preset` (an MAE or a baseline) with overrides; errors as ConfigError."""
    try:
        arch = model_config(preset, **overrides)
        if getattr(arch, "family", "mae") == "mae":
            check_model_ranges(arch)
        return arch
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(str(err).strip('"')) from err


def load_embedding_model(cfg) -> tuple[torch.nn.Module, str]:
    arch = None
    if cfg.preset:
        arch = preset_config(cfg.preset, cfg.model)
    elif cfg.model:
        raise ConfigError("model overrides need --preset (they describe the architecture of a weights file)")
    model, kind = load_pretrained(cfg.checkpoint, arch)  # also a Hub repo id (mae_fast.hub.resolve_checkpoint)
    if arch is not None and kind != "timm" and model.cfg.to_dict() != arch.to_dict():
        saved = model.cfg.to_dict()
        diffs = sorted(set(k for k, v in arch.to_dict().items() if saved.get(k) != v and k != "name")
                       | (set(saved) ^ set(arch.to_dict())))
        if any(k not in TRAINING_ONLY_KEYS for k in diffs):
            raise CheckpointError(f"{cfg.checkpoint} holds a {model.cfg.name} model that differs from --preset "
                                  f"{cfg.preset} in {diffs}")
    return model, kind


def check_channels(model: torch.nn.Module, index, per_channel: bool) -> None:
    m = model.cfg
    C = len(index.channels)
    channel_agnostic = getattr(m, "channel_agnostic", False)
    if per_channel and not channel_agnostic:
        kind = "a standard MAE" if not hasattr(m, "family") else f"the {m.family.upper()} baseline {m.name}"
        raise ConfigError(f"--per-channel needs a channel-agnostic (CA-MAE) model; this one is {kind}")
    if channel_agnostic:
        if not 1 <= C <= m.max_in_chans:
            raise ConfigError(f"the CA-MAE model takes 1..{m.max_in_chans} channels, the dataset has {C}")
    elif C != m.in_chans:
        raise ConfigError(f"the model expects {m.in_chans} channels, the dataset has {C} "
                          f"({', '.join(index.channels)}); choose channels with --channels")
