"""What a run reports: metrics.jsonl (+ TensorBoard), the progress bar and the log lines (rank 0 only), and MFU
from the exact FLOP count and the matmul rate measured at start."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import torch

from mae_fast.io import atomic_write
from mae_fast.perf import flops
from mae_fast.perf.timing import measure_matmul_ceiling
from mae_fast.training.config import ModelConfig, TrainConfig, model_family

logger = logging.getLogger("mae_fast.training")


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
    try:  # the same measurement as `mae-fast bench`
        return float(measure_matmul_ceiling(device, dtype=amp or torch.float32)["tflops"])
    except Exception:  # noqa: BLE001
        return None


class StepReporter:
    """Rank 0's view of the run: one record per `log_every` steps in metrics.jsonl, the progress bar, log lines and
    events. On other ranks every method does nothing."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, world_size: int, is_main: bool, device,
                 resume_step: int | None, start_step: int, total_steps: int, with_accuracy: bool, amp=None):
        self.cfg, self.is_main, self.world_size, self.with_accuracy = cfg, is_main, world_size, with_accuracy
        self.flops_per_crop = training_flops_per_crop(model_cfg)
        self.ceiling = cfg.peak_tflops or (matmul_ceiling_tflops(device, amp) if (self.flops_per_crop and is_main)
                                           else None)
        self.log = MetricsLog(cfg.out_dir, resume_step, cfg.tensorboard) if is_main else None
        self.bar = None
        if is_main and cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.window_t, self.window_crops = time.perf_counter(), 0

    def mfu(self, rate: float) -> float | None:
        if not self.flops_per_crop or not self.ceiling:
            return None
        return rate * self.flops_per_crop / (self.ceiling * 1e12 * self.world_size)

    def line(self, text: str) -> None:
        """A line for the user (through the progress bar while it is shown, so the bar stays whole)."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            logger.info(text)

    def step(self, step: int, total: int, stats, crops: int) -> None:
        """After optimiser step `step` (1-based)."""
        self.window_crops += self.cfg.global_batch
        if not self.is_main:
            return
        if step % self.cfg.log_every == 0 or step == total:
            now = time.perf_counter()
            rate = self.window_crops / max(now - self.window_t, 1e-9)
            self.window_t, self.window_crops = now, 0
            mfu = self.mfu(rate)
            record = {"step": step, "loss": stats.loss, "lr": stats.lr, "crops": crops, "crops_per_s": rate,
                      "mfu": mfu, "time": time.time()}
            if self.with_accuracy:
                record["accuracy"] = stats.accuracy
            self.log.write(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}", crops_s=f"{rate:.1f}",
                                     mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%", refresh=False)
        if self.bar is not None:
            self.bar.update(1)

    def event(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.log is not None:
            self.log.close()
            self.log = None
