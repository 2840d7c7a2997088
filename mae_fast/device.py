"""Which device to run on, its autocast dtype, waiting for it and timing a call on it: shared by the trainer,
embedding, attention's backend choice and the benchmarks."""
from __future__ import annotations

import time

import torch


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA (cuda:LOCAL_RANK) when available, else CPU. A name torch does not know, a device other than
    cpu / cuda, or CUDA asked for on a machine without it is a ValueError saying what is valid."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device on this machine; "
                             "use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ValueError(f"device is {name!r}; valid values: auto, cpu, cuda, cuda:N")
    return device


def default_amp(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs (the paper's setting); plain fp32 on CPUs, where bf16 is emulated and slow."""
    return torch.bfloat16 if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    """Seconds one call of `fn` takes: CUDA events on a GPU, the host clock (work is synchronous) on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
