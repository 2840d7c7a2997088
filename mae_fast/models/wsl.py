"""WSL (Sypetkowski et al. 2023, the RxRx1 baseline the seed re-implements): DenseNet-161 (growth 48, blocks
(6, 12, 36, 24), 96 initial features, bottleneck width 4 x growth, compression 0.5) with a 6-channel stem; parameter
names follow torchvision's `densenet161().features`, so its weights load by name (all but `conv0`, whose input
channels differ). The neck (the RxRx1 authors' design): ReLU + global average pool of the 2208 feature maps ->
BN -> Linear(2208, 128, no bias) -> ReLU -> BN -> Linear(128, 128, no bias) -> BN; its output is the embedding.
A linear classifier over the perturbation classes on top is trained with cross-entropy. The seed's "28M
parameters" is DenseNet-161's usual count; backbone + neck here are 26.79M (6-channel stem), 4.3% below it.
AdaBN variant: every BatchNorm is a `GhostBatchNorm` that normalises with the statistics of the current batch at
training time (per virtual batch) *and* at inference (the whole batch), so batches must come from one plate
(`mae_fast.data.samplers.PlateBatchSampler`); the embedding of a crop then depends on its batch companions.
Optimiser (its recipe is the training side's, `mae_fast.training.recipes`): the seed says "a specially tuned SGD"
without values; the recipe is DenseNet's SGD (Huang et al. 2017: lr 0.1 per 256 crops, Nesterov momentum 0.9,
weight decay 1e-4), the lr scaled linearly with the global batch (Goyal et al. 2017; 1.6 at the paper's 4,096) and
the trainer's one-cycle cosine schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_fast.models.baseline_common import check_images, config_to_dict, positive, standardized


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
    # the optimiser is no part of the model: its recipe (SGD, see the module doc) is mae_fast.training.recipes'

    family: ClassVar[str] = "wsl"

    def __post_init__(self):
        for key in ("img_size", "in_chans", "growth_rate", "num_init_features", "bn_size", "neck_dim",
                    "virtual_batch_size"):
            positive(key, getattr(self, key))
        if not self.block_config or any(n < 1 for n in self.block_config):
            raise ValueError(f"block_config needs at least one block of >= 1 layers, got {self.block_config}")
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {self.num_classes}")

    @property
    def embed_dim(self) -> int:
        return self.neck_dim

    def to_dict(self) -> dict:
        return config_to_dict(self)


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
