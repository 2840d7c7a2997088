"""The baselines of Kraus et al. 2023 (seed 000): weakly supervised DenseNet-161 (WSL, with and without AdaBN) and
masked U-Nets (MU-Net-M, MU-Net-L), in plain PyTorch, with the interface of `mae_fast.models.MaskedAutoencoder`:

    model.cfg                        a frozen config dataclass: name, family ("wsl" / "munet"), img_size, in_chans,
                                     embed_dim, the optimiser defaults (optimizer, lr, lr_batch, betas or
                                     momentum/nesterov, weight_decay, schedule), to_dict()
    model(images, labels=None)       raw uint8/uint16 (B, C, H, W) crops -> output with .loss
                                     (WSL needs `labels`, (B,) class ids; MU-Net ignores them)
    model.embed(images)              -> (B, embed_dim), no masking; WSL: the 128-d neck; MU-Net: pooled bottleneck
    model.check_images(images)       validates a raw batch, returns its channel count

Inputs are self-standardised like the MAE's (uint8/255 or uint16/65535, then per-image per-channel
standardisation over H x W, `mae_fast.ops`).

WSL (Sypetkowski et al. 2023, the RxRx1 baseline the seed re-implements): DenseNet-161 (growth 48, blocks
(6, 12, 36, 24), 96 initial features, bottleneck width 4 x growth, compression 0.5) with a 6-channel stem; parameter
names follow torchvision's `densenet161().features`, so its weights load by name (all but `conv0`, whose input
channels differ). The neck (the RxRx1 authors' design): ReLU + global average pool of the 2208 feature maps ->
BN -> Linear(2208, 128, no bias) -> ReLU -> BN -> Linear(128, 128, no bias) -> BN; its output is the embedding.
A linear classifier over the perturbation classes on top is trained with cross-entropy. The seed's "28M
parameters" is DenseNet-161's usual count; backbone + neck here are 26.79M (6-channel stem), 4.3% below it.
AdaBN variant: every BatchNorm is a `GhostBatchNorm` that normalises with the statistics of the current batch at
training time (per virtual batch) *and* at inference (the whole batch), so batches must come from one plate
(`mae_fast.data.samplers.PlateBatchSampler`); the embedding of a crop then depends on its batch companions.
Optimiser: the seed says "a specially tuned SGD" without values; the defaults here are DenseNet's SGD recipe
(Huang et al. 2017: lr 0.1 per 256 crops, Nesterov momentum 0.9, weight decay 1e-4), the lr scaled linearly with
the global batch (Goyal et al. 2017; 1.6 at the paper's 4,096) and the trainer's one-cycle cosine schedule.

MU-Net (the seed follows Xun et al. 2023, Microsnoop, whose CNN is cellpose's residual U-Net): per scale a stage
of residual units (unit = two pre-activation BN-ReLU-Conv k x k; the first unit of a stage has a BN + 1x1
projection shortcut; 2x2 max-pool between stages); a decoder that mirrors the scales with nearest-neighbour
upsampling, the skip *added* after the stage's first conv, and a "style" vector (the L2-normalised global average of
the bottleneck) added through a Linear to the input of every later decoder conv; cellpose's extra decoder stage at
the bottleneck resolution (its skip is the bottleneck itself); a BN-ReLU-1x1 conv head back to C channels.
Trained as a masked autoencoder: 16 x 16 patches (25%) are zeroed in the standardised input (0 = the image's
channel mean), the loss is the MSE on the masked pixels. Kernel 5, AdamW (0.9, 0.95), wd 0.05, lr 1e-3, one-cycle
cosine (the seed's "cyclic cosine").
Block counts: the seed gives 52M (M: scales 32..512) and 135M (L: + 1024) but not the blocks. No rule applied
alike to both can give both: MU-Net-L's five deepest scales are MU-Net-M with every width doubled, so any rule
fixed relative to the bottleneck gives L = 4.0 x M, while the paper's ratio is 2.6 (at k = 5: Microsnoop's exact
blocks 69.8M / 279.5M; a plain double-conv U-Net with transposed-conv upsampling and concatenated skips
20.3M / 81.4M). The counts are therefore explicit per-scale config (`encoder_units`, `decoder_units`,
`bottleneck_units`), chosen within this one block family:
    MU-Net-L: one residual unit in every encoder stage, decoder stage and the bottleneck stage -> 135.57M (+0.4%)
    MU-Net-M: cellpose's two units per encoder stage (its `resdown`), one per decoder and bottleneck stage
              (a lighter decoder, as MAE decoders are) -> 51.32M (-1.3%)
In this family 135M leaves L one unit per stage (one 1024-wide unit at k = 5 alone holds 52M); M's 52M then
matches a two-unit encoder with the same one-unit decoder. Consequence: L has fewer full-resolution convs than M,
so it costs fewer FLOPs per 256² crop (forward 88.1 vs 106.2 GFLOP). The nested alternative -- M's encoder up to
width 256, one unit at 512 and 1024, `encoder_units=(2, 2, 2, 2, 1, 1)` -- gives L 139.93M (+3.7%) and 114.9 GFLOP.
Embedding: the global average of the bottleneck (the deepest encoder stage), as Microsnoop embeds: the skip
connections hand pixel detail straight to the decoder, so only the bottleneck must summarise the whole crop.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_fast import ops

# ------------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------------

OPTIMIZERS = ("sgd", "adamw")


def _positive(name: str, value) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class WSLConfig:
    name: str = "custom_wsl"
    img_size: int = 256
    in_chans: int = 6
    growth_rate: int = 48
    block_config: tuple[int, ...] = (6, 12, 36, 24)
    num_init_features: int = 96
    bn_size: int = 4                     # bottleneck width = bn_size * growth_rate
    compression: float = 0.5             # transition: channels -> floor(channels * compression)
    neck_dim: int = 128                  # the embedding
    num_classes: int = 0                 # perturbation classes; 0 = no classifier (embedding only)
    label_smoothing: float = 0.0
    adabn: bool = False                  # ghost batch norm using batch statistics at inference too
    virtual_batch_size: int = 128        # ghost batch size at training (Hoffer et al. 2017 use 128)
    bn_momentum: float = 0.1
    # optimiser defaults (the seed's tuned SGD values are unpublished: DenseNet's recipe, see the module doc)
    optimizer: str = "sgd"
    lr: float = 0.1                      # peak lr for a global batch of `lr_batch`, scaled linearly
    lr_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "one_cycle_cosine"

    family: ClassVar[str] = "wsl"

    def __post_init__(self):
        for key in ("img_size", "in_chans", "growth_rate", "num_init_features", "bn_size", "neck_dim",
                    "virtual_batch_size", "lr"):
            _positive(key, getattr(self, key))
        if not self.block_config or any(n < 1 for n in self.block_config):
            raise ValueError(f"block_config needs at least one block of >= 1 layers, got {self.block_config}")
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {self.num_classes}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    @property
    def embed_dim(self) -> int:
        return self.neck_dim

    def peak_lr(self, global_batch: int) -> float:
        """lr for `global_batch` crops per step: linear scaling from `lr_batch` (0: no scaling)."""
        return self.lr * global_batch / self.lr_batch if self.lr_batch else self.lr

    def to_dict(self) -> dict:
        return _to_dict(self)


@dataclass(frozen=True)
class MUNetConfig:
    name: str = "custom_munet"
    img_size: int = 256
    in_chans: int = 6
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    encoder_units: tuple[int, ...] = (2, 2, 2, 2, 2)   # residual units per encoder stage (one per width)
    decoder_units: tuple[int, ...] = (1, 1, 1, 1)      # per decoder stage, at widths[0..n-2]
    bottleneck_units: int = 1                          # decoder stage at the bottleneck resolution (0: none)
    kernel_size: int = 5
    style: bool = True                                 # cellpose's style vector in the decoder
    mask_ratio: float = 0.25
    mask_patch: int = 16
    # optimiser defaults (seed appendix A.1.2)
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_batch: int = 0                                  # 0: no scaling (the seed keeps 1e-3 at 4,096 and 16,384)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    schedule: str = "one_cycle_cosine"

    family: ClassVar[str] = "munet"

    def __post_init__(self):
        for key in ("img_size", "in_chans", "kernel_size", "mask_patch", "lr"):
            _positive(key, getattr(self, key))
        n = len(self.widths)
        if n < 2 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths needs at least two positive scales, got {self.widths}")
        if len(self.encoder_units) != n or any(u < 1 for u in self.encoder_units):
            raise ValueError(f"encoder_units needs one count >= 1 per width ({n}), got {self.encoder_units}")
        if len(self.decoder_units) != n - 1 or any(u < 1 for u in self.decoder_units):
            raise ValueError(f"decoder_units needs one count >= 1 per decoder stage ({n - 1}), got "
                             f"{self.decoder_units}")
        if self.bottleneck_units < 0:
            raise ValueError(f"bottleneck_units must be >= 0, got {self.bottleneck_units}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd ('same' padding), got {self.kernel_size}")
        if self.img_size % 2 ** (n - 1):
            raise ValueError(f"img_size {self.img_size} must be a multiple of 2^{n - 1} for {n} scales")
        if self.img_size % self.mask_patch:
            raise ValueError(f"img_size {self.img_size} must be a multiple of mask_patch {self.mask_patch}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    @property
    def embed_dim(self) -> int:
        return self.widths[-1]

    def peak_lr(self, global_batch: int) -> float:
        return self.lr * global_batch / self.lr_batch if self.lr_batch else self.lr

    def to_dict(self) -> dict:
        return _to_dict(self)


BaselineConfig = WSLConfig | MUNetConfig
CONFIG_CLASSES: dict[str, type] = {"wsl": WSLConfig, "munet": MUNetConfig}


def _to_dict(cfg) -> dict:
    d = {"family": cfg.family, **asdict(cfg)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


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


# ------------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------

def check_images(cfg: BaselineConfig, images: torch.Tensor) -> int:
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


# ------------------------------------------------------------------------------------------------------------
# Ghost batch norm (AdaBN)
# ------------------------------------------------------------------------------------------------------------

class GhostBatchNorm(nn.Module):
    """Batch norm over virtual batches (Hoffer et al. 2017) for (B, C) or (B, C, *spatial) inputs.

    Training: the batch is cut into ceil(B / virtual_batch_size) virtual batches of near-equal size, each
    normalised with its own mean and (biased) variance; the running statistics are updated once per virtual batch.
    Inference with `adaptive=True` (AdaBN, Li et al. 2016): normalised with the statistics of the whole current
    batch -- which must come from one plate -- and the running statistics are neither used nor changed.
    Inference with `adaptive=False`: the running statistics, as nn.BatchNorm.
    Parameter and buffer names are nn.BatchNorm's, so state dicts are interchangeable."""

    def __init__(self, num_features: int, virtual_batch_size: int | None = None, adaptive: bool = False,
                 eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if virtual_batch_size is not None and virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be positive, got {virtual_batch_size}")
        self.num_features, self.virtual_batch_size, self.adaptive = num_features, virtual_batch_size, adaptive
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, virtual_batch_size={self.virtual_batch_size}, adaptive={self.adaptive}, "
                f"eps={self.eps}, momentum={self.momentum}")

    def virtual_batches(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = 1 if self.virtual_batch_size is None else math.ceil(x.shape[0] / self.virtual_batch_size)
        return torch.tensor_split(x, n) if n > 1 else (x,)

    def _check(self, x: torch.Tensor, smallest: int) -> None:
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"GhostBatchNorm({self.num_features}) got input of shape {tuple(x.shape)}")
        per_channel = smallest * math.prod(x.shape[2:])
        if per_channel < 2:
            raise ValueError(
                f"batch statistics need more than one value per channel; got a (virtual) batch of {smallest} "
                f"sample(s) of shape {tuple(x.shape[1:])}: AdaBN models need batches of several crops of one plate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.adaptive):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if not self.training:  # AdaBN inference: this batch's statistics, running buffers untouched
            self._check(x, x.shape[0])
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        chunks = self.virtual_batches(x)
        self._check(x, min(c.shape[0] for c in chunks))
        self.num_batches_tracked.add_(1)
        outs = [F.batch_norm(c, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum,
                             self.eps) for c in chunks]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _norm_layer(cfg: WSLConfig, channels: int, spatial: bool) -> nn.Module:
    if cfg.adabn:
        return GhostBatchNorm(channels, cfg.virtual_batch_size, adaptive=True, momentum=cfg.bn_momentum)
    return (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(channels, momentum=cfg.bn_momentum)


# ------------------------------------------------------------------------------------------------------------
# WSL: DenseNet-161 + neck + classifier
# ------------------------------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (to bn_size * growth) then BN-ReLU-Conv3x3 (to growth) of the concatenated inputs."""

    def __init__(self, cfg: WSLConfig, in_channels: int):
        super().__init__()
        width = cfg.bn_size * cfg.growth_rate
        self.norm1 = _norm_layer(cfg, in_channels, True)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = _norm_layer(cfg, width, True)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, cfg.growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:  # [(B, c_i, h, w)] -> (B, growth, h, w)
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, cfg: WSLConfig, num_layers: int, in_channels: int):
        super().__init__({f"denselayer{i + 1}": DenseLayer(cfg, in_channels + i * cfg.growth_rate)
                          for i in range(num_layers)})
        self.out_channels = in_channels + num_layers * cfg.growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c, h, w) -> (B, c + n * growth, h, w)
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cfg: WSLConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = _norm_layer(cfg, in_channels, True)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNetFeatures(nn.Sequential):
    """torchvision's `densenet*().features` layout: conv0/norm0/relu0/pool0, denseblock1, transition1, ...,
    denseblockN, norm5. (B, C, H, W) -> (B, out_channels, H/32, W/32)."""

    def __init__(self, cfg: WSLConfig):
        super().__init__()
        c = cfg.num_init_features
        self.conv0 = nn.Conv2d(cfg.in_chans, c, 7, stride=2, padding=3, bias=False)
        self.norm0 = _norm_layer(cfg, c, True)
        self.relu0 = nn.ReLU(inplace=True)
        self.pool0 = nn.MaxPool2d(3, stride=2, padding=1)
        for i, n in enumerate(cfg.block_config):
            block = DenseBlock(cfg, n, c)
            self.add_module(f"denseblock{i + 1}", block)
            c = block.out_channels
            if i != len(cfg.block_config) - 1:
                out = int(c * cfg.compression)
                self.add_module(f"transition{i + 1}", Transition(cfg, c, out))
                c = out
        self.add_module(f"norm{len(cfg.block_config) + 1}", _norm_layer(cfg, c, True))
        self.out_channels = c


