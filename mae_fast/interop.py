"""Other projects' model formats: timm's VisionTransformer and Recursion's OpenPhenom, and `load_any`, which takes
ours (`mae_fast.checkpoint`) or theirs.

- timm: the encoder's parameter names already follow timm's VisionTransformer with ParallelScalingBlock, so
  export/import is a key filter; `timm_vit_kwargs` builds the matching timm model and `timm_input` prepares its
  input (self-standardised). CA-MAE exports exactly, for one channel count, as a single-channel ViT over the
  channels stacked top to bottom (see `timm_vit_kwargs`). timm changed where
  ParallelScalingBlock adds its bias (MAEConfig.legacy_parallel_bias); an export to a timm that routes it the other
  way is refused unless every mlp_bias is zero (the function would change).
- OpenPhenom: a torch pickle named `model.safetensors` holding {"state_dict": ...} with `encoder.vit_backbone.*`
  (timm names), `decoder.*`, `encoder_decoder_proj.*`, `decoder_pred.*`; read with weights_only=True only. The
  imported model computes what the released code does under timm 0.9.7: legacy bias routing, "openphenom" pooling
  (mean of the un-normalised tokens), 8-head decoder cross-attention, decoder LayerNorm eps from the folder's
  config.json (1e-6 when absent).
"""
from __future__ import annotations

import json
import os
import re

import torch
import torch.nn.functional as F

from mae_fast.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_model, load_state_dict_strict
from mae_fast.models import MAEConfig, MaskedAutoencoder


# ------------------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------------------

def timm_channels(cfg: MAEConfig, in_chans: int | None = None) -> int:
    """The channel count a timm export is built for: the model's own, or (CA-MAE) any 1..max_in_chans."""
    C = in_chans or cfg.in_chans
    if not cfg.channel_agnostic and C != cfg.in_chans:
        raise ValueError(f"model {cfg.name} takes {cfg.in_chans} channels; in_chans={C} only applies to CA-MAE")
    if not 1 <= C <= cfg.max_in_chans:
        raise ValueError(f"a CA-MAE export takes 1..{cfg.max_in_chans} channels, got in_chans={C}")
    return C


def timm_vit_kwargs(cfg: MAEConfig, in_chans: int | None = None) -> dict:
    """Arguments of timm.models.vision_transformer.VisionTransformer that build our encoder.

    CA-MAE (channel_agnostic): the C channels of an image, stacked top to bottom into one (C*H) x W single-channel
    image (`timm_input`), patchify into exactly the channel-major token order of CA-MAE, and the shared
    Conv2d(1, D, p, p) is a timm patch embedding with in_chans=1. So a timm ViT of img_size (C*H, W), in_chans 1,
    with CA-MAE's per-channel repeated positions in `pos_embed`, computes the CA-MAE encoder exactly -- for the one
    channel count C it was exported for (`in_chans`, default cfg.in_chans)."""
    from functools import partial

    from timm.models.vision_transformer import ParallelScalingBlock

    C = timm_channels(cfg, in_chans)
    if cfg.channel_agnostic:
        img_size, patch_chans = (C * cfg.img_size, cfg.img_size), 1
    else:
        img_size, patch_chans = cfg.img_size, C
    return dict(
        img_size=img_size, patch_size=cfg.patch_size, in_chans=patch_chans, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=False, qk_norm=True,
        init_values=cfg.init_values, class_token=True, global_pool="avg", fc_norm=cfg.fc_norm, num_classes=0,
        drop_path_rate=cfg.drop_path, block_fn=ParallelScalingBlock,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )


def timm_input(images: torch.Tensor, cfg: MAEConfig) -> torch.Tensor:
    """What the exported timm encoder takes for raw images (B, C, H, W): the per-image, per-channel
    self-standardised images (as mae_fast standardises before patching), and for CA-MAE the channels stacked top
    to bottom: (B, 1, C*H, W)."""
    from mae_fast import ops

    x = ops.self_standardize(images)
    if cfg.channel_agnostic:
        B, C, H, W = x.shape
        x = x.reshape(B, 1, C * H, W)
    return x


