"""Train step (forward + masked loss, backward, Lion step) of every selected preset on every stack.

    reference           plain-PyTorch op references (MAE_FAST_IMPL=reference), SDPA attention, foreach Lion, eager
    reference_compiled  the same under torch.compile
    fused               mae_fast's default dispatch (Triton on CUDA, C++ on CPU where built), eager
    fused_compiled      the same under torch.compile

Recorded per test (pytest-benchmark extra_info and the session's results JSON): crops/s, achieved TFLOP/s from the
exact FLOP count, MFU against the matmul ceiling measured in this session, peak memory, the implementation of every
fused op and the attention backend that ran. fused/reference ratios are computed at the end of the session.
On a GPU, `test_max_batch` searches the largest batch that fits for the eager stacks of the target presets.
Options: see benchmarks/conftest.py (`--bench-presets`, `--bench-stacks`, `--bench-out`, ...).
"""
from __future__ import annotations

import pytest
import torch

from mae_fast.cli.bench import GPU_TARGET_PRESETS
from mae_fast.perf.harness import base_record, find_max_batch
from mae_fast.perf.stacks import STACKS, TrainRunner, parse_preset, reset_compiled


def test_train_step(preset, stack_name, settings, batch_for, compiled_allowed, measure, record):
    stack = STACKS[stack_name]
    if stack.compiled and not compiled_allowed(preset):
        pytest.skip(f"compiled stacks not selected for {preset} (--bench-compile-presets)")
    cfg = parse_preset(preset)
    if stack.peer and cfg.channel_agnostic:
        pytest.skip("the peer stack is the standard MAE (no public timm CA-MAE)")
    batch = batch_for(cfg, "train")
    rec = base_record("train", preset, cfg, stack, batch, settings)
    if stack.compiled:
        reset_compiled()
    try:
        runner = TrainRunner(cfg, stack, batch, settings.device, settings.amp, settings.compile_backend)
        measure(runner, rec)
    except torch.OutOfMemoryError:
        rec.update(status="error", error=f"out of memory at batch {batch}")
        record(rec)
        pytest.skip(f"{preset} {stack_name}: out of memory at batch {batch} (recorded)")
    # the step really trained: a finite loss, and the implementations that ran are the stack's
    assert torch.isfinite(runner.last_loss)
    if stack.ops_impl == "reference" and not stack.peer:
        assert rec["impls"]["masked_patchify"] == "reference"
        assert rec["impls"]["lion_update"] == "foreach"
    assert rec["crops_per_s"] > 0


def test_max_batch(max_batch_case, settings, batch_for, record):
    if max_batch_case is None:
        pytest.skip(f"no target preset selected for the largest-batch search ({', '.join(GPU_TARGET_PRESETS)})")
    if settings.device.type != "cuda":
        pytest.skip("largest-batch search runs on a GPU only (CPU memory is shared with the machine)")
    preset, stack_name = max_batch_case
    stack = STACKS[stack_name]
    cfg = parse_preset(preset)
    start = batch_for(cfg, "train")
    result = find_max_batch(
        lambda b: TrainRunner(cfg, stack, b, settings.device, settings.amp, settings.compile_backend),
        settings.device, start=start, limit=settings.max_batch_limit, time_cap_s=settings.max_batch_time_s)
    rec = base_record("max_batch", preset, cfg, stack, start, settings)
    rec.update(status="ok", max_batch=result.pop("max_batch"), max_batch_search=result)
    record(rec)
    assert rec["max_batch"] is None or rec["max_batch"] >= 1
