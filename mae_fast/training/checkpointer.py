"""The run's checkpoint manager: writes checkpoints in the run's format, restores one after the model is wrapped,
and hands out the full model (for figures and the final weights).

Two formats (TrainConfig.checkpoint_format; docs in mae_fast.training):
    full     rank 0 gathers the whole model and optimiser state (keyed by parameter name) and writes
             model.safetensors + config.json + train_state.pt -- the default without FSDP
    sharded  torch.distributed.checkpoint (DCP): every rank writes its own shards of the weights and optimiser state
             into sharded/, rank 0 adds config.json + train_state.pt (loader positions, RNG, losses) -- the default
             under FSDP, where a full gather on one rank at every checkpoint does not fit the largest models. DCP
             reshards on load, so a run resumes on another world size (2 ranks -> 1, 1 -> 2), and
             `mae-fast export` (or `export_checkpoint`) turns one into the single-file model `embed` reads.
Both are published by one atomic rename of a temporary folder (`publish_checkpoint`): a checkpoint is complete or
absent. The sharded format needs every rank to see the run folder (one machine, or a shared file system).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule

from mae_fast.checkpoint import (
    CONFIG_NAME, CheckpointError, load_model, load_state_dict_strict, read_config, save_config, save_model,
    split_config,
)
from mae_fast.training.checkpointing import (
    CHECKPOINT_DIR, SHARDED_DIR, _model_for_saving, _rng_state, build_model, checkpoint_tmp_dir, describe_non_finite,
    disk_full_named, full_model_state, full_optimizer_state, is_sharded, load_optimizer_state, non_finite_weights,
    publish_checkpoint, run_config_dict, step_dir_name, tensor_bytes, write_checkpoint,
)
from mae_fast.training.config import RunPlan, TrainConfig
from mae_fast.training.distributed import DistInfo, all_gather_objects, barrier


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _local_non_finite(state: dict) -> dict[str, int]:
    """Non-finite counts of this rank's part of a (possibly sharded) state dict."""
    local = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    return non_finite_weights(local)


def load_sharded_weights(path: str, model: torch.nn.Module) -> None:
    """Fill `model` (plain, unsharded, in this process) with the weights of the sharded checkpoint `path`."""
    state = model.state_dict()
    try:
        dcp.load({"model": state}, checkpoint_id=os.path.join(path, SHARDED_DIR), no_dist=_no_dist())
    except Exception as err:  # noqa: BLE001 - a missing or truncated shard
        raise CheckpointError(f"{os.path.join(path, SHARDED_DIR)}: the sharded weights cannot be read: {err}") from err
    load_state_dict_strict(model, state, path)


def read_sharded_model(path: str) -> torch.nn.Module:
    """The model of a sharded checkpoint folder, whole, in this process (weights checked finite)."""
    model = build_model(read_config(path))
    load_sharded_weights(path, model)
    bad = non_finite_weights(model.state_dict())
    if bad:
        raise CheckpointError(f"{path}: {describe_non_finite(bad)}")
    return model


def export_checkpoint(path: str, out_dir: str) -> str:
    """A checkpoint folder (either format) -> OUT/model.safetensors + config.json, the single-file model that
    `mae-fast embed` and `checkpoint.load_model` read. Runs in one process; returns out_dir."""
    model = read_sharded_model(path) if is_sharded(path) else load_model(path)
    with open(os.path.join(path, CONFIG_NAME)) as f:
        extra = split_config(json.load(f))[1]  # the checkpoint's metadata (step, WSL classes)
    save_model(model, out_dir, extra=extra)
    return out_dir


