"""Embedding throughput (no masking, encoder on every token, mean of the patch tokens) for every selected preset,
eager and compiled, with achieved TFLOP/s and MFU from the exact inference FLOP count."""
from __future__ import annotations

import pytest
import torch

from mae_fast.perf import peer
from mae_fast.perf.harness import base_record
from mae_fast.perf.stacks import InferenceRunner, STACKS, parse_preset, reset_compiled

INFERENCE_STACKS = ("fused", "fused_compiled", "peer")  # embedding calls none of the dispatched training ops


@pytest.mark.parametrize("inference_stack", INFERENCE_STACKS)
def test_embed(preset, inference_stack, settings, batch_for, compiled_allowed, measure):
    stack = STACKS[inference_stack]
    if stack.compiled and not compiled_allowed(preset):
        pytest.skip(f"compiled stacks not selected for {preset} (--bench-compile-presets)")
    cfg = parse_preset(preset)
    if stack.peer and (cfg.channel_agnostic or not peer.timm_available()):
        pytest.skip("the peer stack is the standard MAE on timm (timm installed, no CA-MAE)")
    batch = batch_for(cfg, "inference")
    rec = base_record("inference", preset, cfg, stack, batch, settings)
    if stack.compiled:
        reset_compiled()
    runner = InferenceRunner(cfg, stack, batch, settings.device, settings.amp, settings.compile_backend)
    measure(runner, rec)
    out = runner.last_output
    assert out.shape == (batch, cfg.embed_dim) and torch.isfinite(out).all()
