"""Checkpoints and the output folder: atomic step folders (weights, config, train state), RNG and optimiser state,
reading weights back (ours, OpenPhenom, timm), and the checks that guard an existing run folder."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch

from mae_fast.models import create_model
from mae_fast.checkpoint import CONFIG_NAME, CheckpointError, WEIGHTS_NAME, load_state_dict_strict, save_model
from mae_fast.io import TMP_PREFIX, atomic_write, atomic_write_json, disk_full_error, is_disk_full, remove_temporaries
from mae_fast.io import LOCK_NAME
from mae_fast.training.config import RESUME_MAY_CHANGE, ConfigError, ModelConfig, TrainConfig

STATE_NAME = "train_state.pt"
CHECKPOINT_DIR = "checkpoints"
SHARDED_DIR = "sharded"    # a sharded checkpoint's torch.distributed.checkpoint folder (every rank's shards)
DCP_METADATA = ".metadata"  # written by DCP's coordinator after every rank's shards
STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")


# files and folders a training run writes in its output folder (the only things --overwrite removes)
RUN_ENTRIES = ("train_config.json", "metrics.jsonl", CHECKPOINT_DIR, "recon", "model", "loss_curve.png",
               "train_summary.json", "tensorboard")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_sharded(path: str) -> bool:
    """A checkpoint folder of the sharded format (weights and optimiser state as DCP shards, no model.safetensors)."""
    return os.path.exists(os.path.join(path, SHARDED_DIR, DCP_METADATA))


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (step, path), oldest first (a checkpoint folder appears by one atomic rename), either
    format: full (model.safetensors) or sharded (DCP shards)."""
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = STEP_DIR_RE.match(name)
            path = os.path.join(root, name)
            if (m and all(os.path.exists(os.path.join(path, f)) for f in (CONFIG_NAME, STATE_NAME))
                    and (os.path.exists(os.path.join(path, WEIGHTS_NAME)) or is_sharded(path))):
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


def non_finite_weights(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """{name: count of NaN/inf values} of the floating-point tensors of `state` that have any."""
    bad = {}
    for name, tensor in state.items():
        if torch.is_floating_point(tensor):
            n = int((~torch.isfinite(tensor)).sum())
            if n:
                bad[name] = n
    return bad


def describe_non_finite(bad: dict[str, int]) -> str:
    names = sorted(bad, key=lambda k: -bad[k])
    return (f"{sum(bad.values())} non-finite values in {len(bad)} tensor(s) (e.g. {', '.join(names[:3])})")


def write_checkpoint(out_dir: str, step: int, cfg: ModelConfig, model_state: dict, train_state: dict,
                     keep_last: int, extra: dict | None = None) -> str:
    """checkpoints/step_N/ written in a temporary folder, every file fsynced, then renamed into place; older
    checkpoints beyond the last `keep_last` are removed afterwards. `extra`: more keys for config.json (the WSL
    classes). Weights with NaN or inf are never published (CheckpointError): every checkpoint is a good one."""
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    final = os.path.join(root, step_dir_name(step))
    if os.path.isdir(final):
        return final
    bad = non_finite_weights(model_state)
    if bad:
        raise CheckpointError(f"the weights of step {step} hold {describe_non_finite(bad)}; checkpoint "
                              f"{final} not written")
    tmp = checkpoint_tmp_dir(out_dir, step, f"-{os.getpid()}")
    with disk_full_named(tmp, step, tensor_bytes(model_state) + tensor_bytes(train_state)):
        save_model(_StateHolder(cfg, model_state), tmp, extra={"step": step, **(extra or {})})
        return publish_checkpoint(out_dir, step, tmp, train_state, keep_last)


@contextlib.contextmanager
def disk_full_named(tmp: str, step: int, needed: int):
    """A write of checkpoint `step` into the temporary folder `tmp`: on any OSError the temporary goes (nothing
    partial is left), and a full disk ends as one line naming the folder, the space needed and the way on."""
    try:
        yield
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise disk_full_error(os.path.dirname(tmp), f"writing the checkpoint of step {step}", needed,
                                  "continue with --resume") from err
        raise


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its checkpoint files."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_tmp_dir(out_dir: str, step: int, suffix: str) -> str:
    """A fresh temporary folder beside the step folders (removed first if a killed run left it)."""
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f"{TMP_PREFIX}{step_dir_name(step)}{suffix}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish_checkpoint(out_dir: str, step: int, tmp: str, train_state: dict, keep_last: int) -> str:
    """(rank 0) Add the train state to the temporary folder `tmp`, rename it to checkpoints/step_N in one atomic
    step and prune the checkpoints beyond the last `keep_last`: a checkpoint is either complete or not there."""
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    final = os.path.join(root, step_dir_name(step))
    atomic_write(os.path.join(tmp, STATE_NAME), lambda path: torch.save(train_state, path))
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(out_dir)[:-keep_last]:
        discard_checkpoint(old)
    return final


def discard_checkpoint(path: str) -> None:
    """Remove a checkpoint folder: first renamed to a temporary name (one atomic step), so that a kill while
    deleting leaves a `.tmp-*` folder that the next start removes, never a half-deleted step folder."""
    doomed = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}discarded-{os.path.basename(path)}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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


