"""MAE and channel-agnostic MAE (CA-MAE) ViTs for microscopy, in plain PyTorch, top to bottom.

Encoder (Kraus et al. 2023/2024): ViT with parallel scaling blocks (ViT-22B), QK-norm, no qkv bias, LayerScale,
stochastic depth, fixed 2-D sin-cos positions and a class token. Parameter names follow timm's VisionTransformer
/ ParallelScalingBlock so that checkpoints convert by renaming only (see mae_fast.interop).

Masking happens on pixel tokens *before* the patch projection (a linear map of the (p, q, c)-ordered patch,
identical to timm's strided Conv2d), so the encoder never projects the 75% of tokens it then drops, and the fused
masked-patchify op can write visible tokens straight from the raw image.

The presets live in registry.py (`create_model`, `model_config`, `list_models`).

One file on purpose: the whole model reads top to bottom (config, blocks, encoder, decoders, masking,
loss), as a newcomer reads it; its parts are small and only used here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from mae_fast import ops
from mae_fast.attention import attention

LN_EPS = 1e-6
POOLINGS = ("timm_avg", "openphenom")
# the optimiser settings MAEConfig held before they moved to the training side (mae_fast.training.recipes): configs
# written then still load, without them (a resumed run maps them onto its training keys: mae_fast.training.config)
RETIRED_KEYS = ("lr", "weight_decay", "betas")


# ------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MAEConfig:
    family: ClassVar[str] = "mae"

    name: str = "custom"
    img_size: int = 256
    patch_size: int = 16
    in_chans: int = 6
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    init_values: float = 1e-4          # LayerScale
    channel_agnostic: bool = False
    max_in_chans: int = 11             # CA-MAE: positions built for this many channels
    fc_norm: bool = False              # True: the final LayerNorm is `fc_norm` (timm global_pool='avg'), not on tokens
    # How `embed` pools the encoder's non-class tokens (the per-channel embedding follows the same rule):
    #   "timm_avg": their mean, then `fc_norm` (timm's forward_head with global_pool='avg'; no-op when fc_norm=False);
    #   "openphenom": their mean only (OpenPhenom's predict(): forward_features has no final norm when fc_norm=True,
    #   and the head's fc_norm is never applied).
    pooling: str = "timm_avg"
    # timm 0.9.7's ParallelScalingBlock adds cat(zeros(3D), mlp_bias) to its [mlp_hidden | q | k | v] projection:
    # hidden[:3D] get no bias, hidden[3D:4D] get mlp_bias[:D], q, k, v get mlp_bias[D:2D], [2D:3D], [3D:4D] (before
    # QK-norm). Weights trained that way (OpenPhenom) need it; later timm adds mlp_bias to the hidden units only.
    legacy_parallel_bias: bool = False
    decoder_dim: int = 512
    decoder_depth: int = 8             # CA-MAE: depth of each per-channel block stack
    decoder_heads: int = 16
    decoder_cross_heads: int = 8       # CA-MAE: heads of the shared cross-attention (OpenPhenom's CrossAttention: 8)
    decoder_norm_eps: float = 1e-6     # every decoder LayerNorm (OpenPhenom's released configs: 1e-6)
    mask_ratio: float = 0.75
    fourier_alpha: float = 0.01
    norm_pix_loss: bool = False
    grad_checkpointing: bool = False
    # the optimiser is no part of the model: its recipe (Lion, lr, wd, betas) is mae_fast.training.recipes'

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @property
    def layout(self) -> str:
        return "channel" if self.channel_agnostic else "standard"

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:  # spatial patches per channel
        return self.grid_size**2

    def tokens(self, in_chans: int | None = None) -> int:
        """Encoder sequence length without the class token (C*L for CA-MAE)."""
        return self.num_patches * ((in_chans or self.in_chans) if self.channel_agnostic else 1)

    @property
    def token_dim(self) -> int:  # pixels per token
        return self.patch_size**2 * (1 if self.channel_agnostic else self.in_chans)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MAEConfig":
        """Inverse of `to_dict`; also reads configs of earlier versions (their optimiser keys are dropped)."""
        d = {k: v for k, v in d.items() if k not in RETIRED_KEYS}
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MAEConfig keys {unknown}; valid keys: {sorted(known)}")
        if "decoder_cross_heads" not in d and d.get("channel_agnostic"):
            # configs written before the field existed: the cross-attention then used decoder_heads
            d["decoder_cross_heads"] = d.get("decoder_heads", cls.decoder_heads)
        return cls(**d)


# ------------------------------------------------------------------------------------------------------------
# Positions
# ------------------------------------------------------------------------------------------------------------

def sincos_pos_embed(dim: int, grid: int, channels: int = 1, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (1 [+1], channels*grid*grid, dim): [sin(h w_k), cos(h w_k), sin(x w_k), cos(x w_k)]
    with w_k = 10000^(-k/(dim/4)); repeated per channel (CA-MAE) and a zero vector at the class-token slot."""
    if dim % 4:
        raise ValueError(f"embed dim {dim} must be a multiple of 4 for 2-D sin-cos positions")
    pos = torch.arange(grid, dtype=torch.float32)
    hh, ww = torch.meshgrid(pos, pos, indexing="ij")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    h, w = torch.outer(hh.flatten(), omega), torch.outer(ww.flatten(), omega)
    emb = torch.cat([h.sin(), h.cos(), w.sin(), w.cos()], dim=1).repeat(channels, 1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb])
    return emb.unsqueeze(0)


