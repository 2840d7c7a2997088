"""The CNN baselines of Kraus et al. 2023 (seed 000) -- weakly supervised DenseNet-161 (WSL, `wsl.py`) and masked U-Nets
(MU-Net, `munet.py`) -- in plain PyTorch, with the interface of `mae_fast.models.MaskedAutoencoder`:

    model.cfg                        a frozen config dataclass: name, family ("wsl" / "munet"), img_size, in_chans,
                                     embed_dim, the optimiser defaults (optimizer, lr, lr_batch, betas or
                                     momentum/nesterov, weight_decay, schedule), to_dict()
    model(images, labels=None)       raw uint8/uint16 (B, C, H, W) crops -> output with .loss
                                     (WSL needs `labels`, (B,) class ids; MU-Net ignores them)
    model.embed(images)              -> (B, embed_dim), no masking; WSL: the 128-d neck; MU-Net: pooled bottleneck
    model.check_images(images)       validates a raw batch, returns its channel count

Inputs are self-standardised like the MAE's (uint8/255 or uint16/65535, then per-image per-channel
standardisation over H x W, `mae_fast.ops`).

This module holds what the two share: config checks, the input checks and standardisation, the optimiser.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn as nn

from mae_fast import ops

OPTIMIZERS = ("sgd", "adamw")


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only (not on norms and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg=None, *, lr: float | None = None,
                    weight_decay: float | None = None, global_batch: int | None = None,
                    betas: tuple[float, float] | None = None) -> torch.optim.Optimizer:
    """The config's optimiser: SGD (Nesterov momentum) for WSL, AdamW for MU-Net. lr: given, else
    `cfg.peak_lr(global_batch)` (linear scaling for SGD), else `cfg.lr`; `betas` (AdamW only) overrides the
    config's. The schedule is the trainer's."""
    cfg = cfg or model.cfg
    if lr is None:
        lr = cfg.peak_lr(global_batch) if global_batch else cfg.lr
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    groups = param_groups(model, wd)
    if cfg.optimizer == "sgd":
        if betas is not None:
            raise ValueError(f"{cfg.name} trains with SGD (momentum {cfg.momentum}), which has no betas")
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas if betas is None else betas), weight_decay=wd)
