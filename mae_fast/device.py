"""Which device to run on, its autocast dtype, and waiting for it: shared by the trainer, embedding and benchmarks."""
from __future__ import annotations

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
