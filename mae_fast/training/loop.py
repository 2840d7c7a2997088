"""The training loop: `train(cfg)` prepares data, model and optimiser on every rank, runs the optimiser steps
(gradient accumulation over micro-batches, each seeded from (seed, step, micro-batch)), logs metrics, writes
checkpoints and figures, and returns a TrainResult. See `mae_fast.training` for the whole story.

One file on purpose: `train()` and the steps it runs (setup, micro-batches, the optimiser step, logging,
checkpoints, figures) read in the order a run executes them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist

from mae_fast.checkpoint import WEIGHTS_NAME, CheckpointError, load_state_dict_strict, save_model
from mae_fast.compiling import compile_blocks, selective_checkpointing
from mae_fast.device import amp_label
from mae_fast.io import OutputLock, atomic_write, folder_lock_path
from mae_fast.models import MaskedAutoencoder
from mae_fast.models.baseline_common import build_optimizer
from mae_fast.optim import Lion, lion_param_groups, one_cycle_cosine
from mae_fast.perf import flops
from mae_fast.perf.timing import measure_matmul_ceiling
from mae_fast.training.checkpointing import (
    CHECKPOINT_DIR, RUN_CONFIG, _config_differences, _model_for_saving, _rng_state, _set_rng_state, _write_json,
    build_model, check_output, describe_non_finite, full_model_state, full_optimizer_state, init_weights_from,
    load_optimizer_state, newest_intact_checkpoint, non_finite_weights, prepare_output,
    run_config_dict, step_dir_name, write_checkpoint,
)
from mae_fast.training.config import (
    ConfigError, ModelConfig, RunPlan, TrainConfig, check_device_options, model_family, resolve_amp, resolve_device,
    validate,
)
from mae_fast.training.data import (
    build_site_index, make_plate_streams, make_shard_streams, validation_batch, wsl_labels,
)
from mae_fast.training.distributed import (
    DistInfo, _clean_name, agree, all_gather_objects, barrier, env_world, init_distributed, torch_threads, wrap_model,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: names the step and the last good checkpoint."""


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
        # strict JSON: a non-finite number (which json.dumps would write as a bare NaN) is written as text
        record = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def training_flops_per_crop(cfg: ModelConfig) -> int | None:
    """Exact training FLOPs per crop of an MAE config; None (MFU shown as n/a) for what `mae_fast.perf.flops` does not
    count: the baselines."""
    if model_family(cfg) != "mae":
        return None
    try:
        return int(flops.training_flops_per_crop(cfg))
    except Exception:  # noqa: BLE001 - a config the counter does not know: MFU shown as n/a
        return None


def matmul_ceiling_tflops(device: torch.device, amp: torch.dtype | None = None) -> float | None:
    """The device's measured matmul rate in the run's dtype (`amp`, None: fp32), for the MFU display."""
    try:
        # the same measurement as `mae-fast bench`
        return float(measure_matmul_ceiling(device, dtype=amp or torch.float32)["tflops"])
    except Exception:  # noqa: BLE001
        return None


