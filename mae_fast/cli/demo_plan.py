"""The demo's schedule from this machine's speed: the step time a short probe run measures, and the steps that
fill the time budget at it (`mae-fast demo` without --max-steps)."""
from __future__ import annotations

import json

import numpy as np

PROBE_STEPS = 6     # steps of the probe run that times the training step (the first, warm-up, is not counted)
PLAN_MARGIN = 1.0   # of the budget planned at the probe's speed; the run's schedule follows the clock (the probe
                    # misses checkpoints, figures and drift: runs stepped 13-30% slower), so it anneals in time
MIN_STEPS = 20      # the shortest schedule the demo plans


def plan_steps(budget_seconds: float, step_seconds: list[float], minimum: int = MIN_STEPS,
               margin: float = PLAN_MARGIN) -> int:
    """Schedule steps that fill `margin` of `budget_seconds` at the median of the timed `step_seconds`; at least
    `minimum` (the time budget still stops a slower run, with its checkpoint)."""
    if not step_seconds or not all(t > 0 for t in step_seconds):
        raise ValueError(f"plan_steps needs positive step times, got {step_seconds}")
    return max(minimum, int(margin * max(budget_seconds, 0.0) / float(np.median(step_seconds))))


def probe_step_seconds(metrics_path: str) -> list[float]:
    """Seconds of each step after the first (warm-up) of a run logged every step: the differences of consecutive
    steps' wall-clock stamps in its metrics.jsonl."""
    with open(metrics_path) as f:
        stamps = [r["time"] for r in map(json.loads, f) if "step" in r and "event" not in r]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def schedule_steps(probe_cfg, budget_seconds: float, max_steps: int | None) -> tuple[int, dict]:
    """(schedule steps, how they were planned): `max_steps` when given (the same on every machine), else planned
    from a probe run of `probe_cfg` (the model's training config, `PROBE_STEPS` steps, in its own folder, deleted
    after) by `plan_steps`, the probe's wall time counted against `budget_seconds`."""
    import shutil
    import time
    from dataclasses import replace

    from mae_fast.training.loop import train

    if max_steps is not None:
        return max_steps, {"source": "--max-steps"}
    # the probe's own extras kept small: no ceiling measurement (MFU is not wanted), one validation crop
    cfg = replace(probe_cfg, steps=PROBE_STEPS, log_every=1, checkpoint_every=PROBE_STEPS, recon_every=0,
                  progress=False, peak_tflops=1.0, val_crops=1)
    t0 = time.time()
    result = train(cfg)
    probe_seconds = time.time() - t0
    times = probe_step_seconds(result.metrics_path)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    left = budget_seconds - probe_seconds
    return plan_steps(left, times), {"source": "probe", "probe_steps": result.steps,
                                     "step_seconds": float(np.median(times)), "probe_seconds": probe_seconds,
                                     "budget_left_seconds": left}