class Checkpointer:
    """Checkpoints of one run on this rank (a collective: every rank calls save / restore / full_model)."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan, info: DistInfo, core: torch.nn.Module,
                 wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, streams: dict, extra: dict):
        self.cfg, self.plan, self.info = cfg, plan, info
        self.core, self.wrapped, self.optimizer, self.streams, self.extra = core, wrapped, optimizer, streams, extra
        fmt = cfg.checkpoint_format
        self.sharded = fmt == "sharded" or (fmt == "auto" and isinstance(wrapped, FSDPModule) and info.active)

    # -- the model, whole ------------------------------------------------------------------------------------------
    def full_model(self) -> torch.nn.Module | None:
        """The trained model with full weights: the model itself unless FSDP shards it, else gathered onto rank 0 (a
        collective; None on the other ranks)."""
        if not (isinstance(self.wrapped, FSDPModule) and self.info.active):
            return self.core
        weights = full_model_state(self.wrapped)
        return _model_for_saving(self.plan.model_cfg, weights) if self.info.is_main else None

    # -- writing -----------------------------------------------------------------------------------------------------
    def _train_state(self, step: int, crops: int, losses: list[float]) -> dict:
        loader_states = {}
        for part in all_gather_objects({s: st.state_dict() for s, st in self.streams.items()}, self.info):
            loader_states.update(part)
        return {
            "step": step, "crops": crops, "loader": loader_states,
            "rng": all_gather_objects(_rng_state(), self.info),
            "losses": torch.tensor(losses, dtype=torch.float64),
            "scheduler": {"step": step, "total_steps": self.plan.total_steps, "max_lr": self.plan.lr,
                          "warmup_fraction": self.cfg.warmup_fraction},
            "world_size": self.info.world_size, "config": json.dumps(run_config_dict(self.cfg)),
            "format": "sharded" if self.sharded else "full", **self.extra,
        }

    def save(self, step: int, crops: int, losses: list[float]) -> tuple[str, dict[str, int]]:
        """Write checkpoint `step`; returns (its path, {tensor: non-finite count}). Nothing is published when the
        weights hold NaN/inf (the caller stops the run): every published checkpoint is a good one."""
        return self._save_sharded(step, crops, losses) if self.sharded else self._save_full(step, crops, losses)

    def _save_full(self, step: int, crops: int, losses: list[float]):
        model_state = full_model_state(self.wrapped)
        optim_state = full_optimizer_state(self.wrapped, self.optimizer)
        train_state = self._train_state(step, crops, losses)
        bad = all_gather_objects(non_finite_weights(model_state) if self.info.is_main else {}, self.info)[0]
        path = os.path.join(self.cfg.out_dir, CHECKPOINT_DIR, step_dir_name(step))
        if not bad and self.info.is_main:
            train_state["optimizer"] = optim_state
            path = write_checkpoint(self.cfg.out_dir, step, self.plan.model_cfg, model_state, train_state,
                                    self.cfg.keep_last, self.extra)
        barrier(self.info)
        return path, bad

    def _save_sharded(self, step: int, crops: int, losses: list[float]):
        model_state, optim_state = get_state_dict(self.wrapped, self.optimizer)
        bad: dict[str, int] = {}
        for part in all_gather_objects(_local_non_finite(model_state), self.info):
            for k, n in part.items():
                bad[k] = bad.get(k, 0) + n
        train_state = self._train_state(step, crops, losses)
        path = os.path.join(self.cfg.out_dir, CHECKPOINT_DIR, step_dir_name(step))
        if bad:
            return path, bad
        # one temporary folder for every rank, made fresh by rank 0 (a killed run's copy removed first)
        tmp = all_gather_objects(checkpoint_tmp_dir(self.cfg.out_dir, step, "-sharded") if self.info.is_main
                                 else None, self.info)[0]
        with disk_full_named(tmp, step, tensor_bytes([model_state, optim_state])):  # DTensors count whole
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(tmp, SHARDED_DIR),
                     no_dist=_no_dist())
            if self.info.is_main:  # DCP's coordinator wrote .metadata after every rank's shards
                save_config(self.plan.model_cfg, tmp, {"step": step, **self.extra})
                path = publish_checkpoint(self.cfg.out_dir, step, tmp, train_state, self.cfg.keep_last)
        barrier(self.info)
        return path, bad

    # -- reading -----------------------------------------------------------------------------------------------------
    def restore(self, path: str, state: dict) -> None:
        """Load the optimiser state (and, for a sharded checkpoint, the weights) of checkpoint `path` into the wrapped
        model; a full checkpoint's weights were loaded into the model before wrapping."""
        if is_sharded(path):
            model_state, optim_state = get_state_dict(self.wrapped, self.optimizer)
            try:
                dcp.load({"model": model_state, "optim": optim_state},
                         checkpoint_id=os.path.join(path, SHARDED_DIR), no_dist=_no_dist())
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"{os.path.join(path, SHARDED_DIR)} cannot be read: {err}") from err
            set_state_dict(self.wrapped, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        else:
            load_optimizer_state(self.wrapped, self.optimizer, state["optimizer"])