def make_baseline_optimizer(core: torch.nn.Module, plan: RunPlan) -> torch.optim.Optimizer:
    """The baseline's optimiser (SGD Nesterov for WSL, AdamW for MU-Net) at the plan's lr / wd / betas; weight decay
    on conv and linear weights only. Built on the unwrapped model (DDP shares its parameters)."""
    return build_optimizer(core, plan.model_cfg, lr=plan.lr, weight_decay=plan.weight_decay, betas=plan.betas)


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


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The global-RNG seed of micro-batch `micro` of step `step` (masking and stochastic depth)."""
    words = np.random.SeedSequence([int(seed), int(step), int(micro), 0x4D414546]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & ((1 << 63) - 1)


def _log(info: DistInfo, text: str, bar=None) -> None:
    if not info.is_main:
        return
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def _last_good(checkpoint: str | None) -> str:
    """Where a diverged run can go on from (every published checkpoint has finite weights; see write_checkpoint).
    A resume needs the same settings; a lower lr is a new run started from the checkpoint's weights."""
    if not checkpoint:
        return "no checkpoint was written before it"
    return (f"the last good checkpoint is {checkpoint} (its weights are finite); continue from it with --resume, "
            f"or start a new run from its weights with a lower lr: --set init_from={checkpoint} --lr LOWER")


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)


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
    state, weights, notes = None, None, []
    if resume_step is not None:
        resume_step, path, state, weights, broken = newest_intact_checkpoint(cfg.out_dir)
        if broken:
            notes.append(f"resuming from {path}, the newest intact checkpoint; left out (and removed): "
                         + "; ".join(broken))
        diffs = _config_differences(json.loads(state["config"]), cfg.to_dict())
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
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    core = build_model(plan.model_cfg)
    if state is not None:
        load_state_dict_strict(core, weights, os.path.join(path, WEIGHTS_NAME))
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
        removed = prepare_output(cfg, resume_step)
        if removed:
            notes.append(f"removed {len(removed)} leftover(s) of an interrupted run: "
                         + ", ".join(os.path.relpath(p, cfg.out_dir) for p in removed[:6])
                         + (", ..." if len(removed) > 6 else ""))
        _write_json(os.path.join(cfg.out_dir, RUN_CONFIG), run_config_dict(cfg))
    barrier(info)
    checkpoint_extra = {"classes": list(labels.classes)} if labels is not None else {}

    core.to(device).train()
    if cfg.activation_checkpointing and cfg.activation_checkpointing_policy == "selective" and plan.family == "mae":
        selective_checkpointing(core)  # before sharding and compiling: they wrap what the block runs
    n_params = sum(p.numel() for p in core.parameters())
    if plan.family == "mae":
        decay_names = decayed_parameter_names(core)
        wrapped = wrap_model(core, cfg, info, device)
        optimizer = make_optimizer(wrapped, decay_names, plan, cfg.optimizer_impl)
    else:
        wrapped = wrap_model(core, cfg, info, device)
        optimizer = make_baseline_optimizer(core, plan)
    can_reconstruct = hasattr(core, "reconstruct")
    forward = wrapped
    if cfg.compile and cfg.compile_mode == "regional" and plan.family == "mae":
        compile_blocks(core, cfg.compile_backend)  # after sharding: each FSDP2 block compiled as it runs
    elif cfg.compile:
        forward = torch.compile(wrapped, backend=cfg.compile_backend)

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
    ceiling = cfg.peak_tflops or (matmul_ceiling_tflops(device, amp) if (flops_per_crop and info.is_main) else None)
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
                f" {amp_label(amp, cfg.amp, device)}{', ' + cfg.distributed.upper() if info.active else ''} -> {cfg.out_dir}"
                + (f"; resuming after step {start_step}" if resume_step is not None else "")))

    recon_paths: list[str] = []
    last_ckpt = (os.path.join(cfg.out_dir, CHECKPOINT_DIR, step_dir_name(resume_step))
                 if resume_step is not None else None)

    def save(step: int) -> str:
        model_state = full_model_state(wrapped)
        optim_state = full_optimizer_state(wrapped, optimizer)
        loader_states = {}
        for part in all_gather_objects({s: st.state_dict() for s, st in streams.items()}, info):
            loader_states.update(part)
        rng_states = all_gather_objects(_rng_state(), info)
        bad = all_gather_objects(non_finite_weights(model_state) if info.is_main else {}, info)[0]
        if bad:  # never publish (or call good) weights that are NaN or infinite
            where = _last_good(last_ckpt)
            if metrics is not None:
                metrics.write({"event": "non_finite_weights", "step": step})
            raise NonFiniteLossError(f"the weights became non-finite by step {step} of {plan.total_steps} "
                                     f"({describe_non_finite(bad)}); training stopped; {where}")
        path = None
        if info.is_main:
            train_state = {
                "step": step, "crops": crops_seen, "optimizer": optim_state, "loader": loader_states,
                "rng": rng_states, "losses": torch.tensor(losses, dtype=torch.float64),
                "scheduler": {"step": step, "total_steps": plan.total_steps, "max_lr": plan.lr,
                              "warmup_fraction": cfg.warmup_fraction},
                "world_size": info.world_size, "config": json.dumps(run_config_dict(cfg)), **checkpoint_extra,
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
                where = _last_good(last_ckpt)
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
