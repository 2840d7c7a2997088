"""Pre-trained weights from any supported source (our checkpoints and run folders, OpenPhenom, timm encoder state
dicts, safetensors or weights-only torch files): `load_pretrained` for embedding, `init_weights_from` to start a
training run from them."""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from mae_fast.checkpoint import CONFIG_NAME, CheckpointError, WEIGHTS_NAME, load_state_dict_strict
from mae_fast.hub import resolve_checkpoint
from mae_fast.interop import checkpoint_kind, from_timm_state_dict, load_any
from mae_fast.models import MaskedAutoencoder, create_model
from mae_fast.training.checkpointing import is_sharded, list_checkpoints
from mae_fast.training.config import ModelConfig, model_family


def _baseline_from_state(cfg, state: dict[str, torch.Tensor], path: str):
    """A baseline of architecture `cfg` holding a bare state dict; a WSL head's class count is read from it."""
    if model_family(cfg) == "wsl" and "head.weight" in state:
        cfg = replace(cfg, num_classes=int(state["head.weight"].shape[0]))
    model = create_model(cfg)
    load_state_dict_strict(model, state, path)
    return model


def load_pretrained(path: str, cfg: ModelConfig | None = None) -> tuple[torch.nn.Module, str]:
    """A model from any supported source -> (model, kind), kind one of "ours", "openphenom", "timm":
    our checkpoint folder (or a training run folder: its `model/`, else its newest checkpoint, either format; MAE or
    baseline), a timm encoder folder, an OpenPhenom folder or file, a Hugging Face Hub repo id holding one of these
    folders (`mae_fast.hub`), or a single state dict file (safetensors or weights-only torch) -- a timm encoder, or
    our full model's weights (MAE or baseline) -- which needs the architecture `cfg` (a preset)."""
    path = resolve_checkpoint(path)  # a local path as it is; a repo id: its cached snapshot folder
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "model", CONFIG_NAME)):
            path = os.path.join(path, "model")
        elif not os.path.exists(os.path.join(path, WEIGHTS_NAME)) and list_checkpoints(path):
            path = list_checkpoints(path)[-1][1]
        if is_sharded(path):  # a sharded training checkpoint: its shards gathered into one model here
            from mae_fast.training.checkpointer import read_sharded_model

            return read_sharded_model(path), "ours"
        model = load_any(path)
        if checkpoint_kind(path) == "timm":
            return model, "timm"
        return model, "openphenom" if model.cfg.name == "openphenom" else "ours"
    state = read_state_file(path)
    if any(k.startswith("encoder.vit_backbone.") for k in state):
        from mae_fast.interop import load_openphenom

        return load_openphenom(path), "openphenom"
    if cfg is None:
        raise CheckpointError(f"{path} is a single weights file: give the preset of its architecture (--preset) to "
                              "read it as a timm encoder state dict")
    if model_family(cfg) != "mae":
        return _baseline_from_state(cfg, state, path), "ours"
    if any(k.startswith(("encoder.", "decoder.")) for k in state):  # our full model's names
        model = MaskedAutoencoder(cfg)
        load_state_dict_strict(model, state, path)
        return model, "ours"
    return from_timm_state_dict(state, cfg, path), "timm"


def init_weights_from(path: str, model: torch.nn.Module) -> None:
    """Load pre-trained weights into `model`; the architectures must match (mismatched keys are named). A timm
    encoder fills the encoder only (the decoder keeps its fresh initialisation)."""
    loaded, kind = load_pretrained(path, model.cfg)
    if model_family(loaded.cfg) != model_family(model.cfg):
        raise CheckpointError(f"{path} holds a {model_family(loaded.cfg)} model ({loaded.cfg.name}); this run trains "
                              f"a {model_family(model.cfg)} model ({model.cfg.name})")
    if kind == "timm":
        load_state_dict_strict(model.encoder, loaded.encoder.state_dict(), path)
    else:
        load_state_dict_strict(model, loaded.state_dict(), path)


def read_state_file(path: str) -> dict[str, torch.Tensor]:
    """A tensor state dict from a safetensors file or a weights-only torch file (never an arbitrary pickle)."""
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except Exception:  # noqa: BLE001 - not safetensors: try the weights-only torch format
        pass
    try:
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path} is neither safetensors nor a weights-only torch file: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no tensor state dict")
    return obj
