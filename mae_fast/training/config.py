"""Training configuration: the DataConfig / TrainConfig dataclasses, typed (dotted) keys from YAML/TOML files and
`--set key=value` overrides, and the validation that resolves a config into a RunPlan before any work starts.

One file on purpose: every key of a run -- its type, default, check and the error that names it -- is in one place,
so what `--set` accepts and what validation refuses cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Union

import torch

from mae_fast import device as device_module
from mae_fast.models import MAEConfig, list_models, model_config
from mae_fast.models.munet import MUNetConfig
from mae_fast.models.registry import CONFIG_CLASSES
from mae_fast.models.wsl import WSLConfig
from mae_fast.ops.lion import LION_IMPLS
from mae_fast.training.recipes import OptimizerRecipe, optimizer_recipe

ModelConfig = Union[MAEConfig, WSLConfig, MUNetConfig]


DATA_FORMATS = ("auto", "rxrx", "rxrx3_core", "jump", "pack")
AMP_MODES = ("auto", "bf16", "fp32")
SCHEDULE_CLOCKS = ("steps", "time")  # what the one-cycle schedule's progress follows (TrainConfig.schedule_clock)
DISTRIBUTED_MODES = ("ddp", "fsdp")
FSDP_REDUCE_MODES = ("micro_batch", "step")  # when FSDP2 reduce-scatters the gradients of an accumulated step
CHECKPOINT_FORMATS = ("auto", "full", "sharded")  # auto: sharded under FSDP, full (one file per kind) otherwise
CHECKPOINTING_POLICIES = ("full", "selective")
COMPILE_MODES = ("regional", "model")  # regional: each transformer block compiled (mae_fast.compiling)
CUDA_ONLY_COMPILE_BACKENDS = ("cudagraphs",)


class ConfigError(ValueError):
    """A configuration that cannot run: names the key, the value and what is valid."""


class NonFiniteError(ConfigError):
    """A NaN or infinite value (also spelt as text, e.g. 'nan'), refused whatever else the key's type allows."""


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
    shards: int = 0                      # data shards S (0 = the world size); see mae_fast.training


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
    # the optimiser: None = the preset's recipe (mae_fast.training.recipes; the model config holds no optimiser)
    lr: float | None = None              # peak lr (default: the recipe's; WSL's scaled with global_batch)
    weight_decay: float | None = None    # default: the recipe's (0.05; WSL 1e-4)
    betas: tuple[float, float] | None = None  # Lion / AdamW (not SGD)
    momentum: float | None = None        # SGD (WSL) only; default 0.9
    nesterov: bool | None = None         # SGD (WSL) only; default True
    warmup_fraction: float = 0.1
    # the one-cycle schedule's clock: "steps", or "time": it follows max(step / steps, elapsed / max_seconds), so a
    # run that steps slower than planned still warms up and anneals fully within max_seconds (the demo plans its
    # steps from a short probe and trains on this clock); needs max_seconds, and such a run cannot resume
    schedule_clock: str = "steps"
    optimizer_impl: str = "auto"         # Lion backend: auto, reference, foreach, triton, cpp (MAE only)
    amp: str = "auto"                    # auto (bf16 on GPU and on CPUs with native bf16, else fp32), bf16, fp32
    activation_checkpointing: bool = False
    activation_checkpointing_policy: str = "full"  # full: recompute whole blocks; selective: keep matmul outputs
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str = "regional"       # regional (per block: compile time per block type) or model (whole)
    distributed: str = "ddp"             # ddp or fsdp (torchrun)
    # FSDP with several micro-batches per rank: "micro_batch" reduce-scatters every micro-batch's gradients (they
    # stay sharded: 1/W of the gradient memory, one reduce-scatter per micro-batch); "step" accumulates unsharded
    # gradients and keeps the blocks' parameters gathered until the step's last backward (one reduce-scatter and
    # no re-gather per step: less communication, full-size gradients and parameters on every rank)
    fsdp_reduce: str = "micro_batch"
    checkpoint_format: str = "auto"      # auto, full (rank 0 gathers everything), sharded (torch.distributed.
                                         # checkpoint: each rank writes its shards; default under FSDP)
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
        """Inverse of `to_dict`: a saved config (train_config.json, a checkpoint's), also one of an earlier version
        whose model keys held optimiser settings (`upgrade_saved_config`)."""
        cfg = cls()
        apply_mapping(cfg, upgrade_saved_config(d))
        return cfg


