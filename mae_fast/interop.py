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

from mae_fast.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    is_our_config,
    load_model,
    load_state_dict_strict,
)
from mae_fast.models.mae import MAEConfig, MaskedAutoencoder  # the module: mae_fast.models imports mae_fast.hub


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


TIMM_FOLDER_KEY = "mae_fast"  # config.json of a timm folder written by save_timm: how to rebuild the mae_fast model


def save_timm(model: MaskedAutoencoder, directory: str, in_chans: int | None = None,
              timm_legacy_bias: bool | None = None) -> str:
    """The encoder as a timm model folder, the layout timm's Hub export writes: `model.safetensors` (the timm
    VisionTransformer state dict, `to_timm_state_dict`) + `config.json` with `architecture`, `num_classes`,
    `num_features`, `global_pool`, `model_args` (the JSON-able VisionTransformer arguments) and `pretrained_cfg`.
    timm registers no model name with this block layout, so build it with
    `VisionTransformer(**timm_vit_kwargs(cfg, in_chans))` and load the weights; `from_pretrained` / `load_any` read
    the folder back (config.json's `mae_fast` entry keeps the full model config). Returns the directory."""
    from safetensors.torch import save_file

    from mae_fast.io import atomic_write, atomic_write_json

    cfg = model.cfg
    C = timm_channels(cfg, in_chans)
    state = {k: v.contiguous() for k, v in to_timm_state_dict(model, timm_legacy_bias, C).items()}
    args = dict(timm_vit_kwargs(cfg, C))
    for unserialisable in ("block_fn", "norm_layer", "drop_path_rate"):  # the classes; a training-only rate
        args.pop(unserialisable)
    if isinstance(args["img_size"], tuple):
        args["img_size"] = list(args["img_size"])
    height = C * cfg.img_size if cfg.channel_agnostic else cfg.img_size
    meta = {
        "architecture": cfg.name, "num_classes": 0, "num_features": cfg.embed_dim, "global_pool": "avg",
        "model_args": args,
        "pretrained_cfg": {"input_size": [args["in_chans"], height, cfg.img_size], "num_classes": 0,
                           "input_standardisation": "per image and channel (mae_fast.interop.timm_input)"},
        TIMM_FOLDER_KEY: {"config": cfg.to_dict(), "in_chans": C},
    }
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(directory, CONFIG_NAME), meta)
    return directory


def is_timm_config(meta) -> bool:
    """Whether a parsed config.json is timm's Hub model config (an `architecture` with timm's companions)."""
    return isinstance(meta, dict) and "architecture" in meta and ("model_args" in meta or "pretrained_cfg" in meta)


def timm_config(state: dict[str, torch.Tensor], meta: dict, source: str) -> MAEConfig:
    """The MAEConfig of a timm encoder folder: config.json's `mae_fast` entry when save_timm wrote it, else read
    from the weights' shapes and `model_args` (a standard-layout encoder with the installed timm's bias routing)."""
    ours = meta.get(TIMM_FOLDER_KEY)
    if isinstance(ours, dict) and isinstance(ours.get("config"), dict):
        return MAEConfig.from_dict(ours["config"])
    args = meta.get("model_args") or {}
    try:
        D, C, p, _ = state["patch_embed.proj.weight"].shape
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        head_dim = state["blocks.0.q_norm.weight"].shape[0]
        hidden = state["blocks.0.mlp_bias"].shape[0]
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source} is not a timm encoder of mae_fast's architecture (ParallelScalingBlock "
                              f"with QK-norm; missing {err})") from err
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5)) if "pos_embed" in state else None
    img_size = args.get("img_size") or (grid * p if grid else 256)
    try:
        legacy = timm_parallel_bias_is_legacy()
    except ImportError:
        legacy = False
    return MAEConfig(name=str(meta.get("architecture", "timm")), img_size=int(img_size), patch_size=p, in_chans=C,
                     embed_dim=D, depth=depth, num_heads=D // head_dim, mlp_ratio=hidden / D,
                     fc_norm="fc_norm.weight" in state, legacy_parallel_bias=legacy,
                     init_values=float(args.get("init_values") or MAEConfig.init_values))


def load_timm_folder(directory: str) -> MaskedAutoencoder:
    """A MaskedAutoencoder from a timm encoder folder (`save_timm`, or timm's Hub export of this architecture):
    the encoder holds the weights, the decoder is freshly initialised."""
    from safetensors.torch import load_file

    cfg_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    meta = _read_json(cfg_path)
    try:
        state = load_file(weights_path)
    except Exception as err:  # noqa: BLE001 - safetensors' own error types
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {err}") from err
    try:
        cfg = timm_config(state, meta, weights_path)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_path}: its model config cannot be read: {err}") from err
    return from_timm_state_dict(state, cfg, weights_path)


def _read_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (ValueError, TypeError) as err:  # not JSON (or not UTF-8): say so, not "not OpenPhenom"
        raise CheckpointError(f"{path} is not JSON ({err}); the checkpoint's configuration cannot be read") from err


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


def checkpoint_kind(path: str) -> str:
    """Which loader a checkpoint needs, from the folder: "ours" (our config.json, either layout), "timm" (timm's
    Hub config.json), else "openphenom" (its own config.json or none; a file is OpenPhenom's weights)."""
    config_path = os.path.join(path, CONFIG_NAME)
    if os.path.isdir(path) and os.path.exists(config_path):
        meta = _read_json(config_path)
        if is_our_config(meta):
            return "ours"
        if is_timm_config(meta):
            return "timm"
    return "openphenom"


def load_any(path: str) -> torch.nn.Module:
    """Our checkpoint directory (an MAE or a baseline), a timm encoder folder, or an OpenPhenom file/directory
    (see `checkpoint_kind`)."""
    kind = checkpoint_kind(path)
    if kind == "ours":
        return load_model(path)
    if kind == "timm":
        return load_timm_folder(path)
    return load_openphenom(path)