# ------------------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------------------

class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training.

    The keep probability is a (non-persistent) buffer, not a Python float: Dynamo specialises a graph on Python
    numbers it reads, so blocks whose rates differ would each compile their own graph; as a tensor the rate is a
    graph input and every block of one type shares one compiled graph (mae_fast.compiling)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p  # for display only: forward reads the buffer
        self.register_buffer("keep_prob", torch.tensor(1.0 - p, dtype=torch.float32), persistent=False)

    def forward(self, x):
        if not self.training:
            return x
        keep = self.keep_prob
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep  # per sample
        return x * mask.to(x.dtype) / keep

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class ParallelScalingBlock(nn.Module):
    """x + drop_path(ls(attn_out(Attn(qknorm(q), qknorm(k), v)) + mlp_out(gelu(h)))), with [h|q|k|v] from one
    input projection of LayerNorm(x) (no qkv bias; one bias vector `mlp_bias`, length hidden).

    The projection is one matmul with a full-length bias built from `mlp_bias`: [mlp_bias | 0 (3D)] puts it on the
    hidden units (current timm); with `legacy_bias`, [0 (3D) | mlp_bias] reproduces timm 0.9.7 exactly (see
    MAEConfig.legacy_parallel_bias)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 1e-4,
                 drop_path: float = 0.0, legacy_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.legacy_bias = legacy_bias
        hidden = int(dim * mlp_ratio)
        self.in_split = [hidden, dim, dim, dim]
        self.in_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.in_proj = nn.Linear(dim, hidden + 3 * dim, bias=False)
        self.mlp_bias = nn.Parameter(torch.zeros(hidden))
        self.q_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS)
        self.attn_out_proj = nn.Linear(dim, dim)
        self.mlp_act = nn.GELU()
        self.mlp_out_proj = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, init_values)
        self.drop_path = DropPath(drop_path)

    def in_proj_bias(self) -> torch.Tensor:
        """The bias added to the whole [h | q | k | v] projection (length hidden + 3D)."""
        qkv = 3 * self.in_split[1]
        return F.pad(self.mlp_bias, (qkv, 0) if self.legacy_bias else (0, qkv))

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        # one addmm with the whole [h | q | k | v] bias (see in_proj_bias), no separate pass over h
        y = F.linear(self.in_norm(x), self.in_proj.weight, self.in_proj_bias())
        h, q, k, v = torch.split(y, self.in_split, dim=-1)
        q = self.q_norm(q.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, N, d)
        k = self.k_norm(k.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        a = attention(q, k, v).transpose(1, 2).reshape(B * N, D)
        g = self.mlp_act(h).reshape(B * N, -1)
        # both output projections and their biases in two accumulating GEMMs: attn @ Wa^T + b_a + b_m, then
        # += mlp @ Wm^T in place of a third pass that adds two (B, N, D) results
        y = torch.addmm(self.attn_out_proj.bias + self.mlp_out_proj.bias, a, self.attn_out_proj.weight.t())
        y = torch.addmm(y, g, self.mlp_out_proj.weight.t()).view(B, N, D)
        return x + self.drop_path(self.ls(y))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Queries from x (B, N, D), keys/values from context (B, M, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention dim {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, D = x.shape
        M, H = context.shape[1], self.num_heads
        q = self.q(x).view(B, N, H, D // H).transpose(1, 2)
        k, v = self.kv(context).view(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Standard pre-norm transformer block (decoder): x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = LN_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


# ------------------------------------------------------------------------------------------------------------
# Channel-stacked blocks: C independent `Block`s run as one (the CA-MAE decoder's per-channel stacks)
# ------------------------------------------------------------------------------------------------------------

class StackedBlockWeights(NamedTuple):
    """The weights of C `Block`s of the same shape, stacked on a leading channel axis (vectors (C, n), matrices
    (C, out, in))."""
    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor


def stack_block_weights(blocks: list[Block]) -> StackedBlockWeights:
    """One channel-stacked copy of the blocks' weights. Stacking is one copy of the weights per forward (and one in
    backward), a few per cent of one block's matmul work on the tokens, and it keeps the blocks, their parameter
    names and so every checkpoint's keys as they are."""
    def stacked(get):
        return torch.stack([get(b) for b in blocks])

    return StackedBlockWeights(
        stacked(lambda b: b.norm1.weight), stacked(lambda b: b.norm1.bias),
        stacked(lambda b: b.attn.qkv.weight), stacked(lambda b: b.attn.qkv.bias),
        stacked(lambda b: b.attn.proj.weight), stacked(lambda b: b.attn.proj.bias),
        stacked(lambda b: b.norm2.weight), stacked(lambda b: b.norm2.bias),
        stacked(lambda b: b.mlp.fc1.weight), stacked(lambda b: b.mlp.fc1.bias),
        stacked(lambda b: b.mlp.fc2.weight), stacked(lambda b: b.mlp.fc2.bias),
    )