# model.* keys of earlier versions that are training settings now: {old model key: the training key to use}
MOVED_MODEL_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "betas": "betas", "momentum": "momentum",
                    "nesterov": "nesterov", "lr_batch": "lr", "optimizer": None, "schedule": None}


def moved_model_key(key: str) -> ConfigError:
    """The error for `model.KEY` that moved to the training keys: which key to use instead."""
    new = MOVED_MODEL_KEYS[key]
    if key == "lr_batch":
        how = ("give the peak lr with --set lr=... (unset, the recipe's lr is scaled with global_batch where the "
               "recipe scales it: WSL's 0.1 per 256 crops)")
    elif new:
        how = f"use --set {new}=... (a top-level key, not under model)"
    elif key == "optimizer":
        how = "each preset trains with its recipe's optimiser (mae_fast.training.recipes)"
    else:
        how = "the schedule is the trainer's one-cycle cosine (warmup_fraction sets its warm-up)"
    return ConfigError(f"model.{key} is a training setting now: {how}")


def upgrade_saved_config(d: dict) -> dict:
    """A saved TrainConfig dict written when the model config held the optimiser settings (`model.lr`, ...), as
    this version's keys; other dicts are returned as they are.

    A resumed old run must train on with the numbers it started with (and `--resume` compares the saved settings
    with these), so each moved key becomes the training key the old trainer read it as, unless that top-level key
    is set (the old trainer let it win, the model's then had no effect):
        model.weight_decay / betas / momentum / nesterov  -> weight_decay / betas / momentum / nesterov
        model.lr, model.lr_batch  -> lr, the peak lr the old trainer computed: (model.lr or the recipe's lr) *
                                     global_batch / (model.lr_batch or the recipe's) -- no scaling when that is 0
        model.schedule            -> dropped (it was never read: the schedule was always one-cycle cosine)
        model.optimizer           -> dropped when it is the recipe's; any other is refused (the optimiser is
                                     no setting any more, so that run cannot go on)"""
    model = d.get("model") if isinstance(d, dict) else None
    if not isinstance(model, dict) or not set(model) & set(MOVED_MODEL_KEYS):
        return d
    model = dict(model)
    moved = {k: model.pop(k) for k in MOVED_MODEL_KEYS if k in model}
    out = {**d, "model": model}
    preset = d.get("preset", TrainConfig.preset)
    try:
        recipe = optimizer_recipe(preset)
    except KeyError:  # an unknown preset: validation names it
        recipe = None
    if "optimizer" in moved and recipe is not None and moved["optimizer"] != recipe.name:
        raise ConfigError(f"model.optimizer {moved['optimizer']!r} of this saved run is no setting any more: "
                          f"{preset} trains with {recipe.name} (mae_fast.training.recipes); start a new run")
    for key in ("weight_decay", "betas", "momentum", "nesterov"):
        if key in moved and out.get(key) is None:
            out[key] = moved[key]
    if ("lr" in moved or "lr_batch" in moved) and out.get("lr") is None:
        base = moved.get("lr", recipe.lr if recipe else None)
        lr_batch = moved.get("lr_batch", recipe.lr_batch if recipe else 0)
        if base is not None:
            global_batch = out.get("global_batch", TrainConfig.global_batch)
            out["lr"] = base * global_batch / lr_batch if lr_batch else base
    return out


# keys that may differ between a run and its resumption (they do not change the arithmetic of a step)
RESUME_MAY_CHANGE = {
    "out_dir", "overwrite", "resume", "max_seconds", "amp", "activation_checkpointing",
    "activation_checkpointing_policy", "compile", "compile_backend",
    "compile_mode", "distributed", "fsdp_reduce", "checkpoint_format", "device", "threads", "checkpoint_every", "keep_last", "log_every", "recon_every", "peak_tflops",
    "progress", "tensorboard", "optimizer_impl", "data.num_workers", "data.backend", "init_from",
}