class EmbeddingNeck(nn.Sequential):
    """(B, F) pooled features -> (B, D) embedding: BN, Linear(F, D), ReLU, BN, Linear(D, D), BN (no linear bias:
    each Linear is followed by a BN)."""

    def __init__(self, cfg: WSLConfig, in_features: int):
        super().__init__(
            _norm_layer(cfg, in_features, False),
            nn.Linear(in_features, cfg.neck_dim, bias=False),
            nn.ReLU(inplace=True),
            _norm_layer(cfg, cfg.neck_dim, False),
            nn.Linear(cfg.neck_dim, cfg.neck_dim, bias=False),
            _norm_layer(cfg, cfg.neck_dim, False),
        )


@dataclass
class WSLOutput:
    loss: torch.Tensor           # cross-entropy (float32)
    logits: torch.Tensor         # (B, num_classes)
    embedding: torch.Tensor      # (B, neck_dim)
    extras: dict = field(default_factory=dict)  # "accuracy": top-1 accuracy of the batch (no grad)


class WSLClassifier(nn.Module):
    """Weakly supervised perturbation classifier: DenseNet features -> neck (the embedding) -> linear head."""

    def __init__(self, cfg: WSLConfig):
        super().__init__()
        self.cfg = cfg
        self.features = DenseNetFeatures(cfg)
        self.neck = EmbeddingNeck(cfg, self.features.out_channels)
        self.head = nn.Linear(cfg.neck_dim, cfg.num_classes) if cfg.num_classes > 0 else None
        self.reset_parameters()

    def reset_parameters(self):
        """torchvision's DenseNet init: Kaiming-normal convs, unit/zero norms, zero linear biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, GhostBatchNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def check_images(self, images: torch.Tensor) -> int:
        return check_images(self.cfg, images)

    def check_labels(self, labels, batch: int) -> torch.Tensor:
        if self.head is None:
            raise ValueError(f"{self.cfg.name} was built without a classifier (num_classes=0); create it with "
                             "num_classes=<number of perturbation classes> to train it")
        if labels is None:
            raise ValueError("the WSL classifier trains on perturbation labels: call model(images, labels) with "
                             "labels (B,) class ids (see PerturbationLabels)")
        if not isinstance(labels, torch.Tensor) or labels.shape != (batch,) or labels.is_floating_point():
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be an integer tensor of shape ({batch},), got {got}")
        if not torch.compiler.is_compiling():  # a host read; compiled graphs rely on cross_entropy's own check
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.cfg.num_classes:
                raise ValueError(f"labels must lie in [0, {self.cfg.num_classes}), got values in [{lo}, {hi}]")
        return labels.long()

    def _embedding(self, images: torch.Tensor) -> torch.Tensor:  # raw (B, C, H, W) -> (B, neck_dim)
        f = F.relu(self.features(standardized(images)))
        return self.neck(f.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> WSLOutput:
        self.check_images(images)
        labels = self.check_labels(labels, images.shape[0])
        z = self._embedding(images)
        logits = self.head(z)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return WSLOutput(loss, logits, z, {"accuracy": accuracy})

    @torch.no_grad()
    def embed(self, images: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
        """Raw crops -> (B, neck_dim) neck output. AdaBN models normalise with this batch's statistics: pass
        batches of several crops from one plate (`PlateBatchSampler`)."""
        if per_channel:
            raise ValueError("per-channel embeddings need a channel-agnostic (CA-MAE) model, not a WSL DenseNet")
        self.check_images(images)
        return self._embedding(images)


class PerturbationLabels:
    """Class ids of the sites of a SiteIndex: `classes` (sorted perturbation names, or given), `site_labels`
    (n_sites,) int64. `for_crops(info)` maps a loader's CropInfo (return_info=True) to (B,) labels."""

    def __init__(self, classes: Sequence[str], site_labels: np.ndarray):
        self.classes = tuple(classes)
        self.site_labels = np.asarray(site_labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.classes)

    @classmethod
    def from_index(cls, index, classes: Sequence[str] | None = None) -> "PerturbationLabels":
        """Every site must have a perturbation (gene/treatment/siRNA); select labelled sites first with
        `index.select(where=lambda s: s.perturbation is not None)`. `classes` fixes the class order (e.g. the one
        a checkpoint was trained with); a perturbation outside it is an error."""
        from mae_fast.data.index import natural_key

        missing = [s for s in index if s.perturbation is None]
        if missing:
            raise ValueError(f"{len(missing)} site(s) have no perturbation label (first: well {missing[0].well_id} "
                             f"site {missing[0].site}); select labelled sites before training a WSL model")
        names = [s.perturbation for s in index]
        if classes is None:
            classes = sorted(set(names), key=natural_key)
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted({n for n in names if n not in lookup})
        if unknown:
            raise ValueError(f"{len(unknown)} perturbation(s) are not among the {len(lookup)} classes "
                             f"(first: {unknown[0]!r})")
        return cls(classes, np.array([lookup[n] for n in names], dtype=np.int64))

    def for_crops(self, info, device=None) -> torch.Tensor:
        """(B,) int64 labels of a batch's crops from its CropInfo (or an array of index positions)."""
        positions = np.asarray(getattr(info, "site_index", info), dtype=np.int64)
        return torch.from_numpy(self.site_labels[positions]).to(device)


