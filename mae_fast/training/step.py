"""One optimiser step: the rank's micro-batches (each seeded from (seed, step, micro-batch)), their gradients
accumulated with the communication the wrapper needs (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`), the
step's statistics averaged over ranks, a non-finite loss refused before the optimiser moves, then the update."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from mae_fast.optim import one_cycle_cosine
from mae_fast.training.config import RunPlan, TrainConfig
from mae_fast.training.distributed import DistInfo


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or infinite: names the step and the last good checkpoint."""


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The global-RNG seed of micro-batch `micro` of step `step` (masking and stochastic depth)."""
    words = np.random.SeedSequence([int(seed), int(step), int(micro), 0x4D414546]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & ((1 << 63) - 1)


def micro_inputs(batch, labels, device: torch.device):
    """A stream's batch -> (images, labels or None); WSL labels come from the sites of the crops (CropInfo)."""
    if not isinstance(batch, tuple):
        return batch, None
    images, info = batch
    return images, (labels.for_crops(info, device) if labels is not None else None)


def gradient_sync(wrapped: torch.nn.Module, active: bool, last: bool, fsdp_reduce: str):
    """The context of one micro-batch's backward: whether its gradients are communicated now.

    DDP all-reduces only in the last micro-batch's backward (`no_sync` before). FSDP2 has no `no_sync`: with
    fsdp_reduce="micro_batch" every backward reduce-scatters (gradients stay sharded); with "step" the gradients
    accumulate unsharded and the blocks stay gathered until the last backward, which reduce-scatters once and
    reshards (see TrainConfig.fsdp_reduce)."""
    if not active:
        return contextlib.nullcontext()
    if isinstance(wrapped, FSDPModule):
        if fsdp_reduce == "step":
            wrapped.set_requires_gradient_sync(last)
            wrapped.set_reshard_after_backward(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else wrapped.no_sync()


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)


@dataclass
class StepStats:
    loss: float          # mean over the step's micro-batches, all ranks
    accuracy: float      # WSL: top-1 on the training crops (0 for the MAE)
    lr: float
    out_of_time: bool    # any rank past max_seconds


def schedule_progress(steps_done: int, total_steps: int, clock: str, seconds: float, max_seconds: float) -> float:
    """How far the one-cycle schedule has gone, as a fraction (>= 1: annealed): `steps_done / total_steps`, or on
    the "time" clock the larger of that and `seconds / max_seconds`, so a run slower than its plan anneals by its
    time budget instead of being stopped partway down the decay."""
    progress = steps_done / total_steps
    return max(progress, seconds / max_seconds) if clock == "time" else progress


class TrainStep:
    """Runs optimiser steps: `stats = step(t, elapsed, last_good)` trains step t (0-based) on this rank's
    micro-batches."""

    def __init__(self, forward, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, streams: dict,
                 labels, cfg: TrainConfig, plan: RunPlan, info: DistInfo, device: torch.device, amp):
        self.forward, self.wrapped, self.optimizer, self.streams = forward, wrapped, optimizer, streams
        self.labels, self.cfg, self.plan, self.info, self.device, self.amp = labels, cfg, plan, info, device, amp
        self.local_micro = plan.local_micro(info.rank)
        self.progress: float | None = None  # the schedule's progress after the last step (None: none taken yet)

    def __call__(self, step: int, elapsed, last_good: str) -> StepStats:
        """Optimiser step `step` (0-based). `elapsed()` (seconds this rank has trained) is asked after this rank's
        micro-batches: any rank past max_seconds stops every rank after this step, and on the "time" clock the
        ranks' mean sets the next step's learning rate (the same on every rank); `last_good` goes into a
        non-finite loss's message."""
        cfg, plan, device = self.cfg, self.plan, self.device
        position = step  # on the schedule, in steps; on the clock, where the last step's time put it if further
        if self.progress is not None and cfg.schedule_clock == "time":
            position = max(step, self.progress * plan.total_steps)
        lr = one_cycle_cosine(position, plan.total_steps, plan.lr, cfg.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        n_local = len(self.local_micro)
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        accuracy_sum = torch.zeros((), device=device, dtype=torch.float32)
        for i, j in enumerate(self.local_micro):
            images, micro_labels = micro_inputs(self.streams[j % plan.shards].next(), self.labels, device)
            torch.manual_seed(micro_seed(cfg.seed, step, j))
            with gradient_sync(self.wrapped, self.info.active, i == n_local - 1, cfg.fsdp_reduce):
                with autocast(device, self.amp):
                    out = self.forward(images) if micro_labels is None else self.forward(images, micro_labels)
                    loss = out.loss
                (loss / n_local).backward()
            loss_sum += loss.detach().float()
            accuracy = getattr(out, "extras", {}).get("accuracy")
            if accuracy is not None:
                accuracy_sum += accuracy.detach().float()
        seconds = elapsed()
        out_of_time = cfg.max_seconds > 0 and seconds > cfg.max_seconds
        stats = torch.tensor([0.0, float(out_of_time), 0.0, seconds], device=device, dtype=torch.float32)
        stats[0], stats[2] = loss_sum / n_local, accuracy_sum / n_local
        if self.info.active:
            dist.all_reduce(stats)
            stats[0] /= self.info.world_size
            stats[2] /= self.info.world_size
            stats[3] /= self.info.world_size
        step_loss = float(stats[0])
        if not math.isfinite(step_loss):
            err = NonFiniteLossError(f"non-finite loss ({step_loss}) at step {step + 1} of {plan.total_steps}; "
                                     f"training stopped; {last_good}")
            err.event = {"event": "non_finite_loss", "step": step + 1, "loss": str(step_loss)}
            raise err
        self.optimizer.step()
        self.progress = schedule_progress(step + 1, plan.total_steps, cfg.schedule_clock, float(stats[3]),
                                          cfg.max_seconds)
        return StepStats(step_loss, float(stats[2]), lr, bool(stats[1] > 0))