def model_config_class(preset: str | None) -> type:
    """The config class of a preset: a baseline's WSLConfig / MUNetConfig, else MAEConfig."""
    if preset and preset in list_models("baseline"):
        return type(model_config(preset))
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
    for cls in (MAEConfig, *CONFIG_CLASSES.values()):
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


def _non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def _coerce(value, hint, key: str):
    """`value` as the type `hint` (int, float, str, bool, list[...], tuple[...], dict, Optional), or a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _non_finite(value):  # NaN slips through every `x <= 0` range check; no key means inf
        raise ConfigError(f"config key {key!r} must be finite, got {value!r}")
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except NonFiniteError:
                raise
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
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text: every spelling float() takes is a float
            try:
                number = float(value.strip())
            except ValueError:
                pass
            else:
                if not math.isfinite(number):
                    raise NonFiniteError(f"config key {key!r} must be finite, got {value!r}")
                return number
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
        if parts[1] in MOVED_MODEL_KEYS:
            raise moved_model_key(parts[1])
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
        try:
            set_key(cfg, str(key), value)
        except ConfigError as err:
            if source == "config":
                raise
            raise ConfigError(f"{source}: {err}") from err


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
    # the optimiser: the preset's recipe with the run's keys, lr the peak lr at this global batch
    lr: float
    weight_decay: float
    betas: tuple[float, float] | None   # None for SGD
    optimizer: str = "lion"             # lion (MAE), sgd, adamw
    momentum: float | None = None       # SGD only
    nesterov: bool = False              # SGD only

    @property
    def recipe(self) -> OptimizerRecipe:
        """The optimiser as this run uses it (its lr already the peak lr: no further scaling)."""
        return OptimizerRecipe(self.optimizer, self.lr, self.weight_decay, betas=self.betas, momentum=self.momentum,
                               nesterov=self.nesterov)

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


OPTIMIZER_NAMES = {"lion": "Lion", "sgd": "SGD", "adamw": "AdamW"}


def resolve_optimizer(cfg: TrainConfig, model_cfg) -> OptimizerRecipe:
    """The run's optimiser: the preset's recipe (mae_fast.training.recipes) with the training keys that are set;
    `lr` unset is the recipe's peak lr at `global_batch` (WSL: scaled linearly). Keys the optimiser does not have
    are refused, and every value is checked, each error naming its key."""
    recipe = optimizer_recipe(model_cfg)
    name = OPTIMIZER_NAMES[recipe.name]
    kind = "the MAE preset" if model_family(model_cfg) == "mae" else "the baseline"
    instead = {"betas": "; set momentum instead", "momentum": "; set betas instead", "nesterov": ""}
    for key in ("betas",) if recipe.name == "sgd" else ("momentum", "nesterov"):
        if getattr(cfg, key) is not None:
            has = "SGD (momentum)" if recipe.name == "sgd" else name
            raise ConfigError(f"config key {key!r} ({getattr(cfg, key)!r}) does not apply to {kind} {cfg.preset}: "
                              f"it trains with {has}, which has no {key}{instead[key]}")
    lr = recipe.peak_lr(cfg.global_batch) if cfg.lr is None else cfg.lr
    wd = recipe.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    betas = recipe.betas if cfg.betas is None else tuple(cfg.betas)
    momentum = recipe.momentum if cfg.momentum is None else cfg.momentum
    nesterov = recipe.nesterov if cfg.nesterov is None else cfg.nesterov
    if not lr > 0:
        raise ConfigError(f"config key 'lr' must be > 0, got {lr:g}")
    if not wd >= 0:
        raise ConfigError(f"config key 'weight_decay' must be >= 0, got {wd:g}")
    if betas is not None and not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"config key 'betas' must be two numbers in [0, 1), got {list(betas)}")
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ConfigError(f"config key 'momentum' must be in [0, 1), got {momentum:g}")
    if nesterov and not momentum:
        raise ConfigError(f"config key 'nesterov' needs a momentum > 0 (momentum is {momentum:g})")
    return replace(recipe, lr=lr, lr_batch=0, weight_decay=wd, betas=betas, momentum=momentum, nesterov=nesterov)


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r} is {value!r}; valid values: {', '.join(map(str, choices))}")


def all_presets() -> list[str]:
    return list_models("mae") + list_models("baseline")


def _foreign_model_keys(cfg: TrainConfig, cls: type) -> None:
    moved = sorted(set(cfg.model) & set(MOVED_MODEL_KEYS))  # set in Python, past set_key's refusal
    if moved:
        raise moved_model_key(moved[0])
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
        model_cfg = model_config(cfg.preset, **overrides)
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"preset {cfg.preset}: {str(err).strip(chr(34))}") from err
    refused = {
        "activation_checkpointing": (cfg.activation_checkpointing, "activation checkpointing is implemented for the "
                                     "MAE's transformer blocks only"),
        "distributed": (cfg.distributed == "fsdp", "FSDP shards the MAE's transformer blocks; train baselines with "
                        "DDP (distributed=ddp)"),
        "optimizer_impl": (cfg.optimizer_impl != "auto", "optimizer_impl picks Lion's kernel; baselines use torch's "
                           + OPTIMIZER_NAMES[optimizer_recipe(model_cfg).name]),
    }
    for key, (bad, why) in refused.items():
        if bad:
            raise ConfigError(f"config key {key!r} ({getattr(cfg, key)!r}) does not apply to the baseline "
                              f"{cfg.preset}: {why}")
    return model_cfg


# (minimum, maximum) of the MAE's numeric fields; None: unbounded on that side. Exclusive lower bounds are written
# as the smallest allowed value where the field is an int.
MAE_FIELD_RANGES = {
    "img_size": (1, 16384), "patch_size": (1, 1024), "in_chans": (1, 256), "embed_dim": (1, 65536),
    "depth": (1, 1024), "num_heads": (1, 1024), "mlp_ratio": (1e-6, 1024.0), "drop_path": (0.0, 0.999),
    "init_values": (0.0, None), "max_in_chans": (1, 256), "decoder_dim": (1, 65536), "decoder_depth": (1, 1024),
    "decoder_heads": (1, 1024), "decoder_cross_heads": (1, 1024), "decoder_norm_eps": (1e-12, 1.0),
    "fourier_alpha": (0.0, 1.0),
}


def check_model_ranges(model_cfg) -> None:
    """Every numeric field of an MAE config within its range (MAE_FIELD_RANGES), and the divisibility the
    architecture needs; the baselines' configs check theirs on construction."""
    if model_family(model_cfg) != "mae":
        return
    for key, (low, high) in MAE_FIELD_RANGES.items():
        value = getattr(model_cfg, key)
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise ConfigError(f"config key 'model.{key}' must be in {span}, got {value:g}")
    for dim, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads"),
                      ("decoder_dim", "decoder_cross_heads")):
        if getattr(model_cfg, dim) % getattr(model_cfg, heads):
            raise ConfigError(f"model.{dim} {getattr(model_cfg, dim)} is not a multiple of model.{heads} "
                              f"{getattr(model_cfg, heads)}")
    if model_cfg.img_size % model_cfg.patch_size:
        raise ConfigError(f"model.img_size {model_cfg.img_size} is not a multiple of the patch size "
                          f"{model_cfg.patch_size}")
    if not 0.0 <= model_cfg.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio must be in [0, 1), got {model_cfg.mask_ratio}")
    if model_cfg.channel_agnostic and model_cfg.in_chans > model_cfg.max_in_chans:
        raise ConfigError(f"model.in_chans {model_cfg.in_chans} is more than model.max_in_chans "
                          f"{model_cfg.max_in_chans} (the CA-MAE's channel positions)")


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    if cfg.preset in list_models("baseline"):
        return resolve_baseline_config(cfg)
    if cfg.preset not in list_models("mae"):
        raise ConfigError(f"unknown preset {cfg.preset!r}; valid presets: {', '.join(all_presets())}")
    _foreign_model_keys(cfg, MAEConfig)
    try:
        model_cfg = model_config(cfg.preset, **cfg.model)
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(str(err).strip('"')) from err
    if cfg.activation_checkpointing and cfg.activation_checkpointing_policy == "full":
        model_cfg = replace(model_cfg, grad_checkpointing=True)
    check_model_ranges(model_cfg)
    from mae_fast.ops.layout import num_visible

    tokens = model_cfg.tokens()
    if num_visible(tokens, model_cfg.mask_ratio) >= tokens:
        raise ConfigError(f"model.mask_ratio {model_cfg.mask_ratio:g} masks none of the {tokens} patches of a crop: "
                          "the MAE learns from its loss on masked patches only, which would be 0; use a ratio in "
                          "(0, 1), e.g. 0.75")
    return model_cfg


