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


# /proc/cpuinfo flags of CPUs that multiply bf16 matrices in hardware: AMX tiles (Sapphire Rapids on) and
# AVX512-BF16 dot products (Cooper Lake, Zen 4 on). Without them oneDNN emulates bf16 through fp32, slower than fp32.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The native bf16 matrix units this CPU reports (the `NATIVE_BF16_FLAGS` found in `cpuinfo`'s flags), empty
    where it has none or the file cannot be read (not Linux): there bf16 counts as emulated."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except (OSError, IndexError):
        return ()
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in flags)


def default_amp(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `amp=auto`: bf16 on GPUs (the paper's setting) and on CPUs with native bf16 matrix units
    (`cpu_bf16_units`); fp32 on other CPUs, where bf16 is emulated and slower than fp32."""
    if device.type == "cuda" or cpu_bf16_units():
        return torch.bfloat16
    return None


def amp_label(amp: torch.dtype | None, requested: str, device: torch.device) -> str:
    """How a run header names its dtype and why: `bf16`, `fp32`, or for `auto` on a CPU e.g.
    `bf16 (auto: avx512_bf16)` / `fp32 (auto: no native bf16 on this CPU)`."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}.get(amp, str(amp).replace("torch.", ""))
    if requested != "auto" or device.type != "cpu":
        return name
    units = cpu_bf16_units()
    return f"{name} (auto: {'+'.join(units) if units else 'no native bf16 on this CPU'})"


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
