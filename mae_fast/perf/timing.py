"""Timing on a device -- one call (`time_call`), or the median of many (`time_median`, the kernel benchmarks' timer) --
the device's measured ceilings (matmul rate for MFU, copy bandwidth for byte floors), and summaries of timed rounds."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from mae_fast.device import synchronize, time_call  # noqa: F401  (time_call: part of this module's API)
from mae_fast.perf.provenance import device_name


def measure_matmul_ceiling(device: torch.device, size: int | None = None, repeats: int | None = None,
                           dtype: torch.dtype | None = None) -> dict:
    """The device's practical matmul rate in `dtype` -- the run's, so that MFU compares like with like (default:
    bf16 on CUDA, fp32 on the CPU). CUDA: a size^3 product (default 8192) timed with CUDA events, the median after
    warm-up. CPU: a product of default size 1024 on the host clock, the fastest repeat (a shared CPU's median
    measures its neighbours). Random inputs, rotated between two sets."""
    if device.type == "cuda":
        default, size, repeats, warmup, statistic = torch.bfloat16, size or 8192, repeats or 10, 3, "median"
    else:
        default, size, repeats, warmup, statistic = torch.float32, size or 1024, repeats or 7, 1, "min"
    dtype = dtype or default
    gen = torch.Generator(device=device).manual_seed(1234)
    pairs = [(torch.randn(size, size, device=device, dtype=dtype, generator=gen),
              torch.randn(size, size, device=device, dtype=dtype, generator=gen)) for _ in range(2)]
    out = torch.empty(size, size, device=device, dtype=dtype)
    for i in range(warmup):
        torch.mm(*pairs[i % 2], out=out)
    synchronize(device)
    times = [time_call(lambda i=i: torch.mm(*pairs[i % 2], out=out), device) for i in range(repeats)]
    seconds = statistics.median(times) if statistic == "median" else min(times)
    return {
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": [size, size, size],
        "repeats": repeats,
        "statistic": statistic,
        "seconds": seconds,
        "tflops": 2 * size**3 / seconds / 1e12,
        "method": "CUDA events" if device.type == "cuda" else "host clock",
    }


def summarise(times: list[float], batch: int, flops_per_crop: int, ceiling_tflops: float | None) -> dict:
    """Throughput, achieved TFLOP/s and MFU from per-step times (seconds)."""
    median = statistics.median(times)
    crops_per_s = batch / median
    achieved = flops_per_crop * crops_per_s / 1e12
    return {
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "timed_steps": len(times),
        "crops_per_s": crops_per_s,
        "crops_per_s_best": batch / min(times),  # robust to a busy machine's spikes
        "flops_per_crop": flops_per_crop,
        "achieved_tflops": achieved,
        "mfu": achieved / ceiling_tflops if ceiling_tflops else None,
    }


def time_median(fn: Callable[[], object], device: torch.device, min_runs: int = 5, min_time_s: float = 1.0) -> dict:
    """Median seconds per call after warm-up: CUDA events through triton.testing.do_bench on a GPU (median of
    its repetitions), host clock on the CPU (at least `min_runs` calls and `min_time_s`)."""
    fn()
    synchronize(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            ms = do_bench(fn, warmup=100, rep=500, return_mode="median")
            return {"median_s": ms / 1e3, "timer": "triton.testing.do_bench (CUDA events), median"}
        except ImportError:
            pass
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "runs": len(times), "timer": "host clock, median"}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of the memory ceiling the byte floors are measured against (bytes read + written): a 1 GiB
    device-to-device copy on a GPU; on the CPU an in-place `x += y` over 256 MiB each (a plain copy there also
    reads every destination line before writing it, which would understate the bandwidth by a third)."""
    if device.type == "cuda":
        n = (1 << 30) // 4
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        t = time_median(lambda: dst.copy_(src), device)["median_s"]
        return 2 * n * 4 / t
    n = (1 << 28) // 4
    x, y = torch.randn(n), torch.randn(n)
    t = time_median(lambda: x.add_(y), device)["median_s"]
    return 3 * n * 4 / t
