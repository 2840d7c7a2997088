"""The stages of benchmarks/gpu.sh, headline first: each writes one JSON file (schema mae_fast.headline/1) the moment
it ends, and rewrites it after every measurement, so a stage stopped by its time limit keeps what it measured.

    python benchmarks/headline.py env      --out env.json                      # versions, matmul + copy ceilings
    python benchmarks/headline.py kernels  --out kernels.json                  # each kernel: correct?, then time;
                                                                               # SDPA backends at ViT-L/8 shapes
    python benchmarks/headline.py train    --out train.json                    # ViT-L/8 step: fused, reference, peer;
                                                                               # the data path's crops/s beside it
    python benchmarks/headline.py infer    --out inference.json                # embedding crops/s, fused vs peer
    python benchmarks/headline.py compiled --out compiled.json                 # regional compilation, all stacks
    python benchmarks/headline.py tests    --out tests.json                    # the GPU pytest suites, summarised
    python benchmarks/headline.py render   --dir OUTDIR                        # OUTDIR/results.md from the above

--deadline EPOCH_S: no measurement starts after it (gpu.sh passes the stage's share of the budget). With
MAE_FAST_GPU_DRYRUN=1 every stage runs at toy sizes on the CPU (micro presets at 64^2, small kernel inputs,
collection only for the tests) so that the plumbing is proven without a GPU. Targets (the issue's goals) are written
next to each measurement, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

from mae_fast import attention, ops  # noqa: E402
from mae_fast.perf import flops  # noqa: E402
from mae_fast.perf import peer  # noqa: E402
from mae_fast.device import default_amp  # noqa: E402
from mae_fast.perf.harness import (  # noqa: E402
    BenchSettings,
    BudgetSpent,
    compare_stacks,
    default_batch,
    estimate_train_batch,
)
from mae_fast.perf.provenance import dist_version, provenance  # noqa: E402
from mae_fast.processes import default_workers  # noqa: E402
from mae_fast.perf.stacks import STACKS, Stack, parse_preset  # noqa: E402
from mae_fast.perf.timing import measure_matmul_ceiling, time_median  # noqa: E402
from mae_fast.ops.triton import kernels_module  # noqa: E402
from mae_fast.io import atomic_write_json  # noqa: E402

kernels_module()
import bench_ops  # noqa: E402  (benchmarks/, after the kernels are mapped)
import bench_data  # noqa: E402

SCHEMA = "mae_fast.headline/1"
DRYRUN = os.environ.get("MAE_FAST_GPU_DRYRUN") == "1"
PREDICTIONS = os.path.join(HERE, "results", "kernel_predictions.json")
NOT_MEASURED = "not measured on a GPU"

# the goals, written beside the measurements
TARGETS = {
    "train_mfu": 0.50,                   # ViT-L/8 train step, fraction of the measured bf16 matmul ceiling
    "train_fused_vs_reference": 1.4,     # eager
    "train_fused_vs_peer": 1.5,          # eager
    "infer_vit_l8_crops_per_s": 650.0,
    "embed_fused_vs_peer": 1.2,
    "loader_vs_step": 1.5,               # training loader's crops/s over the fused ViT-L/8 step's (never starved)
}

# presets: (GPU, dry run)
TRAIN_PRESET = ("mae_vit_large_patch8_256", "mae_vit_micro_patch8_256:img_size=64")
CAMAE_PRESET = ("camae_vit_small_patch16_256", "camae_vit_micro_patch16_256:img_size=64")
INFER_PRESETS = (("mae_vit_large_patch8_256", "camae_vit_small_patch16_256"),
                 ("mae_vit_micro_patch8_256:img_size=64", "camae_vit_micro_patch16_256:img_size=64"))
# the loader-vs-step measurement: (generated sites, most batches timed, seconds timed after the first batch)
LOADER_SIZES = ((16, 40, 2.0), (8, 8, 0.5))
DRY_KERNEL_SIZES = bench_ops.Sizes(batch=2, img=64, patch=8, lion_model="mae_vit_micro_patch16_256")
# attention at ViT-L/8 (per crop: heads, query tokens, key tokens, head dim), the batch of the kernel sizes
ATTENTION_SHAPES = (
    (("encoder, training: 25% visible + class token", 16, 257, 257, 64),
     ("encoder, inference: every token + class token", 16, 1025, 1025, 64),
     ("MAE decoder 512x8x16: every token + class token", 16, 1025, 1025, 32)),
    (("encoder, training (toy)", 2, 17, 17, 16),
     ("MAE decoder (toy)", 2, 65, 65, 8)),
)


def pick(pair):
    return pair[1] if DRYRUN else pair[0]


def device() -> torch.device:
    if DRYRUN:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("headline: no CUDA device (set MAE_FAST_GPU_DRYRUN=1 for the CPU dry run)")
    return torch.device("cuda")


def deadline_from(epoch_s: float | None) -> float | None:
    """An absolute wall-clock deadline as a time.monotonic() value."""
    return None if epoch_s is None else time.monotonic() + (epoch_s - time.time())


def new_payload(stage: str, dev: torch.device) -> dict:
    return {"schema": SCHEMA, "stage": stage, "dryrun": DRYRUN, "status": "running",
            "provenance": provenance(dev, " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])),
            "targets": TARGETS}


class Writer:
    """Rewrites the stage's file atomically after every measurement; finish() sets its status and time."""

    def __init__(self, path: str, payload: dict):
        self.path, self.payload, self.t0 = path, payload, time.perf_counter()
        self.save()

    def save(self) -> None:
        self.payload["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        atomic_write_json(self.path, self.payload)

    def finish(self, status: str) -> None:
        self.payload["status"] = status
        self.save()


def run_stage(fn, args) -> int:
    """Run a stage; Ctrl-C / `timeout -s INT` and a spent budget keep what was measured."""
    dev = device()
    writer = Writer(args.out, new_payload(args.stage, dev))
    deadline = deadline_from(args.deadline)
    try:
        fn(writer, dev, deadline)
    except KeyboardInterrupt:
        writer.finish("interrupted")
        return 130
    except BudgetSpent:
        writer.finish("time budget spent")
        return 0
    except Exception as err:  # noqa: BLE001 - recorded in the stage's file, then re-raised for the log
        writer.payload["error"] = f"{type(err).__name__}: {err}"
        writer.finish("error")
        raise
    writer.finish("ok")
    return 0


def _check(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise BudgetSpent


# --------------------------------------------------------------------------------------------------------------
# (a) environment and ceilings
# --------------------------------------------------------------------------------------------------------------

def copy_ceiling(dev: torch.device) -> dict:
    """Device-to-device copy bandwidth (bytes read + written); the dry run copies 16 MiB on the CPU."""
    n = (1 << 22) if DRYRUN else (1 << 30) // 4
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    timing = time_median(lambda: dst.copy_(src), dev, min_time_s=0.2 if DRYRUN else 1.0)
    return {"bytes": 2 * n * 4, "median_s": timing["median_s"], "GBps": 2 * n * 4 / timing["median_s"] / 1e9,
            "timer": timing["timer"]}


def stage_env(writer: Writer, dev: torch.device, deadline) -> None:
    p = writer.payload
    p["python"] = platform.python_version()
    p["packages"] = {name: dist_version(name) for name in
                     ("torch", "triton", "timm", "pytest", "pytest-benchmark", "hypothesis", "tifffile",
                      "imagecodecs", "blosc2", "flash-attn", "safetensors", "numpy")}
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        p["nvidia_smi"] = smi.stdout if smi.returncode == 0 else f"nvidia-smi rc={smi.returncode}"
    except (OSError, subprocess.SubprocessError) as err:
        p["nvidia_smi"] = f"nvidia-smi not run: {err}"
    writer.save()
    _check(deadline)
    p["matmul_ceiling"] = measure_matmul_ceiling(dev, size=256 if DRYRUN else None)
    writer.save()
    _check(deadline)
    p["copy_ceiling"] = copy_ceiling(dev)


# --------------------------------------------------------------------------------------------------------------
# (b) kernels: correctness first, then time and fraction of floor beside the prediction
# --------------------------------------------------------------------------------------------------------------

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def kernel_correctness(op: str, s: bench_ops.Sizes, dev: torch.device, impl: str) -> dict:
    """Max relative error of the fused op against the reference on fresh random inputs at the benchmark sizes
    (outputs and gradients), and whether it is within the op's tolerance."""
    g = torch.Generator().manual_seed(100)
    errors: dict[str, float] = {}
    if op == "masked_patchify":
        images = bench_ops._images(s, dev)
        masking = ops.random_masking(s.batch, s.tokens, s.ratio, device=dev)
        ref = ops.masked_patchify(images, s.patch, s.ratio, masking=masking, impl="reference")
        got = ops.masked_patchify(images, s.patch, s.ratio, masking=masking, impl=impl)
        errors = {"visible": _rel_err(got.visible, ref.visible), "target": _rel_err(got.target, ref.target)}
        tol = 1e-4
    elif op == "unshuffle":
        x, token, pos, ids, grad_out = bench_ops.unshuffle_inputs(s, dev, g)
        outs = {}
        for name in ("reference", impl):
            out = ops.unshuffle(x, token, ids, pos, impl=name, prefix=bench_ops.UNSHUFFLE_PREFIX)
            outs[name] = (out, *torch.autograd.grad(out, (x, token), grad_out))
        errors = {k: _rel_err(a, b) for k, a, b in zip(("out", "grad_x", "grad_token"), outs[impl], outs["reference"])}
        tol = 2e-2  # bf16 tokens and grad_x; float32 out and token gradient (sums in another order)
    elif op == "mae_loss":
        N = s.tokens - s.visible
        pred = torch.randn(s.batch, N, s.token_size, generator=g).to(s.act_dtype).to(dev).requires_grad_()
        target = torch.randn(s.batch, N, s.token_size, generator=g).to(dev)
        outs = {}
        for name in ("reference", impl):
            loss = ops.mae_loss(pred, target, patch_size=s.patch, layout="standard", alpha=0.01, impl=name)
            outs[name] = (loss, *torch.autograd.grad(loss, pred))
        errors = {"loss": _rel_err(outs[impl][0], outs["reference"][0]),
                  "grad": _rel_err(outs[impl][1], outs["reference"][1])}
        tol = 2e-2
    elif op == "lion_update":
        shapes = bench_ops.lion_shapes(s.lion_model)
        gd = torch.Generator(device=dev).manual_seed(101)
        base = [[torch.randn(sh, device=dev, generator=gd) * scale for sh in shapes] for scale in (1.0, 1.0, 0.01)]
        results = {}
        for name in ("reference", impl):
            params, moms = [t.clone() for t in base[0]], [t.clone() for t in base[2]]
            ops.lion_update(params, base[1], moms, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.05, impl=name)
            results[name] = (torch.cat([t.flatten() for t in params]), torch.cat([t.flatten() for t in moms]))
        errors = {"params": _rel_err(results[impl][0], results["reference"][0]),
                  "exp_avg": _rel_err(results[impl][1], results["reference"][1])}
        tol = 1e-5
    else:
        raise ValueError(f"unknown op {op!r}")
    worst = max(errors.values())
    return {"max_rel_err": errors, "tolerance": tol, "ok": worst <= tol}


def load_predictions(path: str = PREDICTIONS) -> list[dict]:
    try:
        with open(path) as f:
            return list(json.load(f).get("kernels") or [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


def prediction_for(op: str, s: bench_ops.Sizes, predictions: list[dict]) -> dict | str:
    """The committed prediction for an op at these sizes (unshuffle: forward + backward), or "no prediction"."""
    size = s.lion_model if op == "lion_update" else f"B{s.batch} p{s.patch}"
    parts = [p for p in predictions if p.get("size") == size and p.get("kernel") == op]
    if not parts:
        parts = [p for p in predictions if p.get("size") == size and str(p.get("kernel", "")).startswith(op + ".")]
    if not parts:
        return "no prediction"
    predicted = sum(p["predicted_s"] for p in parts)
    floor = sum(p["floor_s"] for p in parts)
    return {"kernels": [p["kernel"] for p in parts], "size": size, "predicted_ms": predicted * 1e3,
            "predicted_fraction_of_floor": floor / predicted if predicted else None}


def stage_kernels(writer: Writer, dev: torch.device, deadline) -> None:
    s = DRY_KERNEL_SIZES if DRYRUN else bench_ops.CUDA_SIZES
    p = writer.payload
    p["sizes"] = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in s.__dict__.items()}
    predictions = load_predictions()
    p["predictions_file"] = os.path.relpath(PREDICTIONS, ROOT) if predictions else "no prediction"
    copy = copy_ceiling(dev)
    p["copy_GBps"] = copy["GBps"]
    p["ops"] = []
    writer.save()
    for op in bench_ops.OPS:
        _check(deadline)
        entry = {"op": op, "prediction": prediction_for(op, s, predictions) if not DRYRUN else "no prediction"}
        p["ops"].append(entry)
        fused = bench_ops._fused_name(dev)
        if bench_ops._has_fused(op, dev):
            entry["correctness"] = dict(kernel_correctness(op, s, dev, fused), impl=fused)
        else:
            entry["correctness"] = {"ok": None, "note": f"no {fused} backend of {op} here; reference timed alone"}
        writer.save()
        entry["cases"] = []
        for case in bench_ops.CASE_BUILDERS[op](s, dev):
            _check(deadline)
            timing = time_median(case.run, dev, min_time_s=0.1 if DRYRUN else 1.0)
            entry["cases"].append(dict(bench_ops.summarise(case, timing["median_s"], copy["GBps"] * 1e9),
                                       timer=timing["timer"]))
            writer.save()
        times = {c["impl"]: c["median_ms"] for c in entry["cases"]}
        if "fused" in times:
            entry["fused_vs_reference"] = times["reference"] / times["fused"]
        bench_ops._free(dev)
        writer.save()
    attention_comparison(writer, dev, s.batch, deadline)


def attention_comparison(writer: Writer, dev: torch.device, batch: int, deadline) -> None:
    """SDPA's backends (flash, cuDNN, memory-efficient, math) at the ViT-L/8 attention shapes, forward + backward in
    the training dtype, timed by the cache mae_fast.attention uses to choose one per shape (FlashAttention-4 cannot
    travel to the GPU machine: its CUTLASS DSL wheel exceeds what a run carries), beside SDPA's own choice.
    TFLOP/s count the useful work: 3x the forward's 4*N*M*d per head (the convention of mae_fast.flops)."""
    dtype = torch.float32 if DRYRUN else torch.bfloat16
    min_time = 0.05 if DRYRUN else 0.3

    def timer(fn, device):
        return time_median(fn, device, min_time_s=min_time)["median_s"]

    cache = attention.SDPABackendCache(measured_device_types=(dev.type,), timer=timer)
    p = writer.payload["attention"] = {
        "packages": {"flash_attn_4": attention._fa4_func is not None,
                     "flash_attn": attention._flash_attn_func is not None},
        "dtype": str(dtype).replace("torch.", ""), "batch": batch, "shapes": []}
    g = torch.Generator(device=dev).manual_seed(7)
    for label, heads, n, m, d in pick(ATTENTION_SHAPES):
        _check(deadline)
        q, k, v = (torch.randn(batch, heads, rows, d, device=dev, generator=g, dtype=dtype).requires_grad_()
                   for rows in (n, m, m))
        entry = {"shape": label, "q": list(q.shape), "kv": list(k.shape)}
        p["shapes"].append(entry)
        with torch.enable_grad():
            entry["fastest"] = cache.choose(q, k, v)
        entry["seconds"] = cache.timings[attention.shape_key(q, k, v)]
        useful = 3 * 4 * batch * heads * n * m * d
        entry["tflops"] = {name: useful / t / 1e12 for name, t in entry["seconds"].items() if isinstance(t, float)}

        def own_choice():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out.backward(q.detach())
        try:
            entry["sdpa_own_choice_s"] = timer(own_choice, dev)
            if entry["fastest"]:
                entry["fastest_vs_own_choice"] = entry["sdpa_own_choice_s"] / entry["seconds"][entry["fastest"]]
        except (RuntimeError, torch.OutOfMemoryError) as err:
            entry["sdpa_own_choice_s"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        del q, k, v
        bench_ops._free(dev)
        writer.save()


# --------------------------------------------------------------------------------------------------------------
# (c) the train step, (d) inference, (e) compiled stacks
# --------------------------------------------------------------------------------------------------------------

def settings_for(dev: torch.device, deadline, compile_backend: str | None = None) -> BenchSettings:
    return BenchSettings(device=dev, amp=default_amp(dev), warmup=0 if DRYRUN else 2,
                               iters=1 if DRYRUN else 4, rounds=2 if DRYRUN else 3,
                               compile_backend=compile_backend or ("aot_eager" if DRYRUN else "inductor"),
                               deadline=deadline)


def _stacks(names: list[str], cfg) -> list[Stack]:
    out = []
    for name in names:
        stack = STACKS[name]
        if stack.peer and (cfg.channel_agnostic or not peer.timm_available()):
            continue  # the peer is the standard MAE on timm
        out.append(stack)
    return out


def ratio(ratios: list[dict], num: str, den: str) -> float | None:
    for r in ratios:
        if r["numerator"] == num and r["denominator"] == den:
            return r["ratio_median"]
    return None


def with_target(value, target: float) -> dict:
    verdict = None if value is None else ("met" if value >= target else "not met")
    return {"value": value, "target": target, "verdict": verdict}


def compare(writer: Writer, kind: str, label: str, stack_names: list[str], settings, ceiling_tflops, batch=None):
    cfg = parse_preset(label)
    stacks = _stacks(stack_names, cfg)
    entry = {"kind": kind, "preset": label, "stacks": [s.name for s in stacks]}
    writer.payload.setdefault("comparisons", []).append(entry)
    if batch is None:
        if kind == "train":
            estimate = estimate_train_batch(cfg, stacks, settings)
            entry["batch_estimate"] = estimate
            batch = estimate["batch"]
        else:
            batch = default_batch(cfg, settings.device, kind)
    entry["batch"] = batch
    writer.save()
    records, ratios, stopped = compare_stacks(kind, label, cfg, stacks, batch, settings, ceiling_tflops)
    entry.update(records=records, ratios=ratios)
    writer.save()
    if stopped:
        raise BudgetSpent
    return entry


def _ceiling(dev: torch.device) -> dict:
    return measure_matmul_ceiling(dev, size=256 if DRYRUN else None)


def stage_train(writer: Writer, dev: torch.device, deadline) -> None:
    settings = settings_for(dev, deadline)
    ceiling = writer.payload["ceiling"] = _ceiling(dev)
    label = pick(TRAIN_PRESET)
    entry = compare(writer, "train", label, ["fused", "reference", "peer"], settings, ceiling["tflops"])
    ok = {r["stack"]: r for r in entry["records"] if r.get("status") == "ok"}
    fused = ok.get("fused")
    writer.payload["headline"] = {
        "preset": label,
        "fused_crops_per_s": fused["crops_per_s"] if fused else None,
        "mfu": with_target(fused.get("mfu") if fused else None, TARGETS["train_mfu"]),
        "fused_vs_reference": with_target(ratio(entry["ratios"], "fused", "reference"),
                                          TARGETS["train_fused_vs_reference"]),
        "fused_vs_peer": with_target(ratio(entry["ratios"], "fused", "peer"), TARGETS["train_fused_vs_peer"]),
    }
    if fused and not DRYRUN:
        paper = flops.paper_run_summary()
        writer.payload["headline"]["device_hours_for_paper_crops"] = flops.gpu_hours_for(
            paper["crops"], fused["crops_per_s"])
    writer.save()
    writer.payload["attention_choices"] = attention.sdpa_cache.report()  # the fused stack's measured choices
    writer.save()
    loader = loader_vs_step(writer, dev, deadline, label, entry["batch"], fused["crops_per_s"] if fused else None)
    writer.payload["headline"]["loader_vs_step"] = loader["loader_vs_step"]
    writer.save()
    # CA-MAE ViT-S/16 (OpenPhenom's architecture) beside it, at the same per-step budget
    compare(writer, "train", pick(CAMAE_PRESET), ["fused", "reference"], settings, ceiling["tflops"])
    writer.payload["attention_choices"] = attention.sdpa_cache.report()


def loader_vs_step(writer: Writer, dev: torch.device, deadline, label: str, batch: int,
                   step_crops_per_s: float | None, sizes: tuple[int, int, float] | None = None) -> dict:
    """The data path beside the train step: a few sites of the synthetic screen at the preset's crop size, packed
    uncompressed (codec "raw": no blosc2/imagecodecs needed), read by the crop stream `mae-fast train` builds
    (bench_data.train_stream: its crops per site, shuffle window and workers; micro-batch = the step's batch;
    pinned batches copied to the device), timed until the batches are on the device (steady state: from the first
    batch to the last). The few sites repeat (as other site numbers: their own crops and flips) so one epoch covers
    the measurement. Written as payload["loader"], the ratio beside its target."""
    _check(deadline)
    unique, max_batches, seconds = sizes or pick(LOADER_SIZES)
    cfg = parse_preset(label)
    entry = writer.payload["loader"] = {"preset": label, "batch": batch, "crop": cfg.img_size, "channels": cfg.in_chans,
                                        "codec": "raw", "generated_sites": unique, "status": "running"}
    writer.save()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pack_dir = bench_data.synthetic_pack(tmp, cfg.img_size, cfg.in_chans, unique, workers=default_workers(16))
        entry["screen_and_pack_s"] = time.perf_counter() - t0
        writer.save()
        _check(deadline)
        stream, index, loader = bench_data.train_stream(pack_dir, label, batch, dev,
                                                        epoch_crops=(max_batches + 1) * batch)
        try:
            timing = bench_data.time_batches(iter(stream.next, None), dev, max_batches=max_batches,
                                             min_seconds=seconds)
        finally:
            stream.close()
    rate = timing["steady_crops_per_s"]
    value = rate / step_crops_per_s if step_crops_per_s and rate == rate else None  # rate == rate: not NaN
    entry.update(
        status="ok", sites_in_epoch=len(index), site_repeats=len(index) // unique, crops_per_image=loader.k,
        shuffle_sites=loader.shuffle_sites, workers=loader.num_workers, backend=loader.backend,
        pinned=dev.type == "cuda", device=str(dev), cpu_cores=os.cpu_count(), timing=timing,
        loader_crops_per_s=rate, step_crops_per_s=step_crops_per_s,
        loader_vs_step=with_target(value, TARGETS["loader_vs_step"]),
        note=f"{unique} generated sites, each listed {len(index) // unique} times in the index (own crops and "
             "flips, same pixels) so one epoch covers the measurement; step: the fused stack's eager train step "
             "at the same batch, measured just before in this stage")
    writer.save()
    return entry


def stage_infer(writer: Writer, dev: torch.device, deadline) -> None:
    settings = settings_for(dev, deadline)
    ceiling = writer.payload["ceiling"] = _ceiling(dev)
    headline = writer.payload["headline"] = {}
    for label in pick(INFER_PRESETS):
        entry = compare(writer, "inference", label, ["fused", "peer"], settings, ceiling["tflops"])
        ok = {r["stack"]: r for r in entry["records"] if r.get("status") == "ok"}
        crops = ok["fused"]["crops_per_s"] if "fused" in ok else None
        headline[label] = {"fused_crops_per_s": crops}
        if "peer" in entry["stacks"]:
            headline[label]["fused_vs_peer"] = with_target(ratio(entry["ratios"], "fused", "peer"),
                                                           TARGETS["embed_fused_vs_peer"])
        if label == INFER_PRESETS[0][0]:
            headline[label]["crops_per_s_target"] = with_target(crops, TARGETS["infer_vit_l8_crops_per_s"])
        writer.save()


def stage_compiled(writer: Writer, dev: torch.device, deadline) -> None:
    """Regional compilation (each block compiled, `mae_fast.compiling`) of the three stacks on the train preset."""
    settings = settings_for(dev, deadline)
    ceiling = writer.payload["ceiling"] = _ceiling(dev)
    label = pick(TRAIN_PRESET)
    train_json = os.path.join(os.path.dirname(os.path.abspath(writer.path)), "train.json")
    batch = None
    try:  # the eager stage's estimate: the same batch, no second estimate
        with open(train_json) as f:
            batch = json.load(f)["comparisons"][0]["batch"]
    except (OSError, KeyError, IndexError, json.JSONDecodeError):
        pass
    writer.payload["compilation"] = "regional: each transformer block compiled (mae_fast.compiling.compile_blocks)"
    entry = compare(writer, "train", label, ["fused_compiled", "reference_compiled", "peer_compiled"], settings,
                    ceiling["tflops"], batch=batch)
    writer.payload["headline"] = {
        "fused_compiled_vs_reference_compiled": ratio(entry["ratios"], "fused_compiled", "reference_compiled"),
        "fused_compiled_vs_peer_compiled": with_target(ratio(entry["ratios"], "fused_compiled", "peer_compiled"),
                                                       TARGETS["train_fused_vs_peer"]),
    }


# --------------------------------------------------------------------------------------------------------------
# (f) the GPU pytest suites
# --------------------------------------------------------------------------------------------------------------

def stage_tests(writer: Writer, dev: torch.device, deadline) -> None:
    """pytest -m "gpu or triton" tests/ in a subprocess (its own time limit from the deadline), summarised from
    its JUnit XML. The dry run only collects (the Triton tests run in the interpreter on a CPU: minutes)."""
    left = None if deadline is None else deadline - time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu or triton", "tests/", "-q", "-p", "no:cacheprovider",
               "-rs", f"--junitxml={xml_path}"] + (["--collect-only"] if DRYRUN else [])
        writer.payload["command"] = " ".join(cmd)
        writer.save()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            rc, out = "timeout", (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) \
                else (err.stdout or "")
        print(out[-20000:])
        writer.payload["rc"] = rc
        writer.payload["output_tail"] = out[-4000:]
        writer.payload["summary"] = junit_summary(xml_path) if os.path.exists(xml_path) else None
        # what pytest selected ("N/M tests collected"): the dry run's JUnit XML counts no test, it runs none
        found = re.search(r"(\d+)(?:/\d+)? tests? collected", out)
        writer.payload["collected"] = int(found.group(1)) if found else 0


def junit_summary(path: str) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failed"] = failed
    return counts


# --------------------------------------------------------------------------------------------------------------
# results.md
# --------------------------------------------------------------------------------------------------------------

FILES = ("env.json", "kernels.json", "train.json", "inference.json", "compiled.json", "tests.json")


def _fmt(v, pct=False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _target_cell(t: dict | None, pct=False) -> str:
    if not t:
        return "-"
    return f"{_fmt(t['value'], pct)} (target >= {_fmt(t['target'], pct)}: {t['verdict'] or 'not measured'})"


def render(folder: str) -> str:
    data = {}
    for name in FILES:
        try:
            with open(os.path.join(folder, name)) as f:
                data[name] = json.load(f)
        except (OSError, json.JSONDecodeError):
            data[name] = None
    lines = ["# mae_fast GPU headline", ""]
    any_payload = next((d for d in data.values() if d), None)
    if any_payload:
        prov = any_payload["provenance"]
        git = prov["git"]
        lines += [f"device {prov['device']}, torch {prov['torch']}, triton {prov['triton']}, commit "
                  f"{git['commit']} (from {git['source']}, dirty: {git['dirty']}), {prov['date']}"
                  + (" — DRY RUN on the CPU at toy sizes: " + NOT_MEASURED if any_payload.get("dryrun") else ""), ""]
    lines += ["| stage | status | seconds |", "| --- | --- | --- |"]
    for name in FILES:
        d = data[name]
        lines.append(f"| {name} | {d['status'] if d else 'missing'} | {d.get('elapsed_s', '-') if d else '-'} |")
    env = data["env.json"]
    if env and env.get("matmul_ceiling"):
        c = env["matmul_ceiling"]
        copy = env.get("copy_ceiling") or {}
        lines += ["", f"Ceilings: matmul {c['tflops']:.4g} TFLOP/s ({c['dtype']} {c['shape'][0]}^3), copy "
                      f"{_fmt(copy.get('GBps'))} GB/s"]
    train = data["train.json"]
    if train and train.get("headline"):
        h = train["headline"]
        lines += ["", f"## Train step {h['preset']} (eager)", "",
                  f"- fused crops/s: {_fmt(h['fused_crops_per_s'])}; MFU {_target_cell(h['mfu'], pct=True)}",
                  f"- fused / reference: {_target_cell(h['fused_vs_reference'])}",
                  f"- fused / peer: {_target_cell(h['fused_vs_peer'])}"]
    loader = (train or {}).get("loader")
    if loader and loader.get("status") == "ok":
        lines.append(f"- data path ({loader['preset']}, batch {loader['batch']}): {_fmt(loader['loader_crops_per_s'])} "
                     f"crops/s to {loader['device']} ({loader['backend']} loader, {loader['workers']} workers, "
                     f"{loader['generated_sites']} synthetic sites x{loader['site_repeats']}, {loader['codec']} pack"
                     f"{', pinned' if loader['pinned'] else ''}) vs the fused step's "
                     f"{_fmt(loader['step_crops_per_s'])}: loader / step {_target_cell(loader['loader_vs_step'])}")
    for name in ("train.json", "inference.json", "compiled.json"):
        d = data[name]
        for entry in (d or {}).get("comparisons", []):
            lines += ["", f"### {entry['kind']} {entry['preset']} batch {entry['batch']} ({name})", "",
                      "| stack | status | crops/s | MFU | peak mem GiB |", "| --- | --- | --- | --- | --- |"]
            for r in entry.get("records", []):
                mem = r.get("peak_mem_bytes")
                lines.append(f"| {r['stack']} | {r['status']} | {_fmt(r.get('crops_per_s'))} | "
                             f"{_fmt(r.get('mfu'), pct=True)} | {_fmt(mem / 2**30 if mem else None)} |")
            for r in entry.get("ratios", []):
                lines.append(f"\n{r['numerator']} / {r['denominator']}: {r['ratio_median']:.3f} "
                             f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]")
    inf = data["inference.json"]
    for label, h in ((inf or {}).get("headline") or {}).items():
        lines.append(f"\n- embed {label}: {_fmt(h['fused_crops_per_s'])} crops/s"
                     + (f"; vs target {_target_cell(h['crops_per_s_target'])}" if "crops_per_s_target" in h else "")
                     + (f"; fused / peer {_target_cell(h['fused_vs_peer'])}" if "fused_vs_peer" in h else ""))
    kern = data["kernels.json"]
    if kern and kern.get("ops"):
        lines += ["", "## Kernels (correctness first, then time)", "",
                  "| op | correct | impl | median ms | of floor | predicted of floor |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for e in kern["ops"]:
            pred = e.get("prediction")
            pred_cell = _fmt(pred.get("predicted_fraction_of_floor"), pct=True) if isinstance(pred, dict) else pred
            ok = (e.get("correctness") or {}).get("ok")
            for c in e.get("cases", []):
                lines.append(f"| {e['op']} | {ok} | {c['impl']} | {c['median_ms']:.4g} | "
                             f"{100 * c['fraction_of_floor']:.1f}% | {pred_cell if c['impl'] == 'fused' else ''} |")
    att = (kern or {}).get("attention")
    if att and att.get("shapes"):
        names = list(attention.SDPA_BACKENDS)
        lines += ["", f"## Attention: SDPA backends, forward + backward, {att['dtype']}, batch {att['batch']} "
                      f"(FlashAttention-4 installed: {att['packages']['flash_attn_4']})", "",
                  "| shape | q | " + " | ".join(f"{n} ms (TFLOP/s)" for n in names)
                  + " | SDPA's own ms | fastest | fastest / own |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- |"]
        for e in att["shapes"]:
            cells = []
            for n in names:
                t = e["seconds"].get(n)
                cells.append(f"{1e3 * t:.4g} ({_fmt(e['tflops'][n])})" if isinstance(t, float) else "n/a")
            own = e.get("sdpa_own_choice_s")
            lines.append(f"| {e['shape']} | {'x'.join(map(str, e['q']))} | " + " | ".join(cells)
                         + f" | {_fmt(1e3 * own) if isinstance(own, float) else 'n/a'} | {e['fastest']} | "
                         f"{_fmt(e.get('fastest_vs_own_choice'))} |")
    tests = data["tests.json"]
    if tests and tests.get("summary"):
        s = tests["summary"]
        lines += ["", f"GPU tests: {s['tests']} tests, {s['failures']} failures, {s['errors']} errors, "
                      f"{s['skipped']} skipped (rc {tests.get('rc')})"] + [f"- FAILED {n}" for n in s["failed"]]
    return "\n".join(lines) + "\n"


STAGES = {"env": stage_env, "kernels": stage_kernels, "train": stage_train, "infer": stage_infer,
          "compiled": stage_compiled, "tests": stage_tests}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=list(STAGES) + ["render"])
    parser.add_argument("--out", help="the stage's JSON file")
    parser.add_argument("--dir", help="render: the folder holding the stage files (results.md is written there)")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds; no measurement starts later")
    args = parser.parse_args(argv)
    if args.stage == "render":
        if not args.dir:
            parser.error("render needs --dir")
        text = render(args.dir)
        with open(os.path.join(args.dir, "results.md"), "w") as f:
            f.write(text)
        print(text)
        return 0
    if not args.out:
        parser.error(f"{args.stage} needs --out")
    if DRYRUN:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    return run_stage(STAGES[args.stage], args)


if __name__ == "__main__":
    sys.exit(main())