def newest_intact_checkpoint(out_dir: str):
    """(step, path, train state, weights, [why each newer checkpoint was passed over]) of the newest checkpoint
    whose train state and weights read back and whose weights are finite; CheckpointError when none does."""
    broken = []
    for step, path in reversed(list_checkpoints(out_dir)):
        try:
            state = read_train_state(path)
            if int(state["step"]) != step:
                raise CheckpointError(f"{path}: train state says step {state['step']}, the folder step {step}")
            if is_sharded(path):  # read after the model is wrapped (DCP reshards to this run's ranks)
                return step, path, state, None, broken
            weights = read_weights(path)
            bad = non_finite_weights(weights)
            if bad:
                raise CheckpointError(f"{path}: {describe_non_finite(bad)}")
            return step, path, state, weights, broken
        except (CheckpointError, KeyError, TypeError, ValueError) as err:
            broken.append(f"{os.path.basename(path)} ({err})")
    raise CheckpointError(f"--resume: no intact checkpoint under {os.path.join(out_dir, CHECKPOINT_DIR)}: "
                          + "; ".join(broken))


def read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(os.path.join(path, WEIGHTS_NAME))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{os.path.join(path, WEIGHTS_NAME)} is not a readable safetensors file: {err}") from err


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """A freshly initialised model of any family (MAE / CA-MAE, WSL, MU-Net)."""
    return create_model(cfg)


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


RUN_CONFIG = "train_config.json"
ONE_SHOT_KEYS = {"overwrite": False, "resume": False}  # what a start asked for once, never part of the run


def run_config_dict(cfg: TrainConfig) -> dict:
    """The configuration stored as OUT/train_config.json: the run's settings without the one-shot flags."""
    return {**cfg.to_dict(), **ONE_SHOT_KEYS}


def read_run_config(out_dir: str) -> dict:
    """OUT/train_config.json (for `--resume --out OUT`), without the one-shot flags an older version stored."""
    path = os.path.join(out_dir, RUN_CONFIG)
    if not os.path.exists(path):
        raise ConfigError(f"--resume: {path} does not exist; {out_dir} holds no training run to continue")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"--resume: {path} is not JSON ({err}); the run's configuration cannot be read") from err
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} does not hold a mapping of config keys")
    return {**saved, **ONE_SHOT_KEYS}


def check_output(cfg: TrainConfig) -> int | None:
    """Refuse an existing output folder unless --overwrite or --resume; returns the step to resume from."""
    out = cfg.out_dir
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pick one")
    exists = os.path.isdir(out) and any(e.name != LOCK_NAME for e in os.scandir(out))
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


def remove_leftovers(out_dir: str, resume_step: int | None) -> list[str]:
    """(rank 0, holding the run folder's lock) What killed runs left: temporaries of atomic writes, step folders
    without all their files (a kill while pruning by an older version), and, when resuming, the checkpoints after
    the one resumed from (unreadable ones it fell back past; the run writes those steps again)."""
    removed = []
    for folder in ("", CHECKPOINT_DIR, "model", "recon"):
        removed += remove_temporaries(os.path.join(out_dir, folder))
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    complete = dict(list_checkpoints(out_dir))
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            m = STEP_DIR_RE.match(name)
            if m and (int(m.group(1)) not in complete or (resume_step is not None and int(m.group(1)) > resume_step)):
                discard_checkpoint(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


def prepare_output(cfg: TrainConfig, resume_step: int | None = None) -> list[str]:
    """(rank 0) Remove what killed runs left (see remove_leftovers) and, when overwriting, the previous run's
    entries; create the folder. Returns the leftovers removed."""
    removed = remove_leftovers(cfg.out_dir, resume_step)
    if cfg.overwrite:
        for name in RUN_ENTRIES:
            path = os.path.join(cfg.out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(cfg.out_dir, exist_ok=True)
    return removed


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, indent=1)
