"""MU-Net (the seed follows Xun et al. 2023, Microsnoop, whose CNN is cellpose's residual U-Net): per scale a stage
of residual units (unit = two pre-activation BN-ReLU-Conv k x k; the first unit of a stage has a BN + 1x1
projection shortcut; 2x2 max-pool between stages); a decoder that mirrors the scales with nearest-neighbour
upsampling, the skip *added* after the stage's first conv, and a "style" vector (the L2-normalised global average of
the bottleneck) added through a Linear to the input of every later decoder conv; cellpose's extra decoder stage at
the bottleneck resolution (its skip is the bottleneck itself); a BN-ReLU-1x1 conv head back to C channels.
Trained as a masked autoencoder: 16 x 16 patches (25%) are zeroed in the standardised input (0 = the image's
channel mean), the loss is the MSE on the masked pixels. Kernel 5. Trained with AdamW (0.9, 0.95), wd 0.05,
lr 1e-3, one-cycle cosine (the seed's "cyclic cosine"; the recipe is the training side's,
`mae_fast.training.recipes`).
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

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_fast import ops
from mae_fast.models.baseline_common import check_images, config_to_dict, positive, standardized


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
    # the optimiser is no part of the model: its recipe (AdamW, seed appendix A.1.2) is mae_fast.training.recipes'

    family: ClassVar[str] = "munet"

    def __post_init__(self):
        for key in ("img_size", "in_chans", "kernel_size", "mask_patch"):
            positive(key, getattr(self, key))
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

    @property
    def embed_dim(self) -> int:
        return self.widths[-1]

    def to_dict(self) -> dict:
        return config_to_dict(self)


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
