"""Train step (forward + loss, backward, optimiser step) of the baselines: WSL DenseNet-161 (SGD) with and without
AdaBN, MU-Net-M / -L (AdamW), next to the MAE presets of bench_train_step.py (same session, same results JSON).

    pytest benchmarks/bench_baselines.py                                   # CPU: every baseline preset, batch 2
    pytest benchmarks/bench_baselines.py --bench-baselines munet_m_256,wsl_densenet161_256:img_size=128
    pytest benchmarks/bench_baselines.py benchmarks/bench_train_step.py --bench-out results/   # on a GPU: bf16

Batch: --bench-batch, else CPU (and --bench-toy: the micro baselines at 64 px) 2, GPU a power of two giving ~100 TFLOP per step (8..1024; an out-of-memory batch
is recorded and skipped). Crops are random uint8 (the models standardise them); WSL labels are random over 1,139
classes (RxRx1's label set), and an AdaBN batch stands for one plate. FLOPs per crop: 3 x the forward's
convolution and linear FLOPs (2 per multiply-add, counted by hooks on a real forward); norms, activations and
pooling are not counted, so TFLOP/s and MFU are slight underestimates.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from mae_fast.device import synchronize
from mae_fast.perf.provenance import device_name
from mae_fast.perf.timing import summarise, time_call
from mae_fast.models import count_parameters, create_model, list_models
from mae_fast.training.recipes import build_optimizer, optimizer_recipe

NUM_CLASSES = 1139
TOY_BASELINES = ["munet_micro_256:img_size=64", "wsl_densenet_micro_256:img_size=64",
                 "wsl_densenet_micro_adabn_256:img_size=64"]


def pytest_generate_tests(metafunc):
    if "baseline_spec" in metafunc.fixturenames:
        config = metafunc.config
        text = config.getoption("--bench-baselines", default=None)
        if text:
            specs = [s.strip() for s in text.split(",") if s.strip()]
        else:
            specs = TOY_BASELINES if config.getoption("--bench-toy", default=False) else list_models("baseline")
        metafunc.parametrize("baseline_spec", specs)


def parse_spec(spec: str) -> tuple[str, dict]:
    """'name:key=value:key=value' -> (name, overrides) with int/float values."""
    name, *pairs = spec.split(":")
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        for cast in (int, float):
            try:
                overrides[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            overrides[key] = value
    return name, overrides


def forward_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> int:
    """FLOPs of convolutions and linear layers in one forward (2 per multiply-add)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += 2 * output.numel() * k
        else:
            total += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(images, labels)
    finally:
        for h in handles:
            h.remove()
    return total


class BaselineTrainRunner:
    """One baseline's train step on a fixed random batch."""

    def __init__(self, spec: str, batch: int, device: torch.device, amp: torch.dtype | None):
        name, overrides = parse_spec(spec)
        if name.startswith("wsl"):
            overrides.setdefault("num_classes", NUM_CLASSES)
        torch.manual_seed(0)
        self.model = create_model(name, **overrides).to(device).train()
        cfg = self.model.cfg
        self.cfg, self.batch, self.device, self.amp = cfg, batch, device, amp
        g = torch.Generator(device="cpu").manual_seed(1)
        self.images = torch.randint(0, 256, (batch, cfg.in_chans, cfg.img_size, cfg.img_size), generator=g,
                                    dtype=torch.uint8).to(device)
        self.labels = (torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
                       if cfg.family == "wsl" else None)
        self.optimizer = build_optimizer(self.model, global_batch=batch)
        self.last_loss: torch.Tensor | None = None
        self._flops: int | None = None

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = self.model(self.images, self.labels).loss
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()

    def flops_per_crop(self) -> int:
        if self._flops is None:
            n = min(self.batch, 2)
            labels = None if self.labels is None else self.labels[:n]
            self._flops = 3 * forward_flops(self.model, self.images[:n], labels) // n
        return self._flops


def default_batch(runner_flops_per_crop: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # also what --bench-toy runs
    return int(min(1024, max(8, 2 ** int(math.log2(max(1.0, 100e12 / runner_flops_per_crop))))))


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def test_baseline_train_step(baseline_spec, settings, ceiling, record, benchmark, pytestconfig):
    device = settings.device
    batch = pytestconfig.getoption("--bench-batch", default=None)
    if batch is None:  # size the batch from the FLOPs of a 2-crop probe
        probe = BaselineTrainRunner(baseline_spec, 2, device, settings.amp)
        batch = default_batch(probe.flops_per_crop(), device)
        del probe
    amp = str(settings.amp).replace("torch.", "") if settings.amp else "fp32"
    rec = {"kind": "train", "preset": baseline_spec, "stack": "eager", "batch": batch,
           "device": device_name(device), "amp": amp, "compiled": False, "compile_backend": None}
    try:
        runner = BaselineTrainRunner(baseline_spec, batch, device, settings.amp)
        rec.update(family=runner.cfg.family, img_size=runner.cfg.img_size, in_chans=runner.cfg.in_chans,
                   params=count_parameters(runner.model), optimizer=optimizer_recipe(runner.cfg).name)
        for _ in range(1 + settings.warmup):
            runner.step()
        synchronize(device)
        if not torch.isfinite(runner.last_loss).item():
            raise FloatingPointError(f"non-finite loss {runner.last_loss.item()} after warm-up")
        times: list[float] = []
        benchmark.pedantic(lambda: times.append(time_call(runner.step, device)),
                           rounds=settings.iters, iterations=1, warmup_rounds=0)
    except Exception as err:  # noqa: BLE001 - an out-of-memory batch is a result, not a failure
        if not _is_oom(err):
            raise
        rec.update(status="error", error=f"out of memory at batch {batch}")
        record(rec)
        pytest.skip(f"{baseline_spec}: out of memory at batch {batch} (recorded)")
    rec.update(summarise(times, batch, runner.flops_per_crop(), ceiling["tflops"]), status="ok")
    benchmark.extra_info.update({k: v for k, v in rec.items() if isinstance(v, (int, float, str, bool))})
    record(rec)
    assert rec["crops_per_s"] > 0 and torch.isfinite(runner.last_loss)