def _stacked_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of x (C, M, D) with channel c's affine (weight[c], bias[c]) on x[c]."""
    return torch.addcmul(bias.unsqueeze(1), F.layer_norm(x, x.shape[-1:], eps=eps), weight.unsqueeze(1))


def stacked_block_forward(x: torch.Tensor, num_heads: int, eps: float, *weights: torch.Tensor) -> torch.Tensor:
    """C `Block`s at once: x (C, B, N, D), channel c through the block whose weights are `weights[...][c]`
    (a StackedBlockWeights spread as positional tensors). Every projection is one batched matmul over the channels;
    attention is one call over C*B sequences."""
    w = StackedBlockWeights(*weights)
    C, B, N, D = x.shape
    H = num_heads
    x = x.reshape(C, B * N, D)
    qkv = torch.baddbmm(w.qkv_bias.unsqueeze(1), _stacked_layer_norm(x, w.norm1_weight, w.norm1_bias, eps),
                        w.qkv_weight.transpose(1, 2))
    q, k, v = qkv.view(C * B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    a = attention(q, k, v).transpose(1, 2).reshape(C, B * N, D)
    # residual and output bias in one pass, the projection accumulated onto them by the batched GEMM
    x = torch.baddbmm(x + w.proj_bias.unsqueeze(1), a, w.proj_weight.transpose(1, 2))
    h = F.gelu(torch.baddbmm(w.fc1_bias.unsqueeze(1), _stacked_layer_norm(x, w.norm2_weight, w.norm2_bias, eps),
                             w.fc1_weight.transpose(1, 2)))
    x = torch.baddbmm(x + w.fc2_bias.unsqueeze(1), h, w.fc2_weight.transpose(1, 2))
    return x.view(C, B, N, D)


class ChannelStackedBlocks(nn.Module):
    """C `Block`s of one shape run as one (`stacked_block_forward` on their stacked weights): x (C, B, N, D), channel
    c through block c. It owns no parameters -- it refers to the blocks without registering them, so they keep the
    one name a checkpoint gives them -- and it is the module that runs, so regional compilation, activation
    checkpointing and FSDP wrap it (`mae_fast.compiling.repeated_blocks` finds it in a ModuleList)."""

    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.__dict__["blocks"] = tuple(blocks)  # not submodules: see above
        self.num_heads = blocks[0].attn.num_heads
        self.eps = blocks[0].norm1.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stacked_block_forward(x, self.num_heads, self.eps, *stack_block_weights(self.blocks))


# ------------------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """timm-compatible patch projection: `proj.weight` (D, C, p, p), applied as a linear map of pixel tokens."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, tokens):  # (B, N, p*p*C) in (p, q, c) order -> (B, N, D)
        w = self.proj.weight  # (D, C, p, q)
        return F.linear(tokens, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.proj.bias)


class ViTEncoder(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, 1 if cfg.channel_agnostic else cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        pos_channels = cfg.max_in_chans if cfg.channel_agnostic else 1
        self.register_buffer("pos_embed", sincos_pos_embed(D, cfg.grid_size, pos_channels), persistent=False)
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # linear in depth
        self.blocks = nn.ModuleList(
            ParallelScalingBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.init_values, r, cfg.legacy_parallel_bias)
            for r in rates
        )
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(D, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(D, eps=LN_EPS) if cfg.fc_norm else nn.Identity()
        self.num_features = D  # timm's name: the width a fine-tuning head takes

    def check_images(self, images: torch.Tensor) -> int:
        """Validate a raw image batch; returns its channel count."""
        cfg = self.cfg
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        B, C, H, W = images.shape
        if H != W:
            raise ValueError(f"images must be square {cfg.img_size}x{cfg.img_size} crops, got {H}x{W}")
        if H != cfg.img_size:
            raise ValueError(
                f"images must be {cfg.img_size}x{cfg.img_size} crops (tile larger images with "
                f"mae_fast.data), got {H}x{W}"
            )
        if cfg.channel_agnostic:
            if not 1 <= C <= cfg.max_in_chans:
                raise ValueError(f"CA-MAE takes 1..{cfg.max_in_chans} channels, got {C}")
        elif C != cfg.in_chans:
            raise ValueError(f"model {cfg.name} expects {cfg.in_chans} channels, got {C}")
        if images.is_floating_point():
            ops.to_unit_float(images, check_range=True)
        return C

    # -- timm's feature API: differentiable, for fine-tuning (MaskedAutoencoder.embed is the no-grad shortcut) --
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images (B, C, H, W) -> every token encoded, no masking: (B, 1 + N, D), class token first (N = C*L
        for CA-MAE). Gradients flow to the weights; the input standardisation is a constant of the data."""
        self.check_images(images)
        tokens = ops.standardized_tokens(images, self.cfg.patch_size, self.cfg.layout)  # fused: one pass
        return self.forward_tokens(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, per_channel: bool = False) -> torch.Tensor:
        """Encoded tokens (B, 1 + N, D) -> pooled features (B, D), or (B, C*D) per channel (CA-MAE), as `pool`.
        There is no classifier (timm's num_classes=0), so `pre_logits` (accepted for timm's callers) changes
        nothing; a fine-tuning head goes on top (`nn.Linear(encoder.num_features, classes)`)."""
        in_chans = (x.shape[1] - 1) // self.cfg.num_patches if self.cfg.channel_agnostic else self.cfg.in_chans
        return self.pool(x, in_chans, per_channel).flatten(1)

    def forward(self, images: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
        """forward_head(forward_features(images)): raw images -> pooled features, with gradients."""
        return self.forward_head(self.forward_features(images), per_channel=per_channel)

    def forward_tokens(self, pixel_tokens: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pixel tokens (B, K, P) (standardised) at sequence positions `ids` (B, K) (all, in order, if None)
        -> encoded sequence (B, 1 + K, D), class token first."""
        x = _run_blocks(self.blocks, self._input_sequence(pixel_tokens, ids), self.cfg.grad_checkpointing)
        return self.norm(x)

    def forward_blocks(self, pixel_tokens: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """All pixel tokens (B, L, P) -> the sequence after each of `blocks` (1-based, ascending), each through the
        final norm as the last block's is: [(B, 1 + L, D)]. Blocks after the last asked for are not run."""
        x = self._input_sequence(pixel_tokens, None)
        outputs = []
        for number, blk in enumerate(self.blocks[:blocks[-1]], start=1):
            x = blk(x)
            if number in blocks:
                outputs.append(self.norm(x))
        return outputs

    def _input_sequence(self, pixel_tokens: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Projected tokens plus positions, class token first: the first block's input (B, 1 + K, D)."""
        B, K, _ = pixel_tokens.shape
        x = self.patch_embed(pixel_tokens)
        pos = self.pos_embed[:, 1:]
        if ids is None:
            x = x + pos[:, :K]
        else:
            x = x + pos[0][ids]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        return torch.cat([cls, x], dim=1)

    def pool(self, x: torch.Tensor, in_chans: int, per_channel: bool = False) -> torch.Tensor:
        """Mean of the non-class tokens: (B, D), or (B, C, D) per channel for CA-MAE; then `fc_norm` unless
        cfg.pooling is "openphenom"."""
        tokens = x[:, 1:]
        if per_channel:
            if not self.cfg.channel_agnostic:
                raise ValueError("per-channel embeddings need a channel-agnostic (CA-MAE) model")
            pooled = tokens.reshape(x.shape[0], in_chans, -1, x.shape[-1]).mean(dim=2)
        else:
            pooled = tokens.mean(dim=1)
        return pooled if self.cfg.pooling == "openphenom" else self.fc_norm(pooled)


# ------------------------------------------------------------------------------------------------------------
# Decoders
# ------------------------------------------------------------------------------------------------------------

class MAEDecoder(nn.Module):
    """Mask tokens back in original order + sin-cos positions, then standard blocks and a final norm."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        Dd = cfg.decoder_dim
        self.mask_token = nn.Parameter(torch.zeros(Dd))
        self.register_buffer("pos_embed", sincos_pos_embed(Dd, cfg.grid_size), persistent=False)
        self.blocks = nn.ModuleList(Block(Dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.decoder_norm_eps)
                                    for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(Dd, eps=cfg.decoder_norm_eps)
        self.checkpointing = cfg.grad_checkpointing

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor, in_chans: int) -> torch.Tensor:
        """x: (B, 1 + K, Dd) class + visible tokens -> (B, L, Dd) decoded patch tokens (class token dropped).
        The class token keeps its place inside the unshuffle (no torch.cat); the sequence comes out in the promoted
        dtype (float32 from bf16 tokens under autocast: float32 mask token and positions), as a cat would give."""
        x = ops.unshuffle(x, self.mask_token, ids_restore, self.pos_embed[0], prefix=1)
        x = _run_blocks(self.blocks, x, self.checkpointing)
        return self.norm(x)[:, 1:]


class CAMAEDecoder(nn.Module):
    """OpenPhenom-style channel-agnostic decoder: per-channel learned tokens; for each channel a shared
    cross-attention (queries: that channel's tokens, context: all tokens) and shared MLP, then that channel's own
    stack of blocks.

    Computed channel-batched: the shared part is one call over all C*L query tokens (each query attends to the whole
    context independently, so this equals C calls of L queries), and layer i of the C per-channel stacks runs as one
    channel-stacked block (`channel_layers[i]`, batched matmuls and one attention call). The parameters stay per
    channel (`decoders.{c}.{i}.*`, as OpenPhenom's checkpoints name them); `decoders[c]` is channel c's stack as an
    nn.Sequential (the per-channel computation, one channel at a time)."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        Dd, C = cfg.decoder_dim, cfg.in_chans
        self.in_chans = C
        self.mask_token = nn.Parameter(torch.zeros(Dd))
        self.register_buffer("pos_embed", sincos_pos_embed(Dd, cfg.grid_size, C), persistent=False)
        self.modality_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, Dd)) for _ in range(C))
        eps = cfg.decoder_norm_eps
        self.query_norm = nn.LayerNorm(Dd, eps=eps)
        self.context_norm = nn.LayerNorm(Dd, eps=eps)
        self.cross_attention = CrossAttention(Dd, cfg.decoder_cross_heads)
        self.out_norm = nn.LayerNorm(Dd, eps=eps)
        self.mlp = Mlp(Dd, int(Dd * cfg.mlp_ratio))
        self.decoders = nn.ModuleList(
            nn.Sequential(*(Block(Dd, cfg.decoder_heads, cfg.mlp_ratio, eps) for _ in range(cfg.decoder_depth)))
            for _ in range(C)
        )
        self.channel_layers = nn.ModuleList(ChannelStackedBlocks([stack[i] for stack in self.decoders])
                                            for i in range(cfg.decoder_depth))
        self.checkpointing = cfg.grad_checkpointing

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor, in_chans: int) -> torch.Tensor:
        """x: (B, 1 + K, Dd) -> (B, C*L, Dd), channel-major."""
        if in_chans != self.in_chans:
            raise ValueError(f"this CA-MAE decoder was built for {self.in_chans} channels, got {in_chans}")
        # the class token is dropped here, so no prefix row (x[:, 1:] is read in place through its strides)
        full = ops.unshuffle(x[:, 1:], self.mask_token, ids_restore, self.pos_embed[0, 1:])
        B, N, Dd = full.shape
        C, L = in_chans, N // in_chans
        channel_tokens = torch.cat([t.expand(1, L, Dd) for t in self.modality_tokens], dim=1)
        full = full + channel_tokens
        # shared cross-attention + MLP: the queries of all channels in one call
        y = self.cross_attention(self.query_norm(full), self.context_norm(full))
        y = y + self.mlp(self.out_norm(y))
        # per-channel stacks: layer i of every channel as one channel-stacked block, tokens (C, B, L, Dd); contiguous
        # as every later layer's input is (one compiled graph for all layers; the first layer copied it anyway)
        y = _run_blocks(self.channel_layers, y.view(B, C, L, Dd).transpose(0, 1).contiguous(), self.checkpointing)
        return y.transpose(0, 1).reshape(B, N, Dd)


# ------------------------------------------------------------------------------------------------------------
# The masked autoencoder
# ------------------------------------------------------------------------------------------------------------

@dataclass
class MAEOutput:
    loss: torch.Tensor
    pred: torch.Tensor              # (B, L, P) predictions of every token, original order
    masking: ops.Masking
    target: torch.Tensor            # (B, L - K, P) standardised targets of the masked tokens (shuffled order)
    extras: dict = field(default_factory=dict)


class MaskedAutoencoder(nn.Module):
    """MAE (standard tokens) or CA-MAE (channel-agnostic tokens), selected by `cfg.channel_agnostic`.
    `from_pretrained` / `save_pretrained` / `push_to_hub` are bound by mae_fast.hub (see there)."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg)
        self.encoder_decoder_proj = nn.Linear(cfg.embed_dim, cfg.decoder_dim)
        self.decoder = CAMAEDecoder(cfg) if cfg.channel_agnostic else MAEDecoder(cfg)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, cfg.token_dim)
        self.reset_parameters()

    def reset_parameters(self):
        def init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(init)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map of the flattened patch
        nn.init.zeros_(self.encoder.patch_embed.proj.bias)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        for blk in self.encoder.blocks:
            nn.init.constant_(blk.ls.gamma, self.cfg.init_values)
            nn.init.zeros_(blk.mlp_bias)
        if self.cfg.channel_agnostic:
            for t in self.decoder.modality_tokens:
                nn.init.normal_(t, std=0.02)

    # -- input checks ------------------------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> int:
        """Validate a raw image batch; returns its channel count (see ViTEncoder.check_images)."""
        return self.encoder.check_images(images)

    # -- training ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        """Raw images (B, C, H, W) -> loss on the masked tokens (+ predictions)."""
        cfg = self.cfg
        C = self.check_images(images)
        if self.training and cfg.channel_agnostic and C != cfg.in_chans:
            raise ValueError(f"CA-MAE decoder was built for {cfg.in_chans} channels, got {C}")
        ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
        patches = ops.masked_patchify(images, cfg.patch_size, ratio, cfg.layout, generator)
        masking = patches.masking
        latent = self.encoder.forward_tokens(patches.visible, masking.ids_keep)
        decoded = self.decoder(self.encoder_decoder_proj(latent), masking.ids_restore, C)
        pred = self.decoder_pred(decoded)  # (B, L, P)
        target = patches.target
        if cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        loss = ops.masked_mae_loss(pred, target, masking, patch_size=cfg.patch_size, layout=cfg.layout,
                                   alpha=cfg.fourier_alpha)  # fused: masked rows read in place, one scatter back
        return MAEOutput(loss, pred, masking, target)

    # -- inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: torch.Tensor, per_channel: bool = False, blocks: list[int] | None = None) -> torch.Tensor:
        """Raw images -> mean of the non-class tokens, no masking: (B, D), or (B, C*D) per channel (CA-MAE).
        `blocks` (1-based block numbers): the same pooling of each of those blocks' outputs, each through the final
        norm (`ViTEncoder.forward_blocks`) -> (B, len(blocks), D or C*D); block `depth` is the plain embedding.
        No gradients: to fine-tune, call the encoder (`model.encoder(images)`, or its forward_features /
        forward_head), which computes the same features with gradients."""
        if blocks is None:
            return self.encoder(images, per_channel=per_channel)
        C = self.check_images(images)
        tokens = ops.standardized_tokens(images, self.cfg.patch_size, self.cfg.layout)  # fused: one pass, no mask
        blocks = check_blocks(blocks, self.cfg.depth)
        return torch.stack([self.encoder.pool(x, C, per_channel).flatten(1)
                            for x in self.encoder.forward_blocks(tokens, blocks)], dim=1)

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """For figures: (standardised input, masked input, reconstruction with visible patches pasted), each
        (B, C, H, W)."""
        cfg = self.cfg
        C = images.shape[1]
        with torch.no_grad():
            out = self.forward(images, generator=generator)
            x = ops.self_standardize(images)
            tokens = ops.patchify(x, cfg.patch_size, cfg.layout)
            keep = (1 - out.masking.mask).unsqueeze(-1)
            masked = ops.unpatchify(tokens * keep, cfg.patch_size, C, cfg.layout)
            recon = ops.unpatchify(tokens * keep + out.pred.float() * (1 - keep), cfg.patch_size, C, cfg.layout)
        return x, masked, recon


def parse_blocks(blocks, depth: int) -> list[int]:
    """"all", a comma list ("2,4") or block numbers -> `check_blocks`' sorted 1-based list."""
    if isinstance(blocks, str):
        if blocks.strip() == "all":
            return list(range(1, depth + 1))
        blocks = [b for b in (t.strip() for t in blocks.split(",")) if b]
    return check_blocks(blocks, depth)


def check_blocks(blocks, depth: int) -> list[int]:
    """Encoder block numbers (1-based) sorted and distinct; ValueError naming the valid range otherwise."""
    try:
        chosen = sorted(set(int(b) for b in blocks))
    except (TypeError, ValueError):
        chosen = []
    if not chosen or chosen[0] < 1 or chosen[-1] > depth:
        raise ValueError(f"blocks must be 'all' or encoder block numbers 1..{depth}, got {list(blocks)}")
    return chosen


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

