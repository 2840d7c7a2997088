"""`mae-fast train`: pre-train an MAE / CA-MAE, or train a baseline of the seed paper (WSL DenseNet-161 with or without
AdaBN, MU-Net-M/L; `mae_fast.baselines`), on a screen, on one device or many (torchrun).

Configuration = a preset name + an optional YAML/TOML file + command-line overrides (`--set key=value`, dotted keys
for the nested sections: `model.img_size=128`, `data.root=/data/rxrx3`). Everything is validated before any work
starts; unknown presets and keys are errors that list the valid ones.

    mae-fast train --preset mae_vit_small_patch16_256 --data /data/rxrx3 --out runs/s16 --steps 20000
    torchrun --nproc_per_node 8 -m mae_fast.cli train --config run.yaml --set global_batch=16384
    mae-fast train --out runs/s16 --resume                       # continue exactly where the last checkpoint was

Training: Lion (paper lr per size: 1e-4 S/B, 3e-5 L; wd 0.05; betas 0.9/0.95), one-cycle cosine with 10% warm-up,
bf16 autocast on GPUs with fp32 master weights, gradient accumulation up to the global batch, optional activation
checkpointing and torch.compile, DDP (or FSDP for the largest models): nccl on GPUs, gloo on CPUs.

Baselines (`--preset wsl_densenet161_256`, `wsl_densenet161_adabn_256`, `munet_m_256`, `munet_l_256`, or their
micro versions) go through the same loop, schedule, checkpoints and resume; what differs:
    optimiser      the preset's: SGD with Nesterov momentum (WSL; lr 0.1 per 256 crops, scaled linearly with
                   global_batch) or AdamW (MU-Net; lr 1e-3), with the same one-cycle cosine schedule
    model keys     `model.*` keys are the baseline config's (WSLConfig / MUNetConfig); MAE-only keys, Lion's
                   optimizer_impl, activation checkpointing and FSDP are refused (DDP works)
    WSL labels     only sites with a perturbation label are trained on; the classes (sorted perturbation names)
                   are stored in every checkpoint (`classes` in config.json and train_state.pt); model.num_classes
                   is set from them; each micro-batch's labels come from its crops' sites
    AdaBN          every micro-batch is from one plate: per data shard, one crop loader per plate, and a
                   PlateBatchSampler that chooses which plate gives the next micro-batch (plates in proportion to
                   their crops, order seeded per epoch); resumable (sampler position + every plate loader's state);
                   model.virtual_batch_size must be <= micro_batch
    figures        reconstructions only for models that reconstruct (MAE, MU-Net); MFU is n/a (no FLOP count)

Data and determinism. The global batch of a step is `global_batch / micro_batch` micro-batches j = 0, 1, ...;
micro-batch j comes from *data shard* j % S (S = `data.shards`, default the world size) and runs on rank j % W.
Each data shard is one crop loader (`make_train_loader(rank=s, world_size=S)`). Before micro-batch j of step t the
global RNG is seeded from (seed, t, j), so masking and stochastic depth depend only on (t, j). Hence a run with W
ranks and a single-process run with the same S and global batch see the same crops, masks and drop-path draws, and
a resumed run continues bit for bit (on CPU) once weights, optimiser, schedule and loader positions are restored.

Output folder:
    train_config.json                  the resolved configuration
    metrics.jsonl                      one JSON line per logged step (loss, lr, crops/s, MFU) and events
    checkpoints/step_XXXXXXXX/         model.safetensors + config.json (loadable with checkpoint.load_model) +
                                       train_state.pt (optimiser, schedule, loader positions, RNG; weights_only)
    recon/step_XXXXXXXX.png            reconstructions of a fixed validation batch
    model/                             the final weights (`mae-fast embed --checkpoint OUT/model`)
    loss_curve.png, train_summary.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import re
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Union

import numpy as np
import torch
import torch.distributed as dist

from mae_fast import baselines as bl
from mae_fast.checkpoint import (
    CONFIG_NAME, WEIGHTS_NAME, CheckpointError, atomic_write, atomic_write_json, from_timm_state_dict, load_any,
    load_state_dict_strict, save_model,
)
from mae_fast.models import PRESETS, MAEConfig, MaskedAutoencoder, get_config, list_presets
from mae_fast.optim import Lion, lion_param_groups, one_cycle_cosine

ModelConfig = Union[MAEConfig, bl.WSLConfig, bl.MUNetConfig]

STATE_NAME = "train_state.pt"
CHECKPOINT_DIR = "checkpoints"
STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
DATA_FORMATS = ("auto", "rxrx", "rxrx3_core", "jump", "pack")
AMP_MODES = ("auto", "bf16", "fp32")
DISTRIBUTED_MODES = ("ddp", "fsdp")
CUDA_ONLY_COMPILE_BACKENDS = ("cudagraphs",)
# files and folders a training run writes in its output folder (the only things --overwrite removes)
RUN_ENTRIES = ("train_config.json", "metrics.jsonl", CHECKPOINT_DIR, "recon", "model", "loss_curve.png",
               "train_summary.json", "tensorboard")


class ConfigError(ValueError):
    """A configuration that cannot run: names the key, the value and what is valid."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: names the step and the last good checkpoint."""


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    root: str = ""                       # RxRx folder, RxRx3-core parquet (file/folder/glob), JUMP table, pack folder
    format: str = "auto"                 # auto, rxrx, rxrx3_core, jump, pack
    metadata: str | None = None          # metadata CSV (default: ROOT/metadata.csv when it exists)
    channels: list[str] | None = None    # RxRx: channel numbers ("1".."6"); JUMP: channel names in order
    images_root: str | None = None       # JUMP: folder the table's file names are relative to
    experiments: list[str] | None = None  # selection (None = all)
    plates: list[str] | None = None
    perturbations: list[str] | None = None
    wells: list[str] | None = None
    crops_per_image: int | None = None   # crops cut per decoded site (default: as many as fit, at most 16)
    shuffle_sites: int | None = None     # sites whose crops are mixed in one window (default: the loader's)
    num_workers: int | None = None       # decode workers per data shard (default: min(8, cores))
    backend: str = "auto"                # auto, torch, dali
    on_error: str = "raise"              # raise, skip (bad sites are counted)
    shards: int = 0                      # data shards S (0 = the world size); see the module doc


