"""Injected faults for the GPU script's dry run: proof on a CPU that one failing stack, op or preset fails alone,
that a deadline hit mid-stage keeps what was measured, and that a SIGTERM still leaves results.md.

MAE_FAST_GPU_FAULT holds comma-separated faults; each names a stage of benchmarks/headline.py and a *point* in it
(a stack, an op, a preset, "loader", "tests", "roundN" of a comparison's timed rounds; matched as a prefix of the
point's name, so "lion" matches "lion_update"):

    STAGE:POINT            raise InjectedFault at that point (as a Triton launch, a timm mismatch or an OOM would)
    deadline:STAGE[:POINT] the stage's deadline passes at that point (default: the stage's second point)
    sigterm:STAGE[:POINT]  SIGTERM to the stage and to gpu.sh (MAE_FAST_GPU_SH_PID) at that point (default: second)

Points are reached through `point(name)`; `set_stage` names the running stage. Without the variable this is a no-op.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from mae_fast.perf.timing import BudgetSpent

ENV = "MAE_FAST_GPU_FAULT"
SCRIPT_PID_ENV = "MAE_FAST_GPU_SH_PID"
MODES = ("raise", "deadline", "sigterm")


class InjectedFault(RuntimeError):
    """The error an injected fault raises."""


@dataclass(frozen=True)
class Fault:
    mode: str           # "raise", "deadline" or "sigterm"
    stage: str
    point: str | None   # None: the stage's second point

    def matches(self, stage: str, name: str, index: int) -> bool:
        if stage != self.stage:
            return False
        return index == 2 if self.point is None else name.startswith(self.point)


def parse(text: str | None) -> list[Fault]:
    faults = []
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        parts = item.split(":", 2)
        if parts[0] in ("deadline", "sigterm"):
            if len(parts) < 2 or not parts[1]:
                raise ValueError(f"{ENV}: {item!r} names no stage (use {parts[0]}:STAGE[:POINT])")
            faults.append(Fault(parts[0], parts[1], parts[2] if len(parts) > 2 and parts[2] else None))
        elif len(parts) == 2 and all(parts):
            faults.append(Fault("raise", parts[0], parts[1]))
        else:
            raise ValueError(f"{ENV}: cannot read {item!r} (use STAGE:POINT, deadline:STAGE[:POINT] or "
                             "sigterm:STAGE[:POINT])")
    return faults


class _State:
    stage: str | None = None
    reached = 0


def set_stage(stage: str | None) -> None:
    """Name the running stage (benchmarks/headline.py does, once per process) and restart its point count."""
    _State.stage, _State.reached = stage, 0


def point(name: str) -> None:
    """A named point of the running stage: act on the first fault that matches it."""
    text = os.environ.get(ENV)
    if not text or _State.stage is None:
        return
    _State.reached += 1
    for fault in parse(text):
        if not fault.matches(_State.stage, name, _State.reached):
            continue
        if fault.mode == "raise":
            raise InjectedFault(f"injected fault at {fault.stage}:{name} ({ENV})")
        if fault.mode == "deadline":
            raise BudgetSpent(f"injected deadline at {fault.stage}:{name} ({ENV})")
        script = os.environ.get(SCRIPT_PID_ENV)
        if script and script.isdigit():
            os.kill(int(script), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return