def timm_parallel_bias_is_legacy() -> bool:
    """Whether the installed timm's ParallelScalingBlock routes mlp_bias the timm-0.9.7 way (see
    MAEConfig.legacy_parallel_bias). Found by running a small block with a zero projection weight and reading the
    bias its MLP activation receives, so it holds for any timm version."""
    from timm.models.vision_transformer import ParallelScalingBlock as TimmBlock

    dim = 4
    block = TimmBlock(dim, num_heads=1, mlp_ratio=4.0, qkv_bias=False, qk_norm=True).eval()
    seen = {}
    hook = block.mlp_act.register_forward_hook(lambda mod, args, out: seen.setdefault("h", args[0]))
    with torch.no_grad():
        block.in_proj.weight.zero_()
        block.mlp_bias.copy_(torch.arange(1.0, 4 * dim + 1))
        block(torch.randn(1, 2, dim))
    hook.remove()
    hidden_bias = seen["h"][0, 0]
    if torch.equal(hidden_bias, block.mlp_bias):
        return False
    if torch.equal(hidden_bias, F.pad(block.mlp_bias, (3 * dim, 0))[:4 * dim]):
        return True
    raise RuntimeError(f"the installed timm's ParallelScalingBlock adds its bias in an unknown way: {hidden_bias}")


def to_timm_state_dict(model: MaskedAutoencoder, timm_legacy_bias: bool | None = None,
                       in_chans: int | None = None) -> dict[str, torch.Tensor]:
    """The encoder as a timm VisionTransformer state dict (fixed sin-cos positions written into `pos_embed`), for
    `VisionTransformer(**timm_vit_kwargs(cfg, in_chans))`. A CA-MAE encoder exports for one channel count
    (`in_chans`, default the model's): see `timm_vit_kwargs`.

    `timm_legacy_bias`: how the target timm routes ParallelScalingBlock's bias (None: the installed timm's, see
    `timm_parallel_bias_is_legacy`; without timm installed, the current routing that `pip install timm` gives).
    When it differs from the model's and some mlp_bias is non-zero, the export
    would compute another function: refused."""
    C = timm_channels(model.cfg, in_chans)
    if any(blk.mlp_bias.any() for blk in model.encoder.blocks):
        target = timm_legacy_bias
        if target is None:
            try:
                target = timm_parallel_bias_is_legacy()
            except ImportError:
                target = False
        if target != model.cfg.legacy_parallel_bias:
            routing = {True: "timm 0.9.7's legacy routing", False: "the current routing"}
            raise ValueError(
                f"model {model.cfg.name} adds its ParallelScalingBlock bias with {routing[model.cfg.legacy_parallel_bias]}, "
                f"the target timm with {routing[target]}: the exported encoder would compute a different function "
                "(export to a timm with the same routing, or keep the model in mae_fast's format with save_model)")
    state = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    state["pos_embed"] = model.encoder.pos_embed[:, :1 + model.cfg.tokens(C)].detach().clone()
    return state


def _check_positions(pos: torch.Tensor, expected: torch.Tensor, source: str) -> None:
    if tuple(pos.shape) != tuple(expected.shape):
        raise CheckpointError(f"{source}: pos_embed has shape {tuple(pos.shape)}, the model needs {tuple(expected.shape)}")
    if not torch.allclose(pos.float(), expected, atol=1e-4):
        raise CheckpointError(f"{source}: pos_embed is not the fixed 2-D sin-cos embedding mae_fast uses "
                              "(learned positions are not supported)")


def from_timm_state_dict(state: dict[str, torch.Tensor], cfg: MAEConfig, source: str = "timm state dict") -> MaskedAutoencoder:
    """A MaskedAutoencoder whose encoder holds the timm weights (the decoder stays freshly initialised)."""
    state = dict(state)
    state.pop("head.weight", None), state.pop("head.bias", None)
    model = MaskedAutoencoder(cfg)
    if "pos_embed" in state:
        pos, expected = state.pop("pos_embed"), model.encoder.pos_embed
        tokens = pos.shape[1] - 1 if pos.ndim == 3 else -1
        if cfg.channel_agnostic and tokens % cfg.num_patches == 0 and 1 <= tokens // cfg.num_patches <= cfg.max_in_chans:
            expected = expected[:, :1 + tokens]  # a CA-MAE export for tokens / L channels
        _check_positions(pos, expected, source)
    load_state_dict_strict(model.encoder, state, source)
    return model


# ------------------------------------------------------------------------------------------------------------
# OpenPhenom
# ------------------------------------------------------------------------------------------------------------

def _read_openphenom_state(path: str) -> dict[str, torch.Tensor]:
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"OpenPhenom checkpoint {path} does not exist")
    try:  # a real safetensors file
        from safetensors.torch import load_file

        return load_file(path)
    except Exception:  # noqa: BLE001 - fall through to the pickle form, read safely
        pass
    try:  # through a file object: torch >= 2.15 would read a `.safetensors` path as safetensors again
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path} is neither safetensors nor a weights-only torch checkpoint: {err}") from err
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no tensor state_dict")
    return state