MAX_MICRO_BATCHES = 65536  # per optimiser step; more is a typo (and the step's schedule would not fit in memory)
MAX_SEED = 2**63 - 1       # torch.manual_seed takes 64-bit seeds; per-micro-batch seeds are derived from it
# upper bounds of the top-level integer keys (lower bounds: validate): values past these are typos, and would
# otherwise end in a MemoryError or an overflow deep inside a run
UPPER_BOUNDS = {"global_batch": 2**24, "micro_batch": 2**24, "steps": 2**40, "crops": 2**60, "seed": MAX_SEED,
                "checkpoint_every": 2**40, "keep_last": 10**6, "log_every": 2**40, "recon_every": 2**40,
                "val_crops": 4096, "threads": 4096, "data.shards": 65536, "data.crops_per_image": 4096,
                "data.shuffle_sites": 2**24}


def max_workers() -> int:
    """Decode workers a setting may ask for: 4 per core (more only thrash; 10,000 hung the machine)."""
    return 4 * (os.cpu_count() or 1)


def check_upper_bounds(cfg: TrainConfig) -> None:
    for key, high in UPPER_BOUNDS.items():
        value = getattr(cfg.data, key[5:]) if key.startswith("data.") else getattr(cfg, key)
        if value is not None and value > high:
            raise ConfigError(f"config key {key!r} must be <= {high}, got {value}")
    if cfg.seed < 0:
        raise ConfigError(f"config key 'seed' must be in [0, {MAX_SEED}], got {cfg.seed}")
    for key in ("crops_per_image", "shuffle_sites"):
        value = getattr(cfg.data, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key 'data.{key}' must be >= 1 (or unset for the default), got {value}")
    check_num_workers(cfg.data.num_workers, "data.num_workers")


def check_num_workers(value: int | None, key: str) -> None:
    if value is not None and not 0 <= value <= max_workers():
        raise ConfigError(f"config key {key!r} must be in [0, {max_workers()}] (4 per core of this machine), got "
                          f"{value}")


def check_paths(cfg: TrainConfig) -> None:
    """The run folder: a usable name, and neither an input nor a folder holding one (--overwrite would remove the
    run's entries there)."""
    from mae_fast.io import check_output_path, refuse_overwriting_inputs

    check_output_path(cfg.out_dir, "out_dir (--out)")
    refuse_overwriting_inputs(cfg.out_dir, {**data_inputs(cfg.data), "init_from": cfg.init_from}, "out_dir (--out)")


def data_inputs(data: DataConfig) -> dict:
    """The dataset's paths by the name a user gave them (metadata: also the default ROOT/metadata.csv)."""
    metadata = data.metadata
    if metadata is None and data.root and os.path.isfile(os.path.join(data.root, "metadata.csv")):
        metadata = os.path.join(data.root, "metadata.csv")
    return {"data.root (--data)": data.root, "data.metadata (--metadata)": metadata,
            "data.images_root": data.images_root}


def validate(cfg: TrainConfig, world_size: int = 1) -> RunPlan:
    """Check every key and the batch arithmetic; returns the resolved plan or raises ConfigError."""
    model_cfg = resolve_model_config(cfg)
    opt = resolve_optimizer(cfg, model_cfg)
    for key in ("global_batch", "micro_batch", "checkpoint_every", "keep_last", "log_every", "val_crops"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    for key in ("steps", "crops", "recon_every", "threads", "data.shards"):
        value = getattr(cfg.data, key[5:]) if key.startswith("data.") else getattr(cfg, key)
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {value}")
    if cfg.max_seconds < 0 or cfg.peak_tflops < 0:
        raise ConfigError("max_seconds and peak_tflops must be >= 0")
    check_upper_bounds(cfg)
    if (cfg.steps > 0) == (cfg.crops > 0):
        raise ConfigError(f"give exactly one of steps or crops (got steps={cfg.steps}, crops={cfg.crops})")
    if not 0.0 <= cfg.warmup_fraction < 1.0:
        raise ConfigError(f"warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")
    _check_choice("schedule_clock", cfg.schedule_clock, SCHEDULE_CLOCKS)
    if cfg.schedule_clock == "time" and cfg.max_seconds <= 0:
        raise ConfigError("schedule_clock=time needs max_seconds > 0: the schedule follows the time budget")
    if cfg.schedule_clock == "time" and cfg.resume:
        raise ConfigError("a run with schedule_clock=time cannot resume: its learning rate followed the wall "
                          "time of the run that stopped; start a new run, or train on schedule_clock=steps")
    _check_choice("amp", cfg.amp, AMP_MODES)
    _check_choice("distributed", cfg.distributed, DISTRIBUTED_MODES)
    _check_choice("fsdp_reduce", cfg.fsdp_reduce, FSDP_REDUCE_MODES)
    _check_choice("checkpoint_format", cfg.checkpoint_format, CHECKPOINT_FORMATS)
    _check_choice("compile_mode", cfg.compile_mode, COMPILE_MODES)
    _check_choice("activation_checkpointing_policy", cfg.activation_checkpointing_policy, CHECKPOINTING_POLICIES)
    _check_choice("optimizer_impl", cfg.optimizer_impl, LION_IMPLS)
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
    if n_micro > MAX_MICRO_BATCHES:
        raise ConfigError(f"global_batch {cfg.global_batch} / micro_batch {cfg.micro_batch} = {n_micro} micro-batches "
                          f"per step (at most {MAX_MICRO_BATCHES}); raise micro_batch or lower global_batch")
    if cfg.distributed == "fsdp" and world_size == 1 and "WORLD_SIZE" not in os.environ:
        raise ConfigError("distributed=fsdp (--fsdp) shards the model over the processes torchrun starts, and this "
                          "run is one process: launch it with `torchrun --nproc_per_node N -m mae_fast.cli train "
                          "...`, or train without --fsdp")
    check_paths(cfg)
    shards = cfg.data.shards or world_size
    if shards % world_size:
        raise ConfigError(f"data.shards {shards} is not a multiple of the world size {world_size}")
    if n_micro % shards:
        raise ConfigError(
            f"global_batch / micro_batch = {n_micro} micro-batches per step do not split evenly over "
            f"{shards} data shards (world size {world_size}); change global_batch, micro_batch or data.shards")
    total = cfg.steps if cfg.steps > 0 else math.ceil(cfg.crops / cfg.global_batch)
    if getattr(model_cfg, "adabn", False) and model_cfg.virtual_batch_size > cfg.micro_batch:
        raise ConfigError(f"model.virtual_batch_size {model_cfg.virtual_batch_size} is larger than micro_batch "
                          f"{cfg.micro_batch}: ghost batch norm normalises virtual batches within one micro-batch "
                          "(of one plate); lower model.virtual_batch_size or raise micro_batch")
    return RunPlan(model_cfg, total, n_micro, shards, world_size, opt.lr, opt.weight_decay, opt.betas, opt.name,
                   opt.momentum, opt.nesterov)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`mae_fast.device.resolve_device`, its errors naming the config key."""
    try:
        return device_module.resolve_device(name, local_rank)
    except ValueError as err:
        raise ConfigError(f"config key 'device': {err}") from None


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). `auto`: `mae_fast.device.default_amp` -- bf16 on GPUs and on CPUs with native
    bf16 matrix units (AMX / AVX512-BF16), fp32 elsewhere. `bf16` is honoured on any CPU (emulated ones are slow)."""
    if amp == "auto":
        return device_module.default_amp(device)
    return torch.bfloat16 if amp == "bf16" else None


def check_device_options(cfg: TrainConfig, device: torch.device) -> None:
    resolve_amp(cfg.amp, device)
    if cfg.compile and cfg.compile_backend in CUDA_ONLY_COMPILE_BACKENDS and device.type != "cuda":
        raise ConfigError(f"compile_backend {cfg.compile_backend!r} needs a CUDA device; this run is on the CPU")
