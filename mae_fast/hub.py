"""The Hugging Face Hub: load a model by folder or repo id, save a Hub model folder, upload it.

    import mae_fast
    model = mae_fast.from_pretrained("recursionpharma/OpenPhenom")     # a Hub repo id (downloaded once, cached)
    model = mae_fast.from_pretrained("runs/s16")                       # a local folder (or a training run)
    model.save_pretrained("s16_hub")                                   # config.json + model.safetensors + README.md
    model.push_to_hub("me/s16-rxrx3")                                  # the same folder, uploaded

`from_pretrained` takes what `interop.load_any` reads, detected from the folder (`interop.checkpoint_kind`): our
checkpoints (config.json with model_type "mae_fast", or the older nested layout), timm encoder folders (timm's
config.json with `architecture` / `model_args`; the decoder is then freshly initialised) and OpenPhenom's repo
layout. A name that is not a local path is a Hub repo id, fetched with `huggingface_hub.snapshot_download` (only
config.json, model.safetensors and README.md) into the Hugging Face cache; with HF_HUB_OFFLINE=1 it is read from
the cache only (HF_HOME / HF_HUB_CACHE are read when called, not at import).

`MaskedAutoencoder.from_pretrained / save_pretrained / push_to_hub` are these functions, bound to the class when
`mae_fast.models` is imported (they need the checkpoint readers, which import the model module, so the model module
cannot import them itself). The readers are imported inside the functions for the same reason: `mae_fast.models`
imports this module while they may still be loading.
"""
from __future__ import annotations

import os
import re
import tempfile

import torch

from mae_fast.models.mae import MaskedAutoencoder

CARD_NAME = "README.md"
HUB_FILES = ["config.json", "model.safetensors", CARD_NAME]  # what a model needs; never the repo's code files
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def hub_cache_dir() -> str | None:
    """The Hub cache as the environment names it now: HF_HUB_CACHE, else HF_HOME/hub (None: huggingface_hub's)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def resolve_checkpoint(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A local path as it is; else a Hub repo id -> the local snapshot folder (downloaded when online)."""
    from mae_fast.checkpoint import CheckpointError

    if os.path.exists(name_or_path):
        return name_or_path
    if not REPO_ID.match(name_or_path):
        raise CheckpointError(f"checkpoint {name_or_path} does not exist (and is not a Hub repo id ORG/NAME)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:
        raise ImportError(f"checkpoint {name_or_path} is not a local path; reading it from the Hugging Face Hub "
                          "needs huggingface_hub (pip install huggingface_hub)") from err
    offline = hub_offline()
    try:
        return snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir or hub_cache_dir(),
                                 allow_patterns=HUB_FILES, local_files_only=offline)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        where = ("in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline
                 else "on the Hugging Face Hub or in the local cache")
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {name_or_path} is neither a local path nor a model repository "
                              f"found {where} ({reason})") from err


def from_pretrained(name_or_path: str, *, revision: str | None = None, cache_dir: str | None = None) -> torch.nn.Module:
    """A model in eval mode from a local folder (ours, a training run's, timm's, OpenPhenom's) or a Hub repo id.
    Our folders' metadata (training step, crops, ...) is kept as `model.pretrained_info` for save_pretrained."""
    from mae_fast.checkpoint import CONFIG_NAME
    from mae_fast.interop import checkpoint_kind, load_any

    path = resolve_checkpoint(name_or_path, revision, cache_dir)
    if os.path.exists(os.path.join(path, "model", CONFIG_NAME)):  # a training run: its final model
        path = os.path.join(path, "model")
    model = load_any(path).eval()
    model.pretrained_info = _metadata(path) if checkpoint_kind(path) == "ours" else {}
    return model


def _metadata(path: str) -> dict:
    import json

    from mae_fast.checkpoint import CONFIG_NAME, split_config

    with open(os.path.join(path, CONFIG_NAME)) as f:
        return split_config(json.load(f))[1]