@dataclass
class TrainConfig:
    preset: str = "mae_vit_small_patch16_256"
    model: dict = field(default_factory=dict)       # model config overrides, e.g. {"img_size": 128} (MAEConfig, or
                                                    # the baseline's WSLConfig / MUNetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "runs/mae"
    overwrite: bool = False
    resume: bool = False
    init_from: str | None = None         # start from these weights: our checkpoint, an OpenPhenom folder, or a
                                         # timm state dict file of the preset's encoder
    global_batch: int = 4096
    micro_batch: int = 256               # crops per forward pass on one device
    steps: int = 0                       # optimiser steps (or give `crops`)
    crops: int = 0                       # crops to train on: steps = ceil(crops / global_batch)
    max_seconds: float = 0.0             # stop early after this wall time (checkpoint written; 0 = no limit)
    lr: float | None = None              # peak lr (default: the preset's paper value; WSL: scaled with global_batch)
    weight_decay: float | None = None    # default: the preset's (0.05; WSL 1e-4)
    betas: tuple[float, float] | None = None  # Lion / AdamW (not SGD)
    warmup_fraction: float = 0.1
    optimizer_impl: str = "auto"         # Lion backend: auto, reference, foreach, triton, cpp (MAE only)
    amp: str = "auto"                    # auto (bf16 on GPU, fp32 on CPU), bf16, fp32
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    distributed: str = "ddp"             # ddp or fsdp (torchrun)
    device: str = "auto"                 # auto, cpu, cuda (torchrun: cuda:LOCAL_RANK)
    threads: int = 0                     # torch CPU threads (0: torch's default; cores / local ranks under torchrun)
    seed: int = 0
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    recon_every: int = 0                 # reconstruction PNG every N steps (0: only at the end)
    val_crops: int = 4                   # size of the fixed validation batch
    peak_tflops: float = 0.0             # MFU denominator (0: measure the matmul ceiling at start)
    progress: bool = True
    tensorboard: bool = True             # also write TensorBoard events when tensorboard is installed

    def to_dict(self) -> dict:
        """The JSON form (tuples as lists, so a saved config compares equal to a live one)."""
        d = dataclasses.asdict(self)
        if d["betas"] is not None:
            d["betas"] = list(d["betas"])
        d["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["model"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = cls()
        apply_mapping(cfg, d)
        return cfg


# keys that may differ between a run and its resumption (they do not change the arithmetic of a step)
RESUME_MAY_CHANGE = {
    "out_dir", "overwrite", "resume", "max_seconds", "amp", "activation_checkpointing", "compile", "compile_backend",
    "distributed", "device", "threads", "checkpoint_every", "keep_last", "log_every", "recon_every", "peak_tflops",
    "progress", "tensorboard", "optimizer_impl", "data.num_workers", "data.backend", "init_from",
}


def model_config_class(preset: str | None) -> type:
    """The config class of a preset: a baseline's WSLConfig / MUNetConfig, else MAEConfig."""
    if preset and bl.is_baseline(preset):
        return type(bl.get_baseline_config(preset))
    return MAEConfig


def _fields_of(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "name"}


def _model_fields(preset: str | None = None) -> dict[str, Any]:
    """The `model.*` keys of `preset` (MAEConfig's when None or an MAE preset) and their types."""
    return _fields_of(model_config_class(preset))


def _all_model_fields() -> dict[str, Any]:
    """Every model key of any model family (MAE first), with the type of the first family that has it."""
    out: dict[str, Any] = {}
    for cls in (MAEConfig, *bl.CONFIG_CLASSES.values()):
        for k, v in _fields_of(cls).items():
            out.setdefault(k, v)
    return out


def model_family(model_cfg) -> str:
    """"mae", "wsl" or "munet"."""
    return getattr(model_cfg, "family", "mae")


def valid_keys() -> list[str]:
    top = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "data")]
    return (top + [f"data.{f.name}" for f in dataclasses.fields(DataConfig)]
            + [f"model.{k}" for k in _all_model_fields()])


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value, hint, key: str):
    """`value` as the type `hint` (int, float, str, bool, list[...], tuple[...], dict, Optional), or a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: expected {_type_name(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    elif origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"config key {key!r}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _unknown_key(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")


def set_key(cfg: TrainConfig, key: str, value) -> None:
    """Set one (possibly dotted) key, checking its name and type."""
    parts = key.strip().split(".")
    if parts[0] in ("model", "data") and len(parts) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} is a section: give a mapping or dotted keys like {key}.<name>")
        for k, v in value.items():
            set_key(cfg, f"{key}.{k}", v)
        return
    if parts[0] == "model" and len(parts) == 2:
        # typed by the current preset's family when it has the key; whether the key fits the preset finally
        # chosen (a config file may set the preset after its model keys) is checked by resolve_model_config
        hints = _model_fields(cfg.preset)
        hint = hints.get(parts[1], _all_model_fields().get(parts[1]))
        if hint is None:
            raise _unknown_key(key)
        cfg.model[parts[1]] = _coerce(value, hint, key)
        return
    if parts[0] == "data" and len(parts) == 2:
        hints = typing.get_type_hints(DataConfig)
        if parts[1] not in hints:
            raise _unknown_key(key)
        setattr(cfg.data, parts[1], _coerce(value, hints[parts[1]], key))
        return
    hints = typing.get_type_hints(TrainConfig)
    if len(parts) != 1 or parts[0] not in hints or parts[0] in ("model", "data"):
        raise _unknown_key(key)
    setattr(cfg, parts[0], _coerce(value, hints[parts[0]], key))


def apply_mapping(cfg: TrainConfig, mapping: dict, source: str = "config") -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(mapping).__name__}")
    for key, value in mapping.items():
        set_key(cfg, str(key), value)


def read_config_file(path: str) -> dict:
    """A YAML (.yaml/.yml) or TOML (.toml) file as a nested mapping."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            toml = _toml_reader()
            with open(path, "rb") as f:
                data = toml.load(f)
        elif ext in (".yaml", ".yml", ".json"):
            import yaml

            with open(path) as f:
                data = yaml.safe_load(f) or {}
        else:
            raise ConfigError(f"config file {path}: use .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any parse error, reported with the file name
        raise ConfigError(f"config file {path} cannot be parsed: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def _toml_reader():
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("TOML config files need Python >= 3.11 (or the tomli package); use a YAML file") from None
    return tomllib


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`, the value read as YAML (numbers, true/false, null, [lists]) and otherwise kept as a string."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, set)) and not raw.strip().startswith("{"):
        value = raw
    return key.strip(), value


def build_config(preset: str | None = None, config_file: str | None = None, overrides: list[str] | None = None,
                 base: TrainConfig | dict | None = None) -> TrainConfig:
    """defaults (or `base`) < config file < preset argument < `key=value` overrides."""
    cfg = TrainConfig.from_dict(base) if isinstance(base, dict) else (base or TrainConfig())
    if config_file:
        apply_mapping(cfg, read_config_file(config_file), config_file)
    if preset:
        cfg.preset = preset
    for text in overrides or []:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    return cfg


# ------------------------------------------------------------------------------------------------------------
# Validation: everything that can be checked before any work
# ------------------------------------------------------------------------------------------------------------

@dataclass
class RunPlan:
    """The resolved numbers of a run."""

    model_cfg: ModelConfig          # WSL: num_classes is filled in from the dataset's labels before the model is built
    total_steps: int
    n_micro: int                    # micro-batches per optimiser step, all ranks together
    shards: int                     # data shards S
    world_size: int
    lr: float
    weight_decay: float
    betas: tuple[float, float] | None   # None for SGD

    @property
    def family(self) -> str:
        return model_family(self.model_cfg)

    @property
    def adabn(self) -> bool:
        return bool(getattr(self.model_cfg, "adabn", False))

    def local_micro(self, rank: int) -> list[int]:
        """The micro-batch numbers j that `rank` runs every step."""
        return list(range(rank, self.n_micro, self.world_size))

    def local_shards(self, rank: int) -> list[int]:
        return list(range(rank, self.shards, self.world_size))


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r} is {value!r}; valid values: {', '.join(map(str, choices))}")


def all_presets() -> list[str]:
    return list_presets() + bl.list_baselines()


def _foreign_model_keys(cfg: TrainConfig, cls: type) -> None:
    fields = _fields_of(cls)
    foreign = sorted(set(cfg.model) - set(fields))
    if foreign:
        kind = f"the baseline {cfg.preset} ({cls.__name__})" if cls is not MAEConfig else \
            f"the MAE preset {cfg.preset} (MAEConfig)"
        raise ConfigError(f"model key(s) {', '.join('model.' + k for k in foreign)} do not apply to {kind}; its "
                          f"model keys: {', '.join('model.' + k for k in fields)}")


def resolve_baseline_config(cfg: TrainConfig):
    """The baseline preset with the `model.*` overrides (typed by its config class), and the MAE-only settings
    refused."""
    cls = model_config_class(cfg.preset)
    _foreign_model_keys(cfg, cls)
    if "num_classes" in cfg.model:
        raise ConfigError("model.num_classes is not set by hand: the trainer sets it to the number of perturbation "
                          "labels of the selected sites (select them with data.perturbations)")
    fields = _fields_of(cls)
    overrides = {k: _coerce(v, fields[k], f"model.{k}") for k, v in cfg.model.items()}
    try:
        model_cfg = bl.get_baseline_config(cfg.preset, **overrides)
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"preset {cfg.preset}: {str(err).strip(chr(34))}") from err
    refused = {
        "activation_checkpointing": (cfg.activation_checkpointing, "activation checkpointing is implemented for the "
                                     "MAE's transformer blocks only"),
        "distributed": (cfg.distributed == "fsdp", "FSDP shards the MAE's transformer blocks; train baselines with "
                        "DDP (distributed=ddp)"),
        "optimizer_impl": (cfg.optimizer_impl != "auto", "optimizer_impl picks Lion's kernel; baselines use torch's "
                           + ("SGD" if model_cfg.optimizer == "sgd" else "AdamW")),
        "betas": (cfg.betas is not None and model_cfg.optimizer == "sgd", "the WSL baseline trains with SGD "
                  "(momentum), which has no betas; set model.momentum instead"),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise ConfigError(f"config key {key!r} ({getattr(cfg, key)!r}) does not apply to the baseline "
                              f"{cfg.preset}: {why}")
    return model_cfg


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    if bl.is_baseline(cfg.preset):
        return resolve_baseline_config(cfg)
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; valid presets: {', '.join(all_presets())}")
    _foreign_model_keys(cfg, MAEConfig)
    try:
        model_cfg = get_config(cfg.preset, **cfg.model)
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(str(err).strip('"')) from err
    if cfg.activation_checkpointing:
        model_cfg = replace(model_cfg, grad_checkpointing=True)
    if model_cfg.img_size % model_cfg.patch_size:
        raise ConfigError(f"model.img_size {model_cfg.img_size} is not a multiple of the patch size "
                          f"{model_cfg.patch_size}")
    if not 0.0 <= model_cfg.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio must be in [0, 1), got {model_cfg.mask_ratio}")
    return model_cfg


def validate(cfg: TrainConfig, world_size: int = 1) -> RunPlan:
    """Check every key and the batch arithmetic; returns the resolved plan or raises ConfigError."""
    model_cfg = resolve_model_config(cfg)
    for key in ("global_batch", "micro_batch", "checkpoint_every", "keep_last", "log_every", "val_crops"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    for key in ("steps", "crops", "recon_every", "threads", "data.shards"):
        value = getattr(cfg.data, key[5:]) if key.startswith("data.") else getattr(cfg, key)
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {value}")
    if cfg.max_seconds < 0 or cfg.peak_tflops < 0:
        raise ConfigError("max_seconds and peak_tflops must be >= 0")
    if (cfg.steps > 0) == (cfg.crops > 0):
        raise ConfigError(f"give exactly one of steps or crops (got steps={cfg.steps}, crops={cfg.crops})")
    if not 0.0 <= cfg.warmup_fraction < 1.0:
        raise ConfigError(f"warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")
    _check_choice("amp", cfg.amp, AMP_MODES)
    _check_choice("distributed", cfg.distributed, DISTRIBUTED_MODES)
    _check_choice("optimizer_impl", cfg.optimizer_impl, ("auto", "reference", "foreach", "triton", "cpp"))
    _check_choice("data.format", cfg.data.format, DATA_FORMATS)
    _check_choice("data.backend", cfg.data.backend, ("auto", "torch", "dali"))
    _check_choice("data.on_error", cfg.data.on_error, ("raise", "skip"))
    if not cfg.data.root:
        raise ConfigError("config key 'data.root' is empty: give the dataset (--data ROOT or --set data.root=...)")
    if not cfg.out_dir:
        raise ConfigError("config key 'out_dir' is empty")
    if cfg.global_batch % cfg.micro_batch:
        raise ConfigError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch {cfg.micro_batch}")
    n_micro = cfg.global_batch // cfg.micro_batch
    shards = cfg.data.shards or world_size
    if shards % world_size:
        raise ConfigError(f"data.shards {shards} is not a multiple of the world size {world_size}")
    if n_micro % shards:
        raise ConfigError(
            f"global_batch / micro_batch = {n_micro} micro-batches per step do not split evenly over "
            f"{shards} data shards (world size {world_size}); change global_batch, micro_batch or data.shards")
    total = cfg.steps if cfg.steps > 0 else math.ceil(cfg.crops / cfg.global_batch)
    if model_family(model_cfg) != "mae":
        return _baseline_plan(cfg, model_cfg, total, n_micro, shards, world_size)
    lr = model_cfg.lr if cfg.lr is None else cfg.lr
    wd = model_cfg.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    betas = tuple(model_cfg.betas if cfg.betas is None else cfg.betas)
    if lr <= 0 or wd < 0 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"invalid optimiser settings lr={lr}, weight_decay={wd}, betas={betas}")
    model_cfg = replace(model_cfg, lr=lr, weight_decay=wd, betas=betas)
    return RunPlan(model_cfg, total, n_micro, shards, world_size, lr, wd, betas)


def _baseline_plan(cfg: TrainConfig, model_cfg, total: int, n_micro: int, shards: int, world_size: int) -> RunPlan:
    """Optimiser numbers of a baseline: lr = the preset's `peak_lr(global_batch)` (linear scaling for WSL's SGD)
    unless given; the model config keeps its base lr (per `lr_batch` crops) and records wd/betas as used."""
    lr = model_cfg.peak_lr(cfg.global_batch) if cfg.lr is None else cfg.lr
    wd = model_cfg.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    betas = None
    if model_cfg.optimizer == "adamw":
        betas = tuple(model_cfg.betas if cfg.betas is None else cfg.betas)
        model_cfg = replace(model_cfg, betas=betas)
    if lr <= 0 or wd < 0 or (betas is not None and not all(0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"invalid optimiser settings lr={lr}, weight_decay={wd}, betas={betas}")
    if getattr(model_cfg, "adabn", False) and model_cfg.virtual_batch_size > cfg.micro_batch:
        raise ConfigError(f"model.virtual_batch_size {model_cfg.virtual_batch_size} is larger than micro_batch "
                          f"{cfg.micro_batch}: ghost batch norm normalises virtual batches within one micro-batch "
                          "(of one plate); lower model.virtual_batch_size or raise micro_batch")
    model_cfg = replace(model_cfg, weight_decay=wd)
    return RunPlan(model_cfg, total, n_micro, shards, world_size, lr, wd, betas)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA (cuda:LOCAL_RANK) when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"config key 'device' is {name!r}: {err}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA device on this machine; "
                              "use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"config key 'device' is {name!r}; valid values: auto, cpu, cuda, cuda:N")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs; fp32 on CPUs (bf16 is emulated there, and asking for it is an error)."""
    if amp == "bf16" and device.type != "cuda":
        raise ConfigError("amp=bf16 (--bf16) needs a CUDA device; this run is on the CPU (use --amp fp32)")
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if amp == "bf16" else None


def check_device_options(cfg: TrainConfig, device: torch.device) -> None:
    resolve_amp(cfg.amp, device)
    if cfg.compile and cfg.compile_backend in CUDA_ONLY_COMPILE_BACKENDS and device.type != "cuda":
        raise ConfigError(f"compile_backend {cfg.compile_backend!r} needs a CUDA device; this run is on the CPU")


# ------------------------------------------------------------------------------------------------------------
# Data: index, selection, shard streams
# ------------------------------------------------------------------------------------------------------------

def _detect_format(root: str) -> str:
    if os.path.isdir(root):
        if os.path.exists(os.path.join(root, "pack.json")):
            return "pack"
        if not os.path.isdir(os.path.join(root, "images")) and glob.glob(os.path.join(root, "*.parquet")):
            return "rxrx3_core"
        return "rxrx"
    if root.endswith(".parquet") or any(ch in root for ch in "*?["):
        return "rxrx3_core"
    if root.endswith((".csv", ".csv.gz")):
        return "jump"
    return "rxrx"


def build_site_index(data: DataConfig):
    """The selected sites of the dataset; an empty selection is an error naming what exists."""
    from mae_fast.data.index import SiteIndex

    root = data.root
    fmt = _detect_format(root) if data.format == "auto" else data.format
    if fmt in ("rxrx", "pack") and not os.path.exists(root):
        raise ConfigError(f"data.root {root!r} does not exist")
    if fmt == "rxrx":
        channels = [int(str(c).lstrip("wW")) for c in data.channels] if data.channels else None
        index = SiteIndex.from_rxrx(root, data.metadata, channels, on_error=data.on_error)
    elif fmt == "rxrx3_core":
        channels = [int(str(c).lstrip("wW")) for c in data.channels] if data.channels else None
        index = SiteIndex.from_rxrx3_core(root, data.metadata, channels, on_error=data.on_error)
    elif fmt == "jump":
        index = SiteIndex.from_jump(root, data.channels, root=data.images_root, on_error=data.on_error)
    else:
        index = SiteIndex.from_pack(root)
    if len(index) == 0:
        skipped = f" ({index.summary})" if index.summary else ""
        raise ConfigError(f"the dataset at {root!r} ({fmt}) has no sites{skipped}")
    selected = index.select(experiment=data.experiments, plate=data.plates, perturbation=data.perturbations,
                            well=data.wells)
    if len(selected) == 0:
        chosen = {k: v for k, v in (("experiments", data.experiments), ("plates", data.plates),
                                    ("perturbations", data.perturbations), ("wells", data.wells)) if v}
        experiments = sorted({s.experiment for s in index})
        plates = sorted({s.plate for s in index})
        raise ConfigError(f"the selection {chosen} matches no site of {root!r}; it has experiments "
                          f"{experiments[:20]} and plates {plates[:20]}")
    return selected


class ShardStream:
    """Endless batches of one data shard's crop loader, epoch after epoch (with return_info: (batch, CropInfo))."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None

    def next(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:  # the loader moved itself to the next epoch
            self._it = iter(self.loader)
            return next(self._it)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def make_shard_streams(index, cfg: TrainConfig, plan: RunPlan, rank: int, device: torch.device,
                       return_info: bool = False) -> dict[int, ShardStream]:
    from mae_fast.data.loader import make_train_loader

    streams = {}
    for s in plan.local_shards(rank):
        try:
            loader = make_train_loader(
                index, crop_size=plan.model_cfg.img_size, batch_size=cfg.micro_batch,
                crops_per_image=cfg.data.crops_per_image, seed=cfg.seed, rank=s, world_size=plan.shards,
                backend=cfg.data.backend, device=device, num_workers=cfg.data.num_workers,
                shuffle_sites=cfg.data.shuffle_sites, on_error=cfg.data.on_error, return_info=return_info)
        except ValueError as err:
            raise ConfigError(f"data shard {s} of {plan.shards}: {err}") from err
        streams[s] = ShardStream(loader)
    return streams


def plate_key(site) -> tuple[str, str]:
    return (site.experiment, site.plate)


class PlateShardStream:
    """One data shard of an AdaBN run: endless (batch, CropInfo) micro-batches, each from a single plate.

    One crop loader per plate (over that plate's sites, sharded like the plain loader: rank s of S); a
    PlateBatchSampler over the same plates' crops (rank s of S, seeded per epoch) gives the plate of each next
    micro-batch -- plates in proportion to their crops, interleaved in a seeded order. CropInfo.site_index is
    mapped back to positions in the full index (labels are looked up there).

    Only `max_open` plate loaders keep a live iterator (and DataLoader workers); a plate whose iterator was closed
    continues exactly where it stopped (the loader counts yielded batches). Plate loaders default to windows of
    ceil(micro_batch / crops_per_image) sites, so a window is one micro-batch and reopening decodes nothing twice.
    State: sampler epoch and position + every plate loader's state."""

    max_open = 2

    def __init__(self, sampler, loaders: dict, positions: dict):
        self.sampler = sampler
        self.streams = {key: ShardStream(loader) for key, loader in loaders.items()}
        self.positions = positions             # plate key -> (n_plate_sites,) positions in the full index
        self.epoch, self.position = sampler.epoch, 0
        self._order: tuple[int, list] | None = None
        self._open: list = []                  # plate keys with a live iterator, least recently used first

    def plates_of_epoch(self) -> list:
        """The plate key of every micro-batch of the current sampler epoch, in order."""
        if self._order is None or self._order[0] != self.epoch:
            self.sampler.set_epoch(self.epoch)
            self._order = (self.epoch, [self.sampler.plate_of(batch) for batch in self.sampler])
        return self._order[1]

    def _touch(self, key) -> None:
        if key in self._open:
            self._open.remove(key)
        self._open.append(key)
        while len(self._open) > self.max_open:
            stale = self.streams[self._open.pop(0)]
            if stale._it is not None:
                stale._it.close()  # ends its DataLoader workers; the loader state keeps the position
                stale._it = None

    def next(self):
        from mae_fast.data.loader import CropInfo

        order = self.plates_of_epoch()
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self.plates_of_epoch()
        key = order[self.position]
        self.position += 1
        self._touch(key)
        images, info = self.streams[key].next()
        site_index = self.positions[key][info.site_index]
        return images, CropInfo(site_index, info.y, info.x, info.hflip, info.vflip)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.sampler.batch_size,
                "plates": [[key[0], key[1], stream.state_dict()] for key, stream in self.streams.items()]}

    def load_state_dict(self, state: dict) -> None:
        saved = [(e, p) for e, p, _ in state["plates"]]
        if saved != list(self.streams) or state["batch_size"] != self.sampler.batch_size:
            raise ValueError(f"the AdaBN loader state was saved for plates {saved[:5]}{'...' if len(saved) > 5 else ''}"
                             f" (batch {state['batch_size']}), this run has {list(self.streams)[:5]} (batch "
                             f"{self.sampler.batch_size}); an exact resume needs the same data")
        for e, p, loader_state in state["plates"]:
            self.streams[(e, p)].load_state_dict(loader_state)
        self.epoch, self.position, self._order, self._open = int(state["epoch"]), int(state["position"]), None, []


def make_plate_streams(index, cfg: TrainConfig, plan: RunPlan, rank: int, device: torch.device,
                       log=None) -> dict[int, PlateShardStream]:
    """The AdaBN data shards (see PlateShardStream). Plates with fewer than micro_batch crops per data shard and
    epoch cannot give a single-plate micro-batch: they are left out (reported through `log`)."""
    from mae_fast.data.loader import default_crops_per_image, make_train_loader
    from mae_fast.data.samplers import PlateBatchSampler

    crop, B, S = plan.model_cfg.img_size, cfg.micro_batch, plan.shards
    k = cfg.data.crops_per_image or default_crops_per_image(index, crop)
    window = cfg.data.shuffle_sites or math.ceil(B / k)
    members: dict[tuple, list[int]] = {}
    for i, site in enumerate(index):
        members.setdefault(plate_key(site), []).append(i)
    usable = {key: m for key, m in members.items() if (len(m) // S) * k >= B}
    left_out = sorted(set(members) - set(usable))
    if not usable:
        largest = max(len(m) for m in members.values())
        raise ConfigError(
            f"AdaBN training needs single-plate micro-batches of {B} crops, but no plate has that many per data shard "
            f"({len(members)} plate(s), largest {largest} sites x {k} crops per site / {S} shard(s)); lower "
            "micro_batch or raise data.crops_per_image")
    if left_out and log is not None:
        log(f"AdaBN: {len(left_out)} plate(s) have fewer than micro_batch={B} crops per data shard and are not "
            f"trained on (first: {left_out[0][0]}/Plate{left_out[0][1]})")
    sub_index = index.select(where=lambda s: plate_key(s) in usable)
    plate_index = {key: _sites_at(index, m) for key, m in usable.items()}
    streams = {}
    for s in plan.local_shards(rank):
        try:
            sampler = PlateBatchSampler.from_index(sub_index, B, repeat=k, train=True, seed=cfg.seed, rank=s,
                                                   world_size=S)
            loaders = {key: make_train_loader(
                plate_index[key], crop_size=crop, batch_size=B, crops_per_image=k, seed=cfg.seed, rank=s,
                world_size=S, backend=cfg.data.backend, device=device, num_workers=cfg.data.num_workers,
                shuffle_sites=window, on_error=cfg.data.on_error, return_info=True) for key in usable}
        except ValueError as err:
            raise ConfigError(f"data shard {s} of {S} (AdaBN, one plate per micro-batch): {err}") from err
        positions = {key: np.asarray(m, dtype=np.int64) for key, m in usable.items()}
        streams[s] = PlateShardStream(sampler, loaders, positions)
    return streams


def _sites_at(index, positions: list[int]):
    """The sub-index of the sites at sorted `positions` (a plate's sites are usually one run of the sorted index)."""
    if positions[-1] - positions[0] + 1 == len(positions):
        return index[positions[0]:positions[-1] + 1]
    wanted = {index[i].key for i in positions}
    return index.select(where=lambda s: s.key in wanted)


def wsl_labels(index, classes=None):
    """The labelled sites of `index` and their PerturbationLabels (classes: a checkpoint's, on resume)."""
    labelled = index.select(where=lambda s: s.perturbation is not None)
    if len(labelled) == 0:
        raise ConfigError(f"the WSL baseline trains on perturbation labels, but none of the {len(index)} selected "
                          "sites has one (metadata gene / treatment / sirna)")
    try:
        labels = bl.PerturbationLabels.from_index(labelled, classes=classes)
    except ValueError as err:
        raise ConfigError(f"WSL labels: {err}") from err
    if len(labels) < 2:
        raise ConfigError(f"the WSL classifier needs at least 2 perturbation classes; the selected sites have "
                          f"{len(labels)} ({', '.join(labels.classes)})")
    return labelled, labels


def validation_batch(index, cfg: TrainConfig, plan: RunPlan, device: torch.device) -> torch.Tensor:
    """The fixed batch for reconstruction figures: centre crops of the first `val_crops` sites."""
    from mae_fast.data.loader import make_val_loader

    sub = index[: min(len(index), cfg.val_crops)]
    loader = make_val_loader(sub, crop_size=plan.model_cfg.img_size, batch_size=cfg.val_crops, device=device,
                             num_workers=0, backend="torch", on_error="skip")
    return next(iter(loader))


# ------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ------------------------------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    created_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> DistInfo:
    """Rank facts from torchrun's environment (or an existing process group)."""
    if dist.is_available() and dist.is_initialized():
        ws, rank = dist.get_world_size(), dist.get_rank()
    else:
        ws, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    return DistInfo(rank, ws, int(os.environ.get("LOCAL_RANK", str(rank))),
                    int(os.environ.get("LOCAL_WORLD_SIZE", str(ws))))


def init_distributed(info: DistInfo, device: torch.device) -> DistInfo:
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info.created_group = True
    return info


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.active:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def agree(fn, info: DistInfo):
    """Run a preparation step on every rank; if it fails on any rank, raise on all (no rank left waiting)."""
    err = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below on every rank
        err = e
    if info.active:
        errors = all_gather_objects(None if err is None else f"{type(err).__name__}: {err}", info)
        if err is None and any(errors):
            first = next((r, e) for r, e in enumerate(errors) if e)
            raise RuntimeError(f"rank {first[0]} failed: {first[1]}")
    if err is not None:
        raise err
    return result


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------

def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (step, path), oldest first (a checkpoint folder appears by one atomic rename)."""
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = STEP_DIR_RE.match(name)
            path = os.path.join(root, name)
            if m and all(os.path.exists(os.path.join(path, f)) for f in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME)):
                found.append((int(m.group(1)), path))
    return sorted(found)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The global-RNG seed of micro-batch `micro` of step `step` (masking and stochastic depth)."""
    words = np.random.SeedSequence([int(seed), int(step), int(micro), 0x4D414546]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & ((1 << 63) - 1)


def _state_dict_options(cpu_offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_model_state(wrapped: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 weights with plain names (on rank 0 for FSDP; a collective there, so call on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(wrapped, options=_state_dict_options())


def full_optimizer_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimiser state keyed by parameter name (independent of the world size and of DDP/FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer, options=_state_dict_options())


def load_optimizer_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, state, options=_state_dict_options(cpu_offload=False))


def _model_for_saving(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CPU model holding `state` (for saving and figures when the training model is sharded)."""
    model = build_model(cfg)
    load_state_dict_strict(model, state, "gathered weights")
    return model


def write_checkpoint(out_dir: str, step: int, cfg: ModelConfig, model_state: dict, train_state: dict,
                     keep_last: int, extra: dict | None = None) -> str:
    """checkpoints/step_N/ written in a temporary folder, every file fsynced, then renamed into place; older
    checkpoints beyond the last `keep_last` are removed afterwards. `extra`: more keys for config.json (the WSL
    classes)."""
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    final = os.path.join(root, step_dir_name(step))
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{step_dir_name(step)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(_StateHolder(cfg, model_state), tmp, extra={"step": step, **(extra or {})})
    atomic_write(os.path.join(tmp, STATE_NAME), lambda path: torch.save(train_state, path))
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class _StateHolder:
    """What checkpoint.save_model needs from a model: `cfg` and `state_dict()` (no second copy of the weights)."""

    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor]):
        self.cfg, self._state = cfg, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def read_train_state(path: str) -> dict:
    try:
        with open(os.path.join(path, STATE_NAME), "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{os.path.join(path, STATE_NAME)} cannot be read as a weights-only torch file: "
                              f"{err}") from err


def read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(os.path.join(path, WEIGHTS_NAME))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{os.path.join(path, WEIGHTS_NAME)} is not a readable safetensors file: {err}") from err


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """A freshly initialised model of any family (MAE / CA-MAE, WSL, MU-Net)."""
    return MaskedAutoencoder(cfg) if model_family(cfg) == "mae" else bl.create_baseline(cfg)


def _baseline_from_state(cfg, state: dict[str, torch.Tensor], path: str):
    """A baseline of architecture `cfg` holding a bare state dict; a WSL head's class count is read from it."""
    if model_family(cfg) == "wsl" and "head.weight" in state:
        cfg = replace(cfg, num_classes=int(state["head.weight"].shape[0]))
    model = bl.create_baseline(cfg)
    load_state_dict_strict(model, state, path)
    return model


def load_pretrained(path: str, cfg: ModelConfig | None = None) -> tuple[torch.nn.Module, str]:
    """A model from any supported source -> (model, kind), kind one of "ours", "openphenom", "timm":
    our checkpoint folder (or a training run folder: its `model/`; MAE or baseline), an OpenPhenom folder or file,
    or a single state dict file (safetensors or weights-only torch) -- a timm encoder, or our full model's weights
    (MAE or baseline) -- which needs the architecture `cfg` (a preset)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "model", CONFIG_NAME)):
            path = os.path.join(path, "model")
        elif not os.path.exists(os.path.join(path, WEIGHTS_NAME)) and list_checkpoints(path):
            path = list_checkpoints(path)[-1][1]
        model = load_any(path)
        return model, "openphenom" if model.cfg.name == "openphenom" else "ours"
    state = read_state_file(path)
    if any(k.startswith("encoder.vit_backbone.") for k in state):
        from mae_fast.checkpoint import load_openphenom

        return load_openphenom(path), "openphenom"
    if cfg is None:
        raise CheckpointError(f"{path} is a single weights file: give the preset of its architecture (--preset) to "
                              "read it as a timm encoder state dict")
    if model_family(cfg) != "mae":
        return _baseline_from_state(cfg, state, path), "ours"
    if any(k.startswith(("encoder.", "decoder.")) for k in state):  # our full model's names
        model = MaskedAutoencoder(cfg)
        load_state_dict_strict(model, state, path)
        return model, "ours"
    return from_timm_state_dict(state, cfg, path), "timm"


def init_weights_from(path: str, model: torch.nn.Module) -> None:
    """Load pre-trained weights into `model`; the architectures must match (mismatched keys are named). A timm
    encoder fills the encoder only (the decoder keeps its fresh initialisation)."""
    loaded, kind = load_pretrained(path, model.cfg)
    if model_family(loaded.cfg) != model_family(model.cfg):
        raise CheckpointError(f"{path} holds a {model_family(loaded.cfg)} model ({loaded.cfg.name}); this run trains "
                              f"a {model_family(model.cfg)} model ({model.cfg.name})")
    if kind == "timm":
        load_state_dict_strict(model.encoder, loaded.encoder.state_dict(), path)
    else:
        load_state_dict_strict(model, loaded.state_dict(), path)


def read_state_file(path: str) -> dict[str, torch.Tensor]:
    """A tensor state dict from a safetensors file or a weights-only torch file (never an arbitrary pickle)."""
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except Exception:  # noqa: BLE001 - not safetensors: try the weights-only torch format
        pass
    try:
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path} is neither safetensors nor a weights-only torch file: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no tensor state dict")
    return obj


# ------------------------------------------------------------------------------------------------------------
# Output folder
# ------------------------------------------------------------------------------------------------------------

def _config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        name = prefix + key
        if isinstance(a, dict) and isinstance(b, dict) and key != "model":
            out.extend(_config_differences(a, b, name + "."))
        elif a != b and name not in RESUME_MAY_CHANGE:
            out.append(f"{name} (saved {a!r}, now {b!r})")
    return out


def check_output(cfg: TrainConfig) -> int | None:
    """Refuse an existing output folder unless --overwrite or --resume; returns the step to resume from."""
    out = cfg.out_dir
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pick one")
    exists = os.path.isdir(out) and any(os.scandir(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output path {out} exists and is not a folder")
    if cfg.resume:
        checkpoints = list_checkpoints(out)
        if not checkpoints:
            raise ConfigError(f"--resume: no complete checkpoint under {os.path.join(out, CHECKPOINT_DIR)}")
        return checkpoints[-1][0]
    if exists and not cfg.overwrite:
        raise ConfigError(f"output folder {out} exists and is not empty; pass --overwrite to replace its run, "
                          "or --resume to continue it")
    return None


def prepare_output(cfg: TrainConfig) -> None:
    """(rank 0) Remove the previous run's entries when overwriting; create the folder."""
    for stale in glob.glob(os.path.join(cfg.out_dir, CHECKPOINT_DIR, ".tmp-*")):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    if cfg.overwrite:
        for name in RUN_ENTRIES:
            path = os.path.join(cfg.out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(cfg.out_dir, exist_ok=True)


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, indent=1)


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed), rank 0 only. On resume, lines of steps after the checkpoint
    (written by the interrupted run) are dropped so the file reads as one run."""

    def __init__(self, out_dir: str, resume_step: int | None, tensorboard: bool):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by the kill
                    if rec.get("step", 0) <= resume_step and "event" not in rec:
                        kept.append(line if line.endswith("\n") else line + "\n")
            atomic_write(self.path, lambda tmp: open(tmp, "w").writelines(kept))
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard not installed
                self.tb = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------------------
# Throughput and MFU
# ------------------------------------------------------------------------------------------------------------

def training_flops_per_crop(cfg: ModelConfig) -> int | None:
    """Exact training FLOPs per crop of an MAE config; None (MFU shown as n/a) for what `mae_fast.flops` does not
    count: the baselines."""
    if model_family(cfg) != "mae":
        return None
    try:
        from mae_fast import flops
    except ImportError:
        return None
    try:
        return int(flops.training_flops_per_crop(cfg))
    except Exception:  # noqa: BLE001 - a config the counter does not know: MFU shown as n/a
        return None


def matmul_ceiling_tflops(device: torch.device) -> float | None:
    """The device's measured matmul rate (bf16 on GPU, fp32 on CPU), for the MFU display."""
    try:
        from mae_fast.bench import measure_matmul_ceiling

        return float(measure_matmul_ceiling(device)["tflops"])  # the same measurement as `mae-fast bench`
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------------------
# Model wrapping
# ------------------------------------------------------------------------------------------------------------

def _clean_name(name: str) -> str:
    for token in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(token, "")
    return name


def wrap_model(core: torch.nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if not info.active:
        return core
    if model_family(core.cfg) != "mae":  # batch norm running statistics: rank 0's are broadcast at each forward
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(core, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from mae_fast.models import Block, ParallelScalingBlock

        return FSDP(core, auto_wrap_policy=ModuleWrapPolicy({ParallelScalingBlock, Block}),
                    device_id=device, use_orig_params=True)
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # the only buffers are the fixed sin-cos positions, identical on every rank: no syncing at each forward
    params = inspect.signature(DDP.__init__).parameters
    new_api = "forward_sync_buffers" in params
    no_sync_buffers = {"forward_sync_buffers": False} if new_api else {"broadcast_buffers": False}
    return DDP(core, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=core.cfg.fc_norm, **no_sync_buffers)  # fc_norm is used by embed() only


def make_baseline_optimizer(core: torch.nn.Module, plan: RunPlan) -> torch.optim.Optimizer:
    """The baseline's optimiser (SGD Nesterov for WSL, AdamW for MU-Net) at the plan's lr / wd / betas; weight decay
    on conv and linear weights only. Built on the unwrapped model (DDP shares its parameters)."""
    return bl.build_optimizer(core, plan.model_cfg, lr=plan.lr, weight_decay=plan.weight_decay, betas=plan.betas)


def make_optimizer(wrapped: torch.nn.Module, decay_names: set[str], plan: RunPlan, impl: str) -> Lion:
    """Lion with no weight decay on 1-D parameters and tokens (names decided on the unwrapped model: FSDP shows
    flat shards)."""
    decay, no_decay = [], []
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            (decay if _clean_name(name) in decay_names else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": plan.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return Lion(groups, lr=plan.lr, betas=plan.betas, weight_decay=plan.weight_decay, impl=impl)


def decayed_parameter_names(core: MaskedAutoencoder) -> set[str]:
    groups = lion_param_groups(core, 1.0)
    ids = {id(p) for p in groups[0]["params"]}
    return {name for name, p in core.named_parameters() if id(p) in ids}


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out_dir: str
    model_dir: str                       # final weights (checkpoint.load_model, `mae-fast embed --checkpoint`)
    checkpoint_dir: str | None           # the last checkpoint written
    steps: int                           # optimiser steps completed (including those before a resume)
    total_steps: int
    crops: int                           # crops trained on, all ranks, whole run
    losses: list[float]                  # loss of every step of the whole run
    seconds: float                       # wall time of the training loop in this call
    crops_per_second: float              # in this call
    mfu: float | None
    resumed_from: int | None
    stopped_early: bool
    metrics_path: str
    loss_curve_path: str | None
    recon_paths: list[str]
    model: torch.nn.Module | None = field(default=None, repr=False)  # the trained model in eval mode (every rank
                                                                       # under DDP, rank 0 under FSDP)
    classes: tuple[str, ...] | None = None   # WSL: the perturbation classes, in label order


def _log(info: DistInfo, text: str, bar=None) -> None:
    if not info.is_main:
        return
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run as configured; see the module doc. Under torchrun every rank calls this."""
    info = env_world()
    plan = validate(cfg, info.world_size)
    device = resolve_device(cfg.device, info.local_rank)
    check_device_options(cfg, device)
    amp = resolve_amp(cfg.amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = cfg.threads
    if threads == 0 and device.type == "cpu" and info.local_world_size > 1:
        threads = max(1, (os.cpu_count() or 1) // info.local_world_size)
    init_distributed(info, device)
    try:
        with torch_threads(threads):
            return _train(cfg, plan, info, device, amp)
    finally:
        if info.created_group and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to n (> 0) for the block, then restored."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 0:
            torch.set_num_threads(before)


def _prepare(cfg: TrainConfig, plan: RunPlan, info: DistInfo, device: torch.device):
    """Every check that reads the disk: output folder, checkpoint to resume (same settings?) or initialise from,
    data. Nothing is written here."""
    resume_step = check_output(cfg)
    state = None
    if resume_step is not None:
        path = os.path.join(cfg.out_dir, CHECKPOINT_DIR, step_dir_name(resume_step))
        state = read_train_state(path)
        if int(state["step"]) != resume_step:
            raise CheckpointError(f"{path}: train state says step {state['step']}, the folder step {resume_step}")
        diffs = _config_differences(json.loads(state["config"]), cfg.to_dict())
        if diffs:
            raise ConfigError(f"--resume: the configuration differs from the saved run ({path}) in "
                              + "; ".join(diffs) + "; an exact resume needs the same settings")
        missing = [s for s in plan.local_shards(info.rank) if s not in state["loader"]]
        if missing:
            raise CheckpointError(f"{path} has no loader state for data shard(s) {missing}")
    index = build_site_index(cfg.data)
    labels, notes = None, []
    if plan.family == "wsl":  # the classifier's classes: the labelled sites' perturbations (a resumed run's own)
        n_all = len(index)
        index, labels = wsl_labels(index, list(state["classes"]) if state is not None else None)
        plan.model_cfg = replace(plan.model_cfg, num_classes=len(labels))
        if len(index) < n_all:
            notes.append(f"{n_all - len(index)} site(s) without a perturbation label are not trained on")
    if plan.adabn:
        streams = make_plate_streams(index, cfg, plan, info.rank, device, log=notes.append)
    else:
        streams = make_shard_streams(index, cfg, plan, info.rank, device, return_info=labels is not None)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    core = build_model(plan.model_cfg)
    if state is not None:
        load_state_dict_strict(core, read_weights(path), os.path.join(path, WEIGHTS_NAME))
    elif cfg.init_from:
        init_weights_from(cfg.init_from, core)
    return index, streams, core, resume_step, state, labels, notes


def micro_inputs(batch, labels, device: torch.device):
    """A stream's batch -> (images, labels or None); WSL labels come from the sites of the crops (CropInfo)."""
    if not isinstance(batch, tuple):
        return batch, None
    images, info = batch
    return images, (labels.for_crops(info, device) if labels is not None else None)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _optimizer_name(plan: RunPlan) -> str:
    if plan.family == "mae":
        return "Lion"
    return "SGD (Nesterov)" if plan.model_cfg.optimizer == "sgd" else "AdamW"


def _train(cfg: TrainConfig, plan: RunPlan, info: DistInfo, device: torch.device, amp) -> TrainResult:
    from tqdm import tqdm

    index, streams, core, resume_step, state, labels, notes = agree(lambda: _prepare(cfg, plan, info, device), info)
    if info.is_main:
        prepare_output(cfg)
        _write_json(os.path.join(cfg.out_dir, "train_config.json"), cfg.to_dict())
    barrier(info)
    checkpoint_extra = {"classes": list(labels.classes)} if labels is not None else {}

    core.to(device).train()
    n_params = sum(p.numel() for p in core.parameters())
    if plan.family == "mae":
        decay_names = decayed_parameter_names(core)
        wrapped = wrap_model(core, cfg, info, device)
        optimizer = make_optimizer(wrapped, decay_names, plan, cfg.optimizer_impl)
    else:
        wrapped = wrap_model(core, cfg, info, device)
        optimizer = make_baseline_optimizer(core, plan)
    can_reconstruct = hasattr(core, "reconstruct")
    forward = torch.compile(wrapped, backend=cfg.compile_backend) if cfg.compile else wrapped

    start_step, crops_seen, losses = 0, 0, []
    if state is not None:
        load_optimizer_state(wrapped, optimizer, state["optimizer"])
        for s, stream in streams.items():
            stream.load_state_dict(state["loader"][s])
        if len(state["rng"]) == info.world_size:  # per-rank RNG streams (micro-batches reseed anyway)
            _set_rng_state(state["rng"][info.rank])
        start_step, crops_seen = int(state["step"]), int(state["crops"])
        losses = [float(x) for x in state["losses"].tolist()]

    val_images = validation_batch(index, cfg, plan, device) if info.is_main and can_reconstruct else None
    flops_per_crop = training_flops_per_crop(plan.model_cfg)
    ceiling = cfg.peak_tflops or (matmul_ceiling_tflops(device) if (flops_per_crop and info.is_main) else None)
    metrics = MetricsLog(cfg.out_dir, resume_step, cfg.tensorboard) if info.is_main else None
    local_micro = plan.local_micro(info.rank)
    n_local = len(local_micro)

    def mfu_of(rate: float) -> float | None:
        if not flops_per_crop or not ceiling:
            return None
        return rate * flops_per_crop / (ceiling * 1e12 * info.world_size)

    for note in notes:
        _log(info, note)
    _log(info, (f"training {plan.model_cfg.name} ({_count(n_params)} params"
                + (f", {len(labels)} classes" if labels is not None else "")
                + (", one plate per micro-batch" if plan.adabn else "")
                + f") on {len(index)} sites: {plan.total_steps} steps x global batch {cfg.global_batch} "
                f"({info.world_size} rank(s) x {n_local} micro-batch(es) of {cfg.micro_batch}; {plan.shards} data "
                f"shard(s)), {_optimizer_name(plan)} lr {plan.lr:g}, {device.type}"
                f"{' bf16' if amp else ' fp32'}{', ' + cfg.distributed.upper() if info.active else ''} -> {cfg.out_dir}"
                + (f"; resuming after step {start_step}" if resume_step is not None else "")))

    recon_paths: list[str] = []
    last_ckpt = list_checkpoints(cfg.out_dir)[-1][1] if resume_step is not None else None

    def save(step: int) -> str:
        model_state = full_model_state(wrapped)
        optim_state = full_optimizer_state(wrapped, optimizer)
        loader_states = {}
        for part in all_gather_objects({s: st.state_dict() for s, st in streams.items()}, info):
            loader_states.update(part)
        rng_states = all_gather_objects(_rng_state(), info)
        path = None
        if info.is_main:
            train_state = {
                "step": step, "crops": crops_seen, "optimizer": optim_state, "loader": loader_states,
                "rng": rng_states, "losses": torch.tensor(losses, dtype=torch.float64),
                "scheduler": {"step": step, "total_steps": plan.total_steps, "max_lr": plan.lr,
                              "warmup_fraction": cfg.warmup_fraction},
                "world_size": info.world_size, "config": json.dumps(cfg.to_dict()), **checkpoint_extra,
            }
            path = write_checkpoint(cfg.out_dir, step, plan.model_cfg, model_state, train_state, cfg.keep_last,
                                    checkpoint_extra)
        barrier(info)
        return path or os.path.join(cfg.out_dir, CHECKPOINT_DIR, step_dir_name(step))

    def reconstruction(step: int) -> None:
        from mae_fast.plots import plot_reconstruction

        if not can_reconstruct:  # the WSL classifier has nothing to draw
            return
        if cfg.distributed == "fsdp" and info.active:
            weights = full_model_state(wrapped)  # collective
            model = _model_for_saving(plan.model_cfg, weights).to(device) if info.is_main else None
        else:
            model = core
        if info.is_main:
            path = os.path.join(cfg.out_dir, "recon", step_dir_name(step) + ".png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            plot_reconstruction(model, val_images, path, seed=cfg.seed)
            recon_paths.append(path)
        core.train()

    bar = (tqdm(total=plan.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                disable=not cfg.progress) if info.is_main else None)
    step = start_step
    t_start = time.perf_counter()
    window_t, window_crops = t_start, 0
    stopped_early = False
    try:
        while step < plan.total_steps:
            lr = one_cycle_cosine(step, plan.total_steps, plan.lr, cfg.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device, dtype=torch.float32)
            accuracy_sum = torch.zeros((), device=device, dtype=torch.float32)  # WSL: top-1 on the training crops
            for i, j in enumerate(local_micro):
                images, micro_labels = micro_inputs(streams[j % plan.shards].next(), labels, device)
                torch.manual_seed(micro_seed(cfg.seed, step, j))
                sync = contextlib.nullcontext() if (i == n_local - 1 or not info.active) else wrapped.no_sync()
                with sync:
                    with _autocast(device, amp):
                        out = forward(images) if micro_labels is None else forward(images, micro_labels)
                        loss = out.loss
                    (loss / n_local).backward()
                loss_sum += loss.detach().float()
                accuracy = getattr(out, "extras", {}).get("accuracy")
                if accuracy is not None:
                    accuracy_sum += accuracy.detach().float()
            out_of_time = cfg.max_seconds > 0 and time.perf_counter() - t_start > cfg.max_seconds
            stats = torch.stack([loss_sum / n_local, torch.tensor(float(out_of_time), device=device),
                                 accuracy_sum / n_local])
            if info.active:
                dist.all_reduce(stats)
                stats[0] /= info.world_size
                stats[2] /= info.world_size
            step_loss = float(stats[0])
            if not math.isfinite(step_loss):
                where = (f"the last good checkpoint is {last_ckpt} (continue from it with --resume, e.g. with a "
                         "lower lr)" if last_ckpt else "no checkpoint was written before it")
                if metrics is not None:
                    metrics.write({"event": "non_finite_loss", "step": step + 1, "loss": str(step_loss)})
                raise NonFiniteLossError(f"non-finite loss ({step_loss}) at step {step + 1} of {plan.total_steps}; "
                                         f"training stopped; {where}")
            optimizer.step()
            step += 1
            crops_seen += cfg.global_batch
            window_crops += cfg.global_batch
            losses.append(step_loss)
            if info.is_main and (step % cfg.log_every == 0 or step == plan.total_steps):
                now = time.perf_counter()
                rate = window_crops / max(now - window_t, 1e-9)
                window_t, window_crops = now, 0
                mfu = mfu_of(rate)
                record = {"step": step, "loss": step_loss, "lr": lr, "crops": crops_seen,
                          "crops_per_s": rate, "mfu": mfu, "time": time.time()}
                if labels is not None:
                    record["accuracy"] = float(stats[2])
                metrics.write(record)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", crops_s=f"{rate:.1f}",
                                mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%", refresh=False)
            if bar is not None:
                bar.update(1)
            if cfg.recon_every and step % cfg.recon_every == 0 and step < plan.total_steps:
                reconstruction(step)
            if stats[1] > 0:
                stopped_early = step < plan.total_steps
                break
            if step % cfg.checkpoint_every == 0 and step < plan.total_steps:
                last_ckpt = save(step)
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None and sys.exc_info()[0] is not None:
            metrics.close()
    seconds = time.perf_counter() - t_start

    # the end (or the time budget): checkpoint, final weights, figures, summary
    if step > start_step:
        last_ckpt = save(step)
    reconstruction(step)
    trained = crops_seen - (int(state["crops"]) if state is not None else 0)
    rate = trained / seconds if seconds > 0 else 0.0
    model_dir = os.path.join(cfg.out_dir, "model")
    loss_png = None
    if cfg.distributed == "fsdp" and info.active:
        weights = full_model_state(wrapped)
        final_model = _model_for_saving(plan.model_cfg, weights) if info.is_main else None
    else:
        final_model = core
    if info.is_main:
        from mae_fast.plots import LOSS_LABELS, plot_loss

        save_model(final_model, model_dir, extra={"step": step, "crops": crops_seen, **checkpoint_extra})
        loss_png = os.path.join(cfg.out_dir, "loss_curve.png")
        if losses:
            plot_loss(losses, loss_png, ylabel=LOSS_LABELS.get(plan.family, "loss"))
        summary = {"model": plan.model_cfg.name, "family": plan.family, "optimizer": _optimizer_name(plan),
                   "lr": plan.lr, "classes": len(labels) if labels is not None else None,
                   "steps": step, "total_steps": plan.total_steps, "crops": crops_seen, "seconds": seconds,
                   "crops_per_second": rate, "mfu": mfu_of(rate), "final_loss": losses[-1] if losses else None,
                   "resumed_from": resume_step, "stopped_early": stopped_early, "world_size": info.world_size,
                   "device": str(device), "amp": "bf16" if amp else "fp32", "checkpoint": last_ckpt}
        _write_json(os.path.join(cfg.out_dir, "train_summary.json"), summary)
        metrics.write({"event": "stopped_early" if stopped_early else "finished", "step": step,
                       "crops_per_s": rate})
        metrics.close()
        _log(info, f"{'stopped (time budget)' if stopped_early else 'finished'} at step {step}: loss "
                   f"{losses[-1] if losses else float('nan'):.4f}, {rate:.1f} crops/s; final weights in {model_dir}")
    barrier(info)
    return TrainResult(
        out_dir=cfg.out_dir, model_dir=model_dir, checkpoint_dir=last_ckpt, steps=step, total_steps=plan.total_steps,
        crops=crops_seen, losses=losses, seconds=seconds, crops_per_second=rate, mfu=mfu_of(rate),
        resumed_from=resume_step, stopped_early=stopped_early, metrics_path=os.path.join(cfg.out_dir, "metrics.jsonl"),
        loss_curve_path=loss_png, recon_paths=recon_paths,
        model=final_model.eval() if final_model is not None else None,
        classes=labels.classes if labels is not None else None,
    )


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"model preset (default {TrainConfig.preset}); see --list-presets")
    p.add_argument("--config", help="YAML or TOML file of config keys (sections `model:` and `data:`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for sections: --set model.img_size=128 --set data.plates=[1,2]")
    p.add_argument("--data", help="dataset root (data.root)")
    p.add_argument("--out", help="output folder (out_dir)")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--crops", type=int, help="crops to train on (instead of --steps)")
    p.add_argument("--global-batch", type=int, help="crops per optimiser step, all ranks together")
    p.add_argument("--micro-batch", type=int, help="crops per forward pass on one device")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's paper value; WSL: 0.1 per 256 "
                                           "crops, scaled with the global batch)")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--amp", choices=AMP_MODES, help="autocast dtype (default auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--bf16", action="store_true", help="same as --amp bf16 (GPU only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of DDP (under torchrun)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")


def config_from_args(args) -> TrainConfig:
    base = None
    if args.resume and args.out and not args.config and not args.preset:
        saved = os.path.join(args.out, "train_config.json")
        if os.path.exists(saved):
            with open(saved) as f:
                base = json.load(f)
    cfg = build_config(None, args.config, None, base)
    if args.preset:
        cfg.preset = args.preset
    shortcuts = {"data.root": args.data, "out_dir": args.out, "steps": args.steps, "crops": args.crops,
                 "global_batch": args.global_batch, "micro_batch": args.micro_batch, "lr": args.lr,
                 "device": args.device, "amp": "bf16" if args.bf16 else args.amp, "seed": args.seed}
    for key, value in shortcuts.items():
        if value is not None:
            set_key(cfg, key, value)
    if args.crops is not None and args.steps is None:
        cfg.steps = 0
    if args.steps is not None and args.crops is None:
        cfg.crops = 0
    for flag, key in ((args.compile, "compile"), (args.activation_checkpointing, "activation_checkpointing"),
                      (args.resume, "resume"), (args.overwrite, "overwrite")):
        if flag:
            set_key(cfg, key, True)
    if args.fsdp:
        cfg.distributed = "fsdp"
    if args.no_progress:
        cfg.progress = False
    for text in args.overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    return cfg


def run(args) -> int:
    if args.list_presets:
        for name in list_presets():
            c = PRESETS[name]
            print(f"{name:32s} dim {c.embed_dim:4d} depth {c.depth:2d} heads {c.num_heads:2d} patch {c.patch_size:2d} "
                  f"lr {c.lr:g}{' channel-agnostic' if c.channel_agnostic else ''}")
        for name in bl.list_baselines():
            c = bl.BASELINE_PRESETS[name]
            what = ("WSL DenseNet" + (" + AdaBN" if c.adabn else "") if c.family == "wsl"
                    else f"MU-Net widths {'/'.join(map(str, c.widths))}")
            lr = f"lr {c.lr:g}" + (f" per {c.lr_batch} crops" if c.lr_batch else "")
            print(f"{name:32s} {what}, embedding {c.embed_dim}, {c.optimizer} {lr}")
        return 0
    try:
        cfg = config_from_args(args)
        if args.print_config:
            validate(cfg, env_world().world_size)
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        result = train(cfg)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if env_world().is_main:
        print(f"model:       {result.model_dir}")
        print(f"checkpoint:  {result.checkpoint_dir}")
        print(f"metrics:     {result.metrics_path}")
        if result.loss_curve_path:
            print(f"loss curve:  {result.loss_curve_path}")
        if result.recon_paths:
            print(f"recon:       {result.recon_paths[-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae-fast train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
