"""The CNN baselines of Kraus et al. 2023 (seed 000) -- weakly supervised DenseNet-161 (WSL, `wsl.py`) and masked U-Nets
(MU-Net, `munet.py`) -- in plain PyTorch, with the interface of `mae_fast.models.MaskedAutoencoder`:

    model.cfg                        a frozen config dataclass of the architecture: name, family ("wsl" /
                                     "munet"), img_size, in_chans, embed_dim, to_dict() (the optimiser recipe is
                                     the training side's: mae_fast.training.recipes)
    model(images, labels=None)       raw uint8/uint16 (B, C, H, W) crops -> output with .loss
                                     (WSL needs `labels`, (B,) class ids; MU-Net ignores them)
    model.embed(images)              -> (B, embed_dim), no masking; WSL: the 128-d neck; MU-Net: pooled bottleneck
    model.check_images(images)       validates a raw batch, returns its channel count

Inputs are self-standardised like the MAE's (uint8/255 or uint16/65535, then per-image per-channel
standardisation over H x W, `mae_fast.ops`).

This module holds what the two share: config checks and (de)serialisation, the input checks and standardisation.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from mae_fast import ops

# the optimiser settings the baseline configs held before they moved to the training side (mae_fast.training.recipes):
# configs written then still load, without them (a resumed run maps them onto its training keys)
RETIRED_KEYS = ("optimizer", "lr", "lr_batch", "betas", "momentum", "nesterov", "weight_decay", "schedule")


def positive(name: str, value) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def config_to_dict(cfg) -> dict:
    d = {"family": cfg.family, **asdict(cfg)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def check_images(cfg, images: torch.Tensor) -> int:
    """Validate a raw image batch (B, C, img_size, img_size) of uint8/uint16 (or floats in [0, 1]); returns C."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    B, C, H, W = images.shape
    if B < 1:
        raise ValueError("images must hold at least one crop")
    if H != W or H != cfg.img_size:
        raise ValueError(f"model {cfg.name} takes {cfg.img_size}x{cfg.img_size} crops (tile larger images with "
                         f"mae_fast.data), got {H}x{W}")
    if C != cfg.in_chans:
        raise ValueError(f"model {cfg.name} expects {cfg.in_chans} channels, got {C}")
    if images.is_floating_point():
        ops.to_unit_float(images, check_range=True)
    elif images.dtype not in (torch.uint8, torch.uint16, torch.int32):
        raise TypeError(f"images must be uint8, uint16 or float in [0, 1], got dtype {images.dtype}")
    return C


def standardized(images: torch.Tensor) -> torch.Tensor:
    """Raw crops -> [0, 1] -> per-image per-channel standardisation (float32), as the MAE's input."""
    return ops.self_standardize(images)