def model_card(model: torch.nn.Module, training: dict | None = None, evaluation=None, name: str | None = None) -> str:
    """README.md of a Hub model folder: the preset, parameters, architecture, training crops and steps (from
    `training`, e.g. {"step": ..., "crops": ...}), and the evaluation table (`evaluation`: markdown text, or an
    object with `.markdown()` such as mae_fast.evaluation's EvaluationResult) when there is one."""
    cfg = model.cfg
    training = training or {}
    total = sum(p.numel() for p in model.parameters())
    rows = [("preset", f"`{cfg.name}`"), ("parameters", f"{total:,}")]
    if isinstance(model, MaskedAutoencoder):
        kind = "channel-agnostic MAE (CA-MAE)" if cfg.channel_agnostic else "MAE"
        channels = f"1..{cfg.max_in_chans} (trained on {cfg.in_chans})" if cfg.channel_agnostic else str(cfg.in_chans)
        rows += [("encoder parameters", f"{sum(p.numel() for p in model.encoder.parameters()):,}"),
                 ("model", f"{kind} ViT: dim {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, "
                           f"patch {cfg.patch_size}"),
                 ("input", f"{cfg.img_size}x{cfg.img_size} crops, {channels} channels, uint8/uint16 "
                           "(self-standardised per image and channel)")]
    else:
        rows.append(("model", f"{type(model).__name__} ({cfg.family} baseline)"))
    steps, crops = training.get("step"), training.get("crops")
    rows.append(("training", ", ".join(p for p in (f"{steps:,} steps" if steps is not None else "",
                                                      f"{crops:,} crops" if crops is not None else "") if p)
                 or "not recorded"))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    usage = ("features = model.embed(images)  # (B, C, H, W) uint8/uint16 -> (B, D), no gradients\n"
             "features = model.encoder(images)  # the same with gradients, for fine-tuning"
             if isinstance(model, MaskedAutoencoder) else "features = model.embed(images)")
    parts = ["---", "library_name: mae_fast", "pipeline_tag: image-feature-extraction",
             "tags: [masked-autoencoder, microscopy, cell-painting]", "---", "",
             f"# {name or cfg.name}", "", "A model saved by mae_fast.", "", table, "", "## Use", "", "```python",
             "import mae_fast", "", f'model = mae_fast.from_pretrained("{name or "PATH_OR_REPO_ID"}")', usage, "```"]
    if evaluation is not None:
        text = evaluation.markdown() if hasattr(evaluation, "markdown") else str(evaluation)
        parts += ["", "## Evaluation", "", text.strip()]
    return "\n".join(parts) + "\n"


def save_pretrained(model: torch.nn.Module, directory: str, *, training: dict | None = None, evaluation=None,
                    name: str | None = None) -> str:
    """A Hub model folder: config.json (flat, model_type "mae_fast") + model.safetensors + README.md (the model
    card, `model_card`), each written atomically. `training` defaults to the metadata the model was loaded with
    (`pretrained_info`). Returns the directory."""
    from mae_fast.checkpoint import save_model
    from mae_fast.io import atomic_write, write_text

    info = {**getattr(model, "pretrained_info", {}), **(training or {})}
    save_model(model, directory, extra=info or None)
    card = model_card(model, info, evaluation, name)
    atomic_write(os.path.join(directory, CARD_NAME), lambda tmp: write_text(tmp, card))
    return directory


def push_to_hub(model: torch.nn.Module, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload model saved by mae_fast", training: dict | None = None,
                evaluation=None) -> str:
    """save_pretrained into a temporary folder, then upload it to the Hub repo `repo_id` (created if needed).
    Needs the network and a token (`hf auth login` or HF_TOKEN). Returns the commit URL."""
    from huggingface_hub import HfApi

    if hub_offline():
        raise RuntimeError("HF_HUB_OFFLINE is set: push_to_hub needs the network")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mae_fast-hub-") as folder:
        save_pretrained(model, folder, training=training, evaluation=evaluation, name=repo_id)
        return str(api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message))


def _mae_from_pretrained(cls, name_or_path: str, **kwargs) -> MaskedAutoencoder:
    """`from_pretrained`, refusing a folder that holds another kind of model."""
    from mae_fast.checkpoint import CheckpointError

    model = from_pretrained(name_or_path, **kwargs)
    if not isinstance(model, cls):
        raise CheckpointError(f"{name_or_path} holds a {type(model).__name__}, not a {cls.__name__}")
    return model


MaskedAutoencoder.from_pretrained = classmethod(_mae_from_pretrained)
MaskedAutoencoder.save_pretrained = save_pretrained
MaskedAutoencoder.push_to_hub = push_to_hub
