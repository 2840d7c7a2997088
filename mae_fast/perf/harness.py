"""The benchmark harness: interleaved rounds of several stacks, warm-up, memory-based batch sizes and the
largest-batch search, time budgets, ratios between stacks and the comparison with the papers' numbers."""
from __future__ import annotations

import gc
import math
import resource
import statistics
import time
from dataclasses import dataclass

import torch

from mae_fast import attention as attention_mod
from mae_fast.device import synchronize
from mae_fast.models import MAEConfig
from mae_fast.perf import flops as flops_mod
from mae_fast.perf.provenance import device_name
from mae_fast.perf.stacks import (
    InferenceRunner,
    Stack,
    TrainRunner,
    dynamo_counts,
    impls_that_ran,
    random_images,
    reset_compiled,
)
from mae_fast.perf.timing import measure_matmul_ceiling, summarise, time_call

def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free_memory(device: torch.device) -> None:
    """Return freed blocks to the device after an out-of-memory error or between presets (GPU only)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def step_peak_bytes(runner, device: torch.device) -> int | None:
    """Peak device memory one step of `runner` needs: its parameters and optimiser state plus what the step
    allocates on top (activations, gradients, temporaries). Other runners alive at the same time do not count."""
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.step_synced()
    return runner.persistent_bytes() + torch.cuda.max_memory_allocated(device) - base


def find_max_batch(make_runner, device: torch.device, start: int, limit: int = 4096,
                   time_cap_s: float = 60.0) -> dict:
    """Largest batch whose step runs: doubling from `start` until a failure, then bisection to ~3%.
    `make_runner(batch)` builds a runner; stops at `limit` or after `time_cap_s` (then the result is a lower bound)."""
    t0 = time.perf_counter()
    runner = make_runner(start)
    gen = torch.Generator(device=device).manual_seed(7)
    ok, failed, note, capped = 0, None, None, False

    def fits(batch: int) -> bool:
        nonlocal note
        error = None
        try:
            runner.step(random_images(runner.cfg, batch, device, gen))
            synchronize(device)
        except RuntimeError as err:  # OOM, or a kernel's launch limit at huge batches
            error = "oom" if _is_oom(err) else f"batch {batch}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        # here the failed step's frames (and the activations they hold) are released
        if hasattr(runner, "optimizer"):
            runner.optimizer.zero_grad(set_to_none=True)
        _free_memory(device)
        if error not in (None, "oom") and note is None:
            note = error
        return error is None

    batch = start
    while True:
        if time.perf_counter() - t0 > time_cap_s:
            capped = True
            break
        if fits(batch):
            ok = batch
            if failed is None:
                if batch >= limit:
                    break
                batch = min(2 * batch, limit)
                continue
        else:
            failed = batch
        if failed is not None:
            if failed - ok <= max(1, failed // 32):
                break
            batch = (ok + failed) // 2
    del runner
    _free_memory(device)
    return {"max_batch": ok or None, "first_failing_batch": failed, "limit": limit, "capped": capped,
            "search_s": round(time.perf_counter() - t0, 2), "note": note}


@dataclass
class BenchSettings:
    device: torch.device
    amp: torch.dtype | None
    warmup: int = 2
    iters: int = 5            # timed steps per stack per round
    rounds: int = 3           # interleaved rounds
    compile_backend: str = "inductor"
    compile_mode: str = "regional"
    max_batch_time_s: float = 45.0
    max_batch_limit: int = 4096
    deadline: float | None = None  # time.monotonic() after which no further measurement starts


class BudgetSpent(Exception):
    """The settings' deadline passed: stop measuring, keep what was measured."""


def check_budget(settings: BenchSettings) -> None:
    if settings.deadline is not None and time.monotonic() > settings.deadline:
        raise BudgetSpent