def _openphenom_decoder_settings(path: str) -> dict:
    """decoder_heads and decoder_norm_eps from the released config.json beside the weights (a Hugging Face config
    whose `decoder` entry holds `num_heads` and `norm_layer.eps`), when there is one."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        return {}
    try:
        with open(cfg_path) as f:
            decoder = json.load(f).get("decoder") or {}
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{cfg_path} is not a readable OpenPhenom config.json: {err}") from err
    settings = {}
    if isinstance(decoder.get("num_heads"), int):
        settings["decoder_heads"] = decoder["num_heads"]
    norm = decoder.get("norm_layer")
    if isinstance(norm, dict):  # a partial LayerNorm; without eps it is nn.LayerNorm's default
        settings["decoder_norm_eps"] = float(norm.get("eps", 1e-5))
    return settings


def openphenom_config(state: dict[str, torch.Tensor], source: str = "checkpoint", **overrides) -> MAEConfig:
    """Infer the architecture from the OpenPhenom key layout; the computation follows the released code under
    timm 0.9.7 (legacy ParallelScalingBlock bias, pooling of the un-normalised tokens, 8-head cross-attention)."""
    try:
        proj = state["encoder.vit_backbone.patch_embed.proj.weight"]  # (D, C, p, p)
        D, C_in, p, _ = proj.shape
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.vit_backbone\.blocks\.(\d+)\.", k)))
        head_dim = state["encoder.vit_backbone.blocks.0.q_norm.weight"].shape[0]
        hidden = state["encoder.vit_backbone.blocks.0.mlp_bias"].shape[0]
        dec_dim = state["encoder_decoder_proj.weight"].shape[0]
        pos = state.get("encoder.vit_backbone.pos_embed")
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source} does not have the OpenPhenom key layout (missing {err})") from err
    channel_agnostic = C_in == 1
    modality = sorted(int(m.group(1)) for k in state if (m := re.match(r"decoder\.modality_tokens\.(\d+)$", k)))
    if channel_agnostic:
        in_chans = len(modality) if modality else 6
        stacks = [k for k in state if re.match(r"decoder\.decoders\.0\.(\d+)\.norm1\.weight$", k)]
        dec_depth = len(stacks)
    else:
        in_chans = C_in
        dec_depth = len([k for k in state if re.match(r"decoder\.blocks\.(\d+)\.norm1\.weight$", k)])
    L = None
    if pos is not None:
        tokens = pos.shape[1] - 1
        L = tokens // 11 if channel_agnostic and tokens % 11 == 0 else tokens
    grid = int(round((L or 256) ** 0.5))
    return MAEConfig(
        name="openphenom", img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=D, depth=depth,
        num_heads=D // head_dim, mlp_ratio=hidden / D, channel_agnostic=channel_agnostic,
        fc_norm="encoder.vit_backbone.fc_norm.weight" in state, decoder_dim=dec_dim, decoder_depth=dec_depth,
        **{"decoder_heads": 16, "decoder_cross_heads": 8, "decoder_norm_eps": 1e-6, "pooling": "openphenom",
           "legacy_parallel_bias": True, **overrides},
    )


def load_openphenom(path: str) -> MaskedAutoencoder:
    """Import an OpenPhenom checkpoint (file or directory holding `model.safetensors`)."""
    raw = _read_openphenom_state(path)
    cfg = openphenom_config(raw, path, **_openphenom_decoder_settings(path))
    model = MaskedAutoencoder(cfg)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key.startswith("encoder.vit_backbone."):
            name = key[len("encoder.vit_backbone."):]
            if name == "pos_embed":
                _check_positions(value, model.encoder.pos_embed, path)
                continue
            state["encoder." + name] = value
        elif key in ("decoder.placeholder", "decoder.pos_embeddings", "decoder.pos_embed"):
            continue  # constants: the class-token placeholder and the fixed decoder positions
        elif key == "decoder.mask_token":
            state[key] = value.reshape(-1)
        else:
            state[key] = value
    load_state_dict_strict(model, state, path)
    return model


def load_any(path: str) -> torch.nn.Module:
    """Our checkpoint directory (an MAE or a baseline), or an OpenPhenom file/directory."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_NAME)):
        config_path = os.path.join(path, CONFIG_NAME)
        try:
            with open(config_path, "rb") as f:
                is_ours = "mae_fast_config" in json.loads(f.read())
        except (ValueError, TypeError) as err:  # not JSON (or not UTF-8): say so, not "not OpenPhenom"
            raise CheckpointError(f"{config_path} is not JSON ({err}); the checkpoint's configuration cannot be "
                                  "read") from err
        if is_ours:
            return load_model(path)
    return load_openphenom(path)