# ------------------------------------------------------------------------------------------------------------
# MU-Net: masked residual U-Net (cellpose / Microsnoop blocks)
# ------------------------------------------------------------------------------------------------------------

class PreActConv(nn.Module):
    """BN -> ReLU -> Conv k x k ('same'); with `style_dim`, Linear(style) is first added to the input per channel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int = 0):
        super().__init__()
        self.style = nn.Linear(style_dim, in_channels) if style_dim else None
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        if self.style is not None:
            x = x + self.style(style)[:, :, None, None]
        return self.conv(F.relu(self.norm(x)))


class Projection(nn.Sequential):
    """BN -> 1x1 conv: the shortcut of a stage's first unit (channel change)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 1))


class EncoderStage(nn.Module):
    """x -> proj(x) + conv(conv(x)); then `units - 1` times x -> x + conv(conv(x)).
    (B, cin, h, w) -> (B, cout, h, w)."""

    def __init__(self, cin: int, cout: int, units: int, k: int):
        super().__init__()
        self.proj = Projection(cin, cout)
        self.units = nn.ModuleList(
            nn.ModuleList([PreActConv(cin if u == 0 else cout, cout, k), PreActConv(cout, cout, k)])
            for u in range(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = self.units
        x = self.proj(x) + first[1](first[0](x))
        for conv_a, conv_b in rest:
            x = x + conv_b(conv_a(x))
        return x


class DecoderStage(nn.Module):
    """x, skip -> proj(x) + conv_s(conv(x) + skip); then `units - 1` times out -> out + conv_s(conv_s(out)), where
    conv_s adds the style vector to its input. (B, cin, h, w), (B, cout, h, w) -> (B, cout, h, w)."""

    def __init__(self, cin: int, cout: int, units: int, k: int, style_dim: int):
        super().__init__()
        self.proj = Projection(cin, cout)
        self.units = nn.ModuleList(
            nn.ModuleList([PreActConv(cin, cout, k) if u == 0 else PreActConv(cout, cout, k, style_dim),
                           PreActConv(cout, cout, k, style_dim)])
            for u in range(units))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor | None) -> torch.Tensor:
        first, *rest = self.units
        out = self.proj(x) + first[1](first[0](x) + skip, style)
        for conv_a, conv_b in rest:
            out = out + conv_b(conv_a(out, style), style)
        return out


@dataclass
class MUNetOutput:
    loss: torch.Tensor            # MSE over the masked pixels (float32)
    pred: torch.Tensor            # (B, C, H, W) reconstruction of the standardised image
    masking: ops.Masking          # over the (H/p)^2 mask patches, row-major; mask = 1 where hidden
    pixel_mask: torch.Tensor      # (B, 1, H, W) 1.0 on hidden pixels
    extras: dict = field(default_factory=dict)


class MaskedUNet(nn.Module):
    """MU-Net (see the module doc): residual U-Net reconstructing zeroed square patches of the standardised input."""

    def __init__(self, cfg: MUNetConfig):
        super().__init__()
        self.cfg = cfg
        w, k = cfg.widths, cfg.kernel_size
        style_dim = w[-1] if cfg.style else 0
        chans = (cfg.in_chans,) + tuple(w)
        self.encoder = nn.ModuleList(EncoderStage(chans[i], chans[i + 1], cfg.encoder_units[i], k)
                                     for i in range(len(w)))
        self.bottleneck = (DecoderStage(w[-1], w[-1], cfg.bottleneck_units, k, style_dim)
                           if cfg.bottleneck_units else None)
        self.decoder = nn.ModuleList(DecoderStage(w[i + 1], w[i], cfg.decoder_units[i], k, style_dim)
                                     for i in range(len(w) - 1))
        self.head = nn.Sequential(nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True), nn.Conv2d(w[0], cfg.in_chans, 1))

    def check_images(self, images: torch.Tensor) -> int:
        return check_images(self.cfg, images)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Standardised (B, C, H, W) -> the output of every encoder stage, (B, w_i, H/2^i, W/2^i)."""
        feats = []
        for i, stage in enumerate(self.encoder):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Encoder features -> (B, C, H, W) prediction."""
        x = feats[-1]
        style = F.normalize(x.mean(dim=(2, 3)), dim=1) if self.cfg.style else None  # (B, w_last)
        if self.bottleneck is not None:
            x = self.bottleneck(x, x, style)
        for i in range(len(self.decoder) - 1, -1, -1):
            x = self.decoder[i](F.interpolate(x, scale_factor=2, mode="nearest"), feats[i], style)
        return self.head(x)

    def pixel_mask(self, masking: ops.Masking, size: int) -> torch.Tensor:
        """(B, L) patch mask -> (B, 1, H, W) pixel mask."""
        p, g = self.cfg.mask_patch, size // self.cfg.mask_patch
        B = masking.mask.shape[0]
        return masking.mask.view(B, 1, g, 1, g, 1).expand(B, 1, g, p, g, p).reshape(B, 1, size, size)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> MUNetOutput:
        """Raw crops -> MSE on the hidden pixels. `labels` is accepted and ignored (self-supervised)."""
        cfg = self.cfg
        C = self.check_images(images)
        ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
        B, H = images.shape[0], images.shape[2]
        L = (H // cfg.mask_patch) ** 2
        if not 0.0 < ratio < 1.0 or ops.num_visible(L, ratio) == L:
            raise ValueError(f"mask_ratio {ratio} hides no patch of {L}; the MU-Net loss needs hidden pixels")
        x = standardized(images)
        masking = ops.random_masking(B, L, ratio, device=images.device, generator=generator)
        m = self.pixel_mask(masking, H)
        pred = self.decode(self.encode(x * (1.0 - m)))
        err = (pred.float() - x).square() * m
        loss = err.sum() / (m.sum() * C)
        return MUNetOutput(loss, pred, masking, m)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
        """Raw crops -> (B, widths[-1]): global average of the bottleneck, no masking."""
        if per_channel:
            raise ValueError("per-channel embeddings need a channel-agnostic (CA-MAE) model, not a MU-Net")
        self.check_images(images)
        return self.encode(standardized(images))[-1].mean(dim=(2, 3))

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """For figures: (standardised input, masked input, reconstruction with the visible pixels pasted), each
        (B, C, H, W)."""
        with torch.no_grad():
            out = self.forward(images, generator=generator)
            x = standardized(images)
            keep = 1.0 - out.pixel_mask
            return x, x * keep, x * keep + out.pred.float() * out.pixel_mask


# ------------------------------------------------------------------------------------------------------------
# Optimiser
# ------------------------------------------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only (not on norms and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: BaselineConfig | None = None, *, lr: float | None = None,
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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "WSLConfig", "MUNetConfig", "BASELINE_PRESETS", "config_from_dict", "list_baselines", "is_baseline",
    "get_baseline_config", "create_baseline", "check_images", "standardized", "GhostBatchNorm", "WSLClassifier",
    "WSLOutput", "PerturbationLabels", "MaskedUNet", "MUNetOutput", "param_groups", "build_optimizer",
    "count_parameters",
]