def batch_for_memory(bytes_at: dict[int, int], available_bytes: int, limit: int = 1024, multiple: int = 8) -> int:
    """Largest batch (a multiple of `multiple`, at most `limit`, at least `multiple`) whose step fits in
    `available_bytes`, from a step's peak bytes measured at two batches {b1: peak1, b2: peak2}: peak memory is
    affine in the batch (fixed part + per-crop activations), so two points give both."""
    if len(bytes_at) < 2:
        raise ValueError("need peak bytes at two different batches")
    (b1, m1), (b2, m2) = sorted(bytes_at.items())[:2]
    per_crop = max(1.0, (m2 - m1) / (b2 - b1))
    fixed = m1 - per_crop * b1
    batch = int((available_bytes - fixed) // per_crop) // multiple * multiple
    return max(multiple, min(limit, batch))


def estimate_train_batch(cfg: MAEConfig, stacks: list[Stack], settings: BenchSettings, fraction: float = 0.7,
                         probe: int = 8) -> dict:
    """The batch for a train-step comparison from a memory estimate, not a search: each eager stack's step peak at
    batches `probe` and 2*`probe` gives its fixed and per-crop bytes; the batch is the largest whose step fits in
    `fraction` of the device memory left once every stack's parameters and optimiser state are resident (they are
    alive together during the interleaved rounds). CPU: 2 crops (CPU memory is the machine's)."""
    device = settings.device
    if device.type != "cuda":
        return {"batch": 2, "method": "fixed on CPU"}
    per_stack, resident = {}, 0
    for stack in (s for s in stacks if not s.compiled):
        check_budget(settings)
        runner = TrainRunner(cfg, stack, probe, device, settings.amp, settings.compile_backend)
        gen = torch.Generator(device=device).manual_seed(11)
        runner.step_synced()  # first step: kernels compiled, optimiser state allocated
        peaks = {}
        for b in (probe, 2 * probe):
            images = random_images(cfg, b, device, gen)
            synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            runner.step(images)
            synchronize(device)
            peaks[b] = torch.cuda.max_memory_allocated(device) - base
        resident += runner.persistent_bytes()
        per_stack[stack.name] = peaks
        del runner
        _free_memory(device)
    total = torch.cuda.get_device_properties(device).total_memory
    available = int(fraction * total) - resident
    batches = {name: batch_for_memory(peaks, available, limit=settings.max_batch_limit)
               for name, peaks in per_stack.items()}
    return {"batch": min(batches.values()), "method": "memory estimate (two probe steps per stack)",
            "per_stack_batch": batches, "probe_peak_bytes": per_stack, "resident_bytes": resident,
            "device_bytes": total, "fraction": fraction}


def default_batch(cfg: MAEConfig, device: torch.device, kind: str = "train") -> int:
    """CPU: 2 crops. GPU: a power of two giving ~100 TFLOP per step (~0.2 s on an H200), 8..1024."""
    if device.type != "cuda":
        return 2
    per_crop = (flops_mod.training_flops_per_crop(cfg) if kind == "train"
                else flops_mod.inference_flops_per_crop(cfg))
    batch = 2 ** int(math.log2(max(1.0, 100e12 / per_crop)))
    return int(min(1024, max(8, batch)))


def base_record(kind: str, label: str, cfg: MAEConfig, stack: Stack, batch: int, settings: BenchSettings) -> dict:
    return {
        "kind": kind, "preset": label, "stack": stack.name, "batch": batch,
        "device": device_name(settings.device),
        "amp": str(settings.amp).replace("torch.", "") if settings.amp else "fp32",
        "compiled": stack.compiled, "compile_backend": settings.compile_backend if stack.compiled else None,
        "compile_mode": settings.compile_mode if stack.compiled else None,
        "img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
        "mask_ratio": cfg.mask_ratio, "layout": cfg.layout,
    }


def _error_text(err: BaseException, batch: int) -> str:
    if _is_oom(err):
        return f"out of memory at batch {batch}"
    first = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def warm_up(runner, rec: dict, settings: BenchSettings) -> None:
    """First step (compiles, if compiled), warm-up steps, the implementations that ran, a finite loss, peak memory."""
    if runner.stack.compiled:
        from torch._dynamo.utils import counters

        counters.clear()
    t0 = time.perf_counter()
    runner.step_synced()
    rec["first_step_s"] = round(time.perf_counter() - t0, 3)
    if runner.stack.compiled:
        rec["dynamo"] = dynamo_counts()
    for _ in range(settings.warmup):
        runner.step_synced()
    # embedding calls none of the dispatched training ops: report only its attention backend
    if runner.stack.peer:
        rec["impls"] = {"model": "timm", "optimizer": "timm.optim.Lion"}
    elif isinstance(runner, TrainRunner):
        rec["impls"] = impls_that_ran()
    else:
        rec["impls"] = {"attention": attention_mod.last_backend()}
    if runner.last_loss is not None and not torch.isfinite(runner.last_loss).item():
        raise FloatingPointError(f"non-finite loss {runner.last_loss.item()} after warm-up")
    rec["peak_mem_bytes"] = step_peak_bytes(runner, settings.device)


def compare_stacks(kind: str, label: str, cfg: MAEConfig, stacks: list[Stack], batch: int,
                   settings: BenchSettings, ceiling_tflops: float | None,
                   search_max_batch: bool = False) -> tuple[list[dict], list[dict], bool]:
    """Build every stack of one preset, warm each, then time them in interleaved rounds.
    Returns (one record per stack, speed ratios between stacks from the same rounds, interrupted). On Ctrl-C (or
    `timeout -s INT`) what was timed so far is summarised and the rest marked "interrupted"."""
    device = settings.device
    runner_cls = TrainRunner if kind == "train" else InferenceRunner
    records = {stack.name: base_record(kind, label, cfg, stack, batch, settings) for stack in stacks}
    runners: dict[str, object] = {}
    times: dict[str, list[float]] = {}
    per_round: dict[str, list[float]] = {}
    interrupted = False
    if any(stack.compiled for stack in stacks):
        reset_compiled()
    stopped = "interrupted"
    try:
        for stack in stacks:
            check_budget(settings)
            if _build_and_warm(runner_cls, cfg, stack, batch, settings, records[stack.name], runners):
                times[stack.name], per_round[stack.name] = [], []
        for _ in range(settings.rounds):
            check_budget(settings)
            for name, runner in runners.items():
                t = []
                for _ in range(settings.iters):
                    check_budget(settings)
                    t.append(time_call(runner.step, device))
                times[name].extend(t)
                per_round[name].append(statistics.median(t))
    except KeyboardInterrupt:
        interrupted = True
    except BudgetSpent:
        interrupted, stopped = True, "time budget spent"
    for name, runner in runners.items():
        if times.get(name):
            records[name].update(summarise(times[name], batch, runner.flops_per_crop(), ceiling_tflops), status="ok")
            if device.type == "cpu":  # process-wide high-water mark: an upper bound, not per stack
                records[name]["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for rec in records.values():
        if "status" not in rec:
            rec.update(status="interrupted", error=f"{stopped} before it was timed")
    runner = None
    runners.clear()
    _free_memory(device)
    per_round = {k: v for k, v in per_round.items() if v}  # rounds every timed stack completed
    per_round = {k: v[:min(len(x) for x in per_round.values())] for k, v in per_round.items()} if per_round else {}

    if kind == "train" and not interrupted:
        try:
            for stack in stacks:
                _max_batch(runner_cls, cfg, stack, batch, settings, records[stack.name], search_max_batch)
        except KeyboardInterrupt:
            interrupted = True
    return list(records.values()), ratios_from_rounds(label, kind, per_round), interrupted


def _build_and_warm(runner_cls, cfg, stack, batch, settings, rec, runners) -> bool:
    """Build and warm one stack's runner into `runners`; a failure is recorded in `rec`, never raised."""
    failure = None
    try:
        runner = runner_cls(cfg, stack, batch, settings.device, settings.amp, settings.compile_backend,
                            compile_mode=settings.compile_mode)
        warm_up(runner, rec, settings)
        runners[stack.name] = runner
    except Exception as err:  # noqa: BLE001 - recorded in the results, never dropped
        failure = _error_text(err, batch)
    if failure is None:
        return True
    runner = None
    _free_memory(settings.device)  # after the except block: the failed step's frames are gone
    rec.update(status="error", error=failure)
    return False


def _max_batch(runner_cls, cfg, stack, batch, settings, rec, search: bool) -> None:
    rec["max_batch"] = None
    if rec.get("status") != "ok":
        return
    if settings.device.type != "cuda":
        rec["max_batch_note"] = "not searched on CPU"
    elif stack.compiled:
        rec["max_batch_note"] = "not searched (a compiled step recompiles for every batch size)"
    elif not search:
        rec["max_batch_note"] = "not searched for this preset"
    else:
        result = find_max_batch(
            lambda b: runner_cls(cfg, stack, b, settings.device, settings.amp, settings.compile_backend),
            settings.device, start=batch, limit=settings.max_batch_limit, time_cap_s=settings.max_batch_time_s)
        rec["max_batch"] = result.pop("max_batch")
        rec["max_batch_search"] = result


RATIO_PAIRS = [
    ("fused", "reference"),
    ("fused", "peer"),
    ("fused_compiled", "peer_compiled"),
    ("fused_compiled", "peer"),
    ("reference", "peer"),
    ("fused_compiled", "reference_compiled"),
    ("fused_compiled", "reference"),
    ("fused", "reference_compiled"),
    ("reference_compiled", "reference"),
]


def ratios_from_rounds(preset: str, kind: str, per_round: dict[str, list[float]]) -> list[dict]:
    """Speed ratios (step time of the denominator stack / of the numerator: > 1 means the numerator is faster),
    one per round: median, min, max."""
    out = []
    for num, den in RATIO_PAIRS:
        if num in per_round and den in per_round and per_round[num] and per_round[den]:
            r = [d / n for n, d in zip(per_round[num], per_round[den])]
            out.append({"kind": kind, "preset": preset, "numerator": num, "denominator": den,
                        "ratio_median": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r),
                        "rounds": len(r)})
    return out


def paper_comparison(train_records: list[dict], ratios: list[dict] | None = None,
                     preset: str = "mae_vit_large_patch8_256") -> dict | None:
    """The paper's ViT-L/8+ run (3.5e9 crops, > 20,000 A100-hours, ~11% MFU) against the fastest measured stack,
    and the issue's targets (MFU >= 50%, >= 1.4x the eager reference, >= 1.15x the compiled reference)."""
    ok = [r for r in train_records if r.get("preset") == preset and r.get("status") == "ok"]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["crops_per_s"])
    paper = flops_mod.paper_run_summary()

    def best_ratio(denominator: str) -> float | None:
        values = [r["ratio_median"] for r in ratios or [] if r["preset"] == preset and r["kind"] == "train"
                  and r["denominator"] == denominator and r["numerator"].startswith("fused")]
        return max(values) if values else None

    targets = {
        "MFU": {"value": best.get("mfu"), "target": 0.5},
        "fused vs eager reference": {"value": best_ratio("reference"), "target": 1.4},
        "fused vs compiled reference": {"value": best_ratio("reference_compiled"), "target": 1.15},
    }
    return {
        "targets": targets,
        "preset": preset,
        "best_stack": best["stack"],
        "measured_crops_per_s": best["crops_per_s"],
        "measured_mfu": best.get("mfu"),
        "device": best["device"],
        "gpu_hours_for_paper_crops": flops_mod.gpu_hours_for(paper["crops"], best["crops_per_s"]),
        "paper_crops": paper["crops"],
        "paper_gpu_hours": paper["gpu_hours"],
        "paper_implied_mfu": paper["implied_mfu_exact"],
        "paper_crops_per_gpu_s": paper["implied_crops_per_gpu_s"],
    }


def refresh_cpu_ceiling(payload: dict, device: torch.device) -> None:
    """On a CPU, measure the ceiling again after the run and keep the higher of the two (a busy machine at the
    start would otherwise inflate every MFU); MFUs are recomputed against it."""
    if device.type != "cpu":
        return
    again = measure_matmul_ceiling(device, dtype=getattr(torch, payload["ceiling"]["dtype"]))  # the run's dtype
    if again["tflops"] <= payload["ceiling"]["tflops"]:
        return
    again["note"] = "higher of the measurements before and after the run"
    payload["ceiling"] = again
    for rec in payload["train"] + payload["inference"]:
        if rec.get("achieved_tflops") is not None:
            rec["mfu"] = rec["achieved_tflops"] / again["tflops"]
    if payload.get("paper_comparison"):
        payload["paper_comparison"] = paper_comparison(payload["train"], payload["ratios"])
