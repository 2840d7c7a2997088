"""The peer: the MAE a user would write from public code instead of using mae_fast, benchmarked beside it.

Encoder: timm's `VisionTransformer` with `ParallelScalingBlock`, QK-norm, no qkv bias, LayerScale (the arguments of
`mae_fast.checkpoint.timm_vit_kwargs`, as Recursion's released ViT builds it), fixed 2-D sin-cos positions.
Masking as in FAIR's MAE: every token is patch-embedded (timm's strided convolution), then 75% are dropped
(noise -> argsort -> gather). Decoder: a Linear to 512-d, mask tokens appended and unshuffled by gather, sin-cos
positions, 8 timm `Block`s of 16 heads, LayerNorm, a Linear to pixels. Loss on the masked tokens: (1 - alpha) MSE +
alpha mean | |FFT2(pred)| - |FFT2(target)| | per p x p plane through `torch.fft` (the loss mae_fast trains with).
Input: uint8/uint16 crops scaled to [0, 1] and standardised per image and channel by `F.instance_norm`.
Optimiser: timm's `Lion`. Standard (not channel-agnostic) layout only; timm is an optional dependency.

`PeerMAE.load_from(model)` copies a `MaskedAutoencoder`'s weights (the parameter names map one to one), so tests can
check that the peer computes the same function and benchmarks can start both from identical weights.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_fast import ops
from mae_fast.interop import timm_vit_kwargs
from mae_fast.models import LN_EPS, MAEConfig, MaskedAutoencoder, sincos_pos_embed
from mae_fast.optim import lion_param_groups
from mae_fast.training.recipes import optimizer_recipe

try:  # optional: the peer needs timm
    import timm.optim as timm_optim
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # pragma: no cover - exercised only without timm
    VisionTransformer = None


def timm_available() -> bool:
    return VisionTransformer is not None


def _require_timm() -> None:
    if VisionTransformer is None:
        raise ImportError("the peer stack needs timm (pip install timm)")


class PeerMAE(nn.Module):
    """FAIR-style MAE on timm building blocks (see the module docstring)."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        _require_timm()
        if cfg.channel_agnostic:
            raise ValueError("the peer stack is the standard MAE; CA-MAE has no public timm equivalent")
        self.cfg = cfg
        self.encoder = VisionTransformer(**timm_vit_kwargs(cfg))
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos, as FAIR's MAE
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_pos_embed(cfg.embed_dim, cfg.grid_size))
        Dd = cfg.decoder_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(Dd, cfg.grid_size), persistent=False)
        norm = partial(nn.LayerNorm, eps=LN_EPS)
        self.decoder_blocks = nn.ModuleList(
            TimmBlock(Dd, cfg.decoder_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(cfg.decoder_depth))
        self.decoder_norm = norm(Dd)
        self.decoder_pred = nn.Linear(Dd, cfg.token_dim)

    @torch.no_grad()
    def load_from(self, model: MaskedAutoencoder) -> "PeerMAE":
        """Copy the weights of a standard MaskedAutoencoder of the same config."""
        enc = {k: v for k, v in model.encoder.state_dict().items()}
        missing, unexpected = self.encoder.load_state_dict(enc, strict=False)
        if unexpected or set(missing) - {"pos_embed"}:
            raise ValueError(f"encoder weights do not map: missing {missing}, unexpected {unexpected}")
        self.decoder_embed.load_state_dict(model.encoder_decoder_proj.state_dict())
        self.mask_token.copy_(model.decoder.mask_token.view(1, 1, -1))
        for mine, theirs in zip(self.decoder_blocks, model.decoder.blocks):
            mine.load_state_dict(theirs.state_dict())
        self.decoder_norm.load_state_dict(model.decoder.norm.state_dict())
        self.decoder_pred.load_state_dict(model.decoder_pred.state_dict())
        return self

    def standardized(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / ops.pixel_scale(images.dtype) if not images.is_floating_point() else images.float()
        # instance norm with the same bit-depth-aware eps as mae_fast, so both stacks compute one function
        return F.instance_norm(x, eps=ops.standardize_eps(images.dtype))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, L, p*p*C), FAIR's (p, q, c) order
        B, C, H, W = x.shape
        p, h = self.cfg.patch_size, H // self.cfg.patch_size
        return torch.einsum("nchpwq->nhwpqc", x.reshape(B, C, h, p, h, p)).reshape(B, h * h, p * p * C)

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        enc = self.encoder
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]  # every token projected, then masked
        B, L, D = tokens.shape
        len_keep = int(L * (1 - mask_ratio))
        noise = torch.rand(B, L, device=x.device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(B, -1, -1)
        h = torch.cat([cls, tokens], dim=1)
        for blk in enc.blocks:
            h = blk(h)
        return enc.norm(h), mask, ids_restore

    def forward_decoder(self, h: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        h = self.decoder_embed(h)
        B, L, Dd = h.shape[0], ids_restore.shape[1], h.shape[-1]
        masked = self.mask_token.to(h.dtype).expand(B, L + 1 - h.shape[1], Dd)
        full = torch.cat([h[:, 1:], masked], dim=1)
        full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))
        h = torch.cat([h[:, :1], full], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            h = blk(h)
        return self.decoder_pred(self.decoder_norm(h))[:, 1:]

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p, alpha = self.cfg.patch_size, self.cfg.fourier_alpha
        pred = pred.float()
        B, L, P = pred.shape
        mse = (pred - target).pow(2).mean(dim=-1)

        def planes(t):
            return t.reshape(B, L, p, p, P // (p * p)).permute(0, 1, 4, 2, 3)

        fourier = (torch.fft.fft2(planes(pred)).abs() - torch.fft.fft2(planes(target)).abs()).abs()
        per_token = (1 - alpha) * mse + alpha * fourier.flatten(2).mean(dim=-1)
        return (per_token * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw crops -> the masked reconstruction loss (a scalar)."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        x = self.standardized(images)
        latent, mask, ids_restore = self.forward_encoder(x, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(pred, self.patchify(x), mask)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Raw crops -> mean of the patch tokens (timm's forward_features + global_pool='avg')."""
        return self.encoder.forward_head(self.encoder.forward_features(self.standardized(images)),
                                         pre_logits=True)


def peer_optimizer(model: PeerMAE) -> torch.optim.Optimizer:
    """timm's Lion with the paper's settings and no decay on 1-D parameters and tokens."""
    _require_timm()
    recipe = optimizer_recipe(model.cfg)
    return timm_optim.Lion(lion_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=recipe.betas)
