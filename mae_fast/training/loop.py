"""The training loop: `train(cfg)` prepares data, model and optimiser on every rank, then runs the optimiser steps
(`step.TrainStep`), reports them (`metrics.StepReporter`) and writes checkpoints (`checkpointer.Checkpointer`), and
returns a TrainResult. See `mae_fast.training` for the whole story.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from mae_fast.checkpoint import WEIGHTS_NAME, CheckpointError, load_state_dict_strict, save_model
from mae_fast.compiling import compile_blocks, selective_checkpointing
from mae_fast.device import amp_label
from mae_fast.io import OutputLock, folder_lock_path
from mae_fast.models import MaskedAutoencoder
from mae_fast.optim import Lion, lion_param_groups
from mae_fast.training.checkpointer import Checkpointer
from mae_fast.training.checkpointing import (
    CHECKPOINT_DIR, RUN_CONFIG, _config_differences, _write_json, build_model, check_output, describe_non_finite,
    newest_intact_checkpoint, prepare_output, run_config_dict, step_dir_name, _set_rng_state,
)
from mae_fast.training.config import (
    OPTIMIZER_NAMES, ConfigError, RunPlan, TrainConfig, check_device_options, resolve_amp, resolve_device,
    upgrade_saved_config, validate,
)
from mae_fast.training.data import (
    build_site_index, make_plate_streams, make_shard_streams, validation_batch, wsl_labels,
)
from mae_fast.training.distributed import (
    DistInfo, _clean_name, agree, barrier, env_world, init_distributed, torch_threads, wrap_model,
)
from mae_fast.training.metrics import StepReporter
from mae_fast.training.recipes import build_optimizer
from mae_fast.training.pretrained import init_weights_from
from mae_fast.training.step import NonFiniteLossError, TrainStep


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


def make_baseline_optimizer(core: torch.nn.Module, plan: RunPlan) -> torch.optim.Optimizer:
    """The baseline's optimiser (SGD Nesterov for WSL, AdamW for MU-Net) as the plan resolved it (its recipe with the
    run's keys); weight decay on conv and linear weights only. Built on the unwrapped model (DDP shares its
    parameters)."""
    return build_optimizer(core, plan.recipe)


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


def _last_good(checkpoint: str | None) -> str:
    """Where a diverged run can go on from (every published checkpoint has finite weights; see write_checkpoint).
    A resume needs the same settings; a lower lr is a new run started from the checkpoint's weights."""
    if not checkpoint:
        return "no checkpoint was written before it"
    return (f"the last good checkpoint is {checkpoint} (its weights are finite); continue from it with --resume, "
            f"or start a new run from its weights with a lower lr: --set init_from={checkpoint} --lr LOWER")


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run as configured; see mae_fast.training. Under torchrun every rank calls this."""
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
    lock = None
    try:  # one writer per run folder: rank 0 holds the lock from before any check until the end
        lock = agree(lambda: OutputLock(folder_lock_path(cfg.out_dir), f"run folder {cfg.out_dir}")
                     if info.is_main else None, info)
        with torch_threads(threads):
            return _train(cfg, plan, info, device, amp)
    finally:
        if lock is not None:
            lock.release()
        if info.created_group and dist.is_initialized():
            dist.destroy_process_group()


def _prepare(cfg: TrainConfig, plan: RunPlan, info: DistInfo, device: torch.device):
    """Every check that reads the disk: output folder, checkpoint to resume (same settings?) or initialise from,
    data. Nothing is written here."""
    resume_step = check_output(cfg)
    state, weights, path, notes = None, None, None, []
    if resume_step is not None:
        resume_step, path, state, weights, broken = newest_intact_checkpoint(cfg.out_dir)
        if broken:
            notes.append(f"resuming from {path}, the newest intact checkpoint; left out (and removed): "
                         + "; ".join(broken))
        # a run saved before the optimiser left the model config: its model.lr, ... read as this version's keys
        diffs = _config_differences(upgrade_saved_config(json.loads(state["config"])), cfg.to_dict())
        if diffs:
            raise ConfigError(f"--resume: the configuration differs from the saved run ({path}) in "
                              + "; ".join(diffs) + "; an exact resume needs the same settings")
        missing = [s for s in plan.local_shards(info.rank) if s not in state["loader"]]
        if missing:
            raise CheckpointError(f"{path} has no loader state for data shard(s) {missing}")
    index = build_site_index(cfg.data)
    labels = None
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
    # before anything is written: a dataset that yields no crop at all fails here
    val_images = validation_batch(index, cfg, plan, device) if info.is_main and plan.family != "wsl" else None
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    core = build_model(plan.model_cfg)
    if weights is not None:  # a full checkpoint: weights before wrapping (a sharded one loads after)
        load_state_dict_strict(core, weights, os.path.join(path, WEIGHTS_NAME))
    elif state is None and cfg.init_from:
        init_weights_from(cfg.init_from, core)
    return index, streams, core, resume_step, path, state, labels, notes, val_images


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _optimizer_name(plan: RunPlan) -> str:
    return "SGD (Nesterov)" if plan.optimizer == "sgd" and plan.nesterov else OPTIMIZER_NAMES[plan.optimizer]


def _build(cfg: TrainConfig, plan: RunPlan, info: DistInfo, device: torch.device, core: torch.nn.Module):
    """The model as it trains (selective checkpointing, DDP / FSDP2, compilation) and its optimiser ->
    (wrapped model, forward, optimizer)."""
    core.to(device).train()
    if cfg.activation_checkpointing and cfg.activation_checkpointing_policy == "selective" and plan.family == "mae":
        selective_checkpointing(core)  # before sharding and compiling: they wrap what the block runs
    if plan.family == "mae":
        decay_names = decayed_parameter_names(core)
        wrapped = wrap_model(core, cfg, info, device)
        optimizer = make_optimizer(wrapped, decay_names, plan, cfg.optimizer_impl)
    else:
        wrapped = wrap_model(core, cfg, info, device)
        optimizer = make_baseline_optimizer(core, plan)
    forward = wrapped
    if cfg.compile and cfg.compile_mode == "regional" and plan.family == "mae":
        compile_blocks(core, cfg.compile_backend)  # after sharding: each FSDP2 block compiled as it runs
    elif cfg.compile:
        forward = torch.compile(wrapped, backend=cfg.compile_backend)
    return wrapped, forward, optimizer


def _reconstruction(checkpointer: Checkpointer, info: DistInfo, cfg: TrainConfig, val_images, step: int,
                    device: torch.device, recon_paths: list[str]) -> None:
    """A reconstruction figure of the fixed validation batch (collective under FSDP: the weights are gathered)."""
    from mae_fast.plots import plot_reconstruction

    if not hasattr(checkpointer.core, "reconstruct"):  # the WSL classifier has nothing to draw
        return
    model = checkpointer.full_model()
    if info.is_main:
        path = os.path.join(cfg.out_dir, "recon", step_dir_name(step) + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plot_reconstruction(model.to(device), val_images, path, seed=cfg.seed)
        recon_paths.append(path)
    checkpointer.core.train()


def _train(cfg: TrainConfig, plan: RunPlan, info: DistInfo, device: torch.device, amp) -> TrainResult:
    index, streams, core, resume_step, resume_path, state, labels, notes, val_images = agree(
        lambda: _prepare(cfg, plan, info, device), info)
    if info.is_main:
        removed = prepare_output(cfg, resume_step)
        if removed:
            notes.append(f"removed {len(removed)} leftover(s) of an interrupted run: "
                         + ", ".join(os.path.relpath(p, cfg.out_dir) for p in removed[:6])
                         + (", ..." if len(removed) > 6 else ""))
        _write_json(os.path.join(cfg.out_dir, RUN_CONFIG), run_config_dict(cfg))
    barrier(info)
    extra = {"classes": list(labels.classes)} if labels is not None else {}
    n_params = sum(p.numel() for p in core.parameters())
    wrapped, forward, optimizer = _build(cfg, plan, info, device, core)
    checkpointer = Checkpointer(cfg, plan, info, core, wrapped, optimizer, streams, extra)

    start_step, crops_seen, losses = 0, 0, []
    if state is not None:
        checkpointer.restore(resume_path, state)
        for s, stream in streams.items():
            stream.load_state_dict(state["loader"][s])
        if len(state["rng"]) == info.world_size:  # per-rank RNG streams (micro-batches reseed anyway)
            _set_rng_state(state["rng"][info.rank])
        start_step, crops_seen = int(state["step"]), int(state["crops"])
        losses = [float(x) for x in state["losses"].tolist()]

    report = StepReporter(cfg, plan.model_cfg, info.world_size, info.is_main, device, resume_step, start_step,
                          plan.total_steps, labels is not None, amp)
    train_step = TrainStep(forward, wrapped, optimizer, streams, labels, cfg, plan, info, device, amp)
    for note in notes:
        report.line(note)
    report.line(f"training {plan.model_cfg.name} ({_count(n_params)} params"
                + (f", {len(labels)} classes" if labels is not None else "")
                + (", one plate per micro-batch" if plan.adabn else "")
                + f") on {len(index)} sites: {plan.total_steps} steps x global batch {cfg.global_batch} "
                f"({info.world_size} rank(s) x {len(train_step.local_micro)} micro-batch(es) of {cfg.micro_batch}; "
                f"{plan.shards} data shard(s)), {_optimizer_name(plan)} lr {plan.lr:g}, {device.type}"
                f" {amp_label(amp, cfg.amp, device)}{', ' + cfg.distributed.upper() if info.active else ''}"
                f"{', sharded checkpoints' if checkpointer.sharded else ''} -> {cfg.out_dir}"
                + (f"; resuming after step {start_step}" if resume_step is not None else ""))

    recon_paths: list[str] = []
    last_ckpt = (os.path.join(cfg.out_dir, CHECKPOINT_DIR, step_dir_name(resume_step))
                 if resume_step is not None else None)

    def save(step: int) -> str:
        path, bad = checkpointer.save(step, crops_seen, losses)
        if bad:  # never publish (or call good) weights that are NaN or infinite
            report.event({"event": "non_finite_weights", "step": step})
            raise NonFiniteLossError(f"the weights became non-finite by step {step} of {plan.total_steps} "
                                     f"({describe_non_finite(bad)}); training stopped; {_last_good(last_ckpt)}")
        return path

    step = start_step
    t_start = time.perf_counter()
    stopped_early = False

    def elapsed() -> float:
        return time.perf_counter() - t_start

    try:
        while step < plan.total_steps:
            try:
                stats = train_step(step, elapsed, _last_good(last_ckpt))
            except NonFiniteLossError as err:
                report.event(err.event)
                raise
            step += 1
            crops_seen += cfg.global_batch
            losses.append(stats.loss)
            report.step(step, plan.total_steps, stats, crops_seen)
            if cfg.recon_every and step % cfg.recon_every == 0 and step < plan.total_steps:
                _reconstruction(checkpointer, info, cfg, val_images, step, device, recon_paths)
            if stats.out_of_time:  # on the "time" clock the schedule has annealed: the run's planned end
                stopped_early = step < plan.total_steps and cfg.schedule_clock != "time"
                break
            if step % cfg.checkpoint_every == 0 and step < plan.total_steps:
                last_ckpt = save(step)
    except BaseException:
        report.close()
        raise
    report.close_bar()
    seconds = time.perf_counter() - t_start

    # the end (or the time budget): checkpoint, final weights, figures, summary
    if step > start_step:
        last_ckpt = save(step)
    _reconstruction(checkpointer, info, cfg, val_images, step, device, recon_paths)
    trained = crops_seen - (int(state["crops"]) if state is not None else 0)
    rate = trained / seconds if seconds > 0 else 0.0
    model_dir = os.path.join(cfg.out_dir, "model")
    final_model = checkpointer.full_model()  # collective under FSDP: the one full gather of the run
    loss_png = None
    if info.is_main:
        from mae_fast.plots import LOSS_LABELS, plot_loss

        save_model(final_model, model_dir, extra={"step": step, "crops": crops_seen, **extra})
        loss_png = os.path.join(cfg.out_dir, "loss_curve.png")
        if losses:
            plot_loss(losses, loss_png, ylabel=LOSS_LABELS.get(plan.family, "loss"))
        summary = {"model": plan.model_cfg.name, "family": plan.family, "optimizer": _optimizer_name(plan),
                   "lr": plan.lr, "classes": len(labels) if labels is not None else None,
                   "steps": step, "total_steps": plan.total_steps, "schedule_clock": cfg.schedule_clock,
                   "crops": crops_seen, "seconds": seconds,
                   "crops_per_second": rate, "mfu": report.mfu(rate), "final_loss": losses[-1] if losses else None,
                   "resumed_from": resume_step, "stopped_early": stopped_early, "world_size": info.world_size,
                   "device": str(device), "amp": "bf16" if amp else "fp32", "checkpoint": last_ckpt}
        _write_json(os.path.join(cfg.out_dir, "train_summary.json"), summary)
        report.event({"event": "stopped_early" if stopped_early else "finished", "step": step, "crops_per_s": rate})
        on_clock = (f" (the schedule followed the clock: annealed in the {cfg.max_seconds:.0f} s budget, "
                    f"{plan.total_steps} steps planned)" if cfg.schedule_clock == "time" else "")
        report.line(f"{'stopped (time budget)' if stopped_early else 'finished'} at step {step}{on_clock}: loss "
                    f"{losses[-1] if losses else float('nan'):.4f}, {rate:.1f} crops/s; final weights in {model_dir}")
    report.close()
    barrier(info)
    return TrainResult(
        out_dir=cfg.out_dir, model_dir=model_dir, checkpoint_dir=last_ckpt, steps=step, total_steps=plan.total_steps,
        crops=crops_seen, losses=losses, seconds=seconds, crops_per_second=rate, mfu=report.mfu(rate),
        resumed_from=resume_step, stopped_early=stopped_early, metrics_path=os.path.join(cfg.out_dir, "metrics.jsonl"),
        loss_curve_path=loss_png, recon_paths=recon_paths,
        model=final_model.eval() if final_model is not None else None,
        classes=labels.classes if labels is not None else None,
    )
