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
import platform
import re
import signal
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
from mae_fast.perf import faults, flops  # noqa: E402
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
DRY_KERNEL_SIZES = bench_ops.TOY_SIZES  # batch 2, 64 px, patch 8, Lion over the micro MAE
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


class StageSkipped(Exception):
    """The stage decided not to run (its reason is the status)."""


SIGTERM_RECEIVED = []  # a SIGTERM arrived (turned into KeyboardInterrupt: every stage keeps what it measured)


def _sigterm_as_interrupt(signum, frame):
    SIGTERM_RECEIVED.append(time.time())
    raise KeyboardInterrupt("SIGTERM")


def run_stage(fn, args) -> int:
    """Run a stage; Ctrl-C / `timeout -s INT` / SIGTERM and a spent budget keep what was measured."""
    dev = device()
    faults.set_stage(args.stage)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    writer = Writer(args.out, new_payload(args.stage, dev))
    deadline = deadline_from(args.deadline)
    try:
        fn(writer, dev, deadline)
    except KeyboardInterrupt:
        writer.finish("interrupted (SIGTERM)" if SIGTERM_RECEIVED else "interrupted")
        return 130
    except BudgetSpent:
        writer.finish("time budget spent")
        return 0
    except StageSkipped as why:
        writer.finish(str(why))
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
        ref = bench_ops.patchify_as_trained(images, s, masking, "reference")
        got = bench_ops.patchify_as_trained(images, s, masking, impl)
        errors = {"visible": _rel_err(got.visible, ref.visible), "target": _rel_err(got.target, ref.target)}
        # bf16 visible tokens: the same float32 value rounded, at most one bf16 ulp apart (2^-7 of the largest)
        tol = 1e-4 if s.act_dtype == torch.float32 else 1e-2
    elif op == "unshuffle":
        x, token, pos, ids, grad_out = bench_ops.unshuffle_inputs(s, dev, g)
        outs = {}
        for name in ("reference", impl):
            out = ops.unshuffle(x, token, ids, pos, impl=name, prefix=bench_ops.UNSHUFFLE_PREFIX)
            outs[name] = (out, *torch.autograd.grad(out, (x, token), grad_out))
        errors = {k: _rel_err(a, b) for k, a, b in zip(("out", "grad_x", "grad_token"), outs[impl], outs["reference"])}
        tol = 2e-2  # bf16 tokens and grad_x; float32 out and token gradient (sums in another order)
    elif op == "mae_loss":  # as the train step runs it: the full prediction, the masked rows' loss
        pred, target, masking = bench_ops.mae_loss_inputs(s, dev, g)
        outs = {}
        for name in ("reference", impl):
            loss = ops.masked_mae_loss(pred, target, masking, patch_size=s.patch, layout="standard", alpha=0.01,
                                       impl=name)
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


# the prediction describing the work each bench_ops case does: the loss case runs ops.masked_mae_loss on the full
# prediction, as the train step does (not ops.mae_loss with a torch gather and scatter around it)
PREDICTED_KERNEL = {"mae_loss": "mae_loss.full_prediction"}


def prediction_for(op: str, s: bench_ops.Sizes, predictions: list[dict]) -> dict | str:
    """The committed prediction for an op at these sizes (unshuffle: forward + backward), or "no prediction"."""
    size = s.lion_model if op == "lion_update" else f"B{s.batch} p{s.patch}"
    kernel = PREDICTED_KERNEL.get(op, op)
    parts = [p for p in predictions if p.get("size") == size and p.get("kernel") == kernel]
    if not parts and kernel == op:
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
        try:  # each op fails alone: its error recorded, the next op measured
            measure_op(entry, op, s, dev, copy, writer, deadline)
        except (BudgetSpent, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - recorded in kernels.json and results.md
            entry["error"] = _short_error(err)
            print(f"headline: kernel {op} failed: {entry['error']}", file=sys.stderr)
        bench_ops._free(dev)
        writer.save()
    attention_comparison(writer, dev, s.batch, deadline)


def _short_error(err: BaseException) -> str:
    first = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def measure_op(entry: dict, op: str, s, dev: torch.device, copy: dict, writer: Writer, deadline) -> None:
    """One op's correctness then its cases' times into `entry`; a case that fails is recorded and the rest timed."""
    faults.point(op)
    fused = bench_ops._fused_name(dev)
    if bench_ops._has_fused(op, dev):
        entry["correctness"] = dict(kernel_correctness(op, s, dev, fused), impl=fused)
    else:
        entry["correctness"] = {"ok": None, "note": f"no {fused} backend of {op} here; reference timed alone"}
    writer.save()
    entry["cases"] = []
    for case in bench_ops.CASE_BUILDERS[op](s, dev):
        _check(deadline)
        try:
            timing = time_median(case.run, dev, min_time_s=0.1 if DRYRUN else 1.0)
        except (BudgetSpent, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - this case fails alone
            entry["cases"].append({"impl": case.impl, "error": _short_error(err)})
            continue
        entry["cases"].append(dict(bench_ops.summarise(case, timing["median_s"], copy["GBps"] * 1e9),
                                   timer=timing["timer"]))
        writer.save()
    times = {c["impl"]: c["median_ms"] for c in entry["cases"] if "median_ms" in c}
    if "fused" in times and "reference" in times:
        entry["fused_vs_reference"] = times["reference"] / times["fused"]


def attention_shape(entry: dict, cache, q, k, v, bhnmd: int, timer, dev: torch.device) -> None:
    with torch.enable_grad():
        entry["fastest"] = cache.choose(q, k, v)
    entry["seconds"] = cache.timings[attention.shape_key(q, k, v)]
    useful = 3 * 4 * bhnmd
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
        try:  # each shape fails alone
            faults.point("attention")
            attention_shape(entry, cache, q, k, v, batch * heads * n * m * d, timer, dev)
        except (BudgetSpent, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - recorded in kernels.json and results.md
            entry["error"] = _short_error(err)
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


def compare(writer: Writer, kind: str, label: str, stack_names: list[str], settings, ceiling_tflops, batch=None,
            on_progress=None, build_seconds=None) -> dict:
    """One preset's comparison, written into payload["comparisons"] as it goes; it fails alone: an error before
    the stacks are timed (the preset, the batch estimate) is recorded in the entry ("status": "error") and the
    stage goes on. `on_progress(entry)` runs after every warmed stack and every round (a headline kept current).
    A spent budget or an interrupt ends the stage (raised) after the entry is written."""
    entry = {"kind": kind, "preset": label, "status": "running"}
    writer.payload.setdefault("comparisons", []).append(entry)

    def progress(records, ratios):
        entry.update(records=records, ratios=ratios)
        if on_progress is not None:
            on_progress(entry)
        writer.save()

    try:
        faults.point(label)
        cfg = parse_preset(label)
        stacks = _stacks(stack_names, cfg)
        entry["stacks"] = [s.name for s in stacks]
        if batch is None:
            if kind == "train":
                estimate = estimate_train_batch(cfg, stacks, settings)
                entry["batch_estimate"] = estimate
                batch = estimate["batch"]
            else:
                batch = default_batch(cfg, settings.device, kind)
        entry["batch"] = batch
        writer.save()
        records, ratios, stopped = compare_stacks(kind, label, cfg, stacks, batch, settings, ceiling_tflops,
                                                  progress=progress, build_seconds=build_seconds)
    except BudgetSpent:
        entry["status"] = "time budget spent"
        writer.save()
        raise
    except KeyboardInterrupt:
        entry["status"] = "interrupted"
        writer.save()
        raise
    except Exception as err:  # noqa: BLE001 - this preset fails alone; recorded, the stage goes on
        entry.update(status="error", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
        print(f"headline: {kind} {label} failed: {entry['error']}", file=sys.stderr)
        writer.save()
        return entry
    entry["status"] = stopped or "ok"
    progress(records, ratios)
    if stopped == "interrupted":
        raise KeyboardInterrupt
    if stopped:
        raise BudgetSpent
    return entry


def _ceiling(dev: torch.device, settings: BenchSettings | None = None) -> dict:
    """The matmul ceiling in the run's compute dtype (the autocast dtype, else fp32), so MFU compares like with
    like (on a CPU too)."""
    amp = settings.amp if settings is not None else default_amp(dev)
    return measure_matmul_ceiling(dev, size=256 if DRYRUN else None, dtype=amp or torch.float32)


def _records(entry: dict) -> dict:
    return {r["stack"]: r for r in entry.get("records") or [] if r.get("status") == "ok"}


def train_headline(writer: Writer, label: str, entry: dict) -> None:
    """The train stage's headline from whatever the comparison has measured so far (rewritten after every stack and
    round, so a stage cut short keeps one)."""
    fused = _records(entry).get("fused")
    ratios = entry.get("ratios") or []
    head = writer.payload.setdefault("headline", {})
    head.update({
        "preset": label,
        "fused_crops_per_s": fused["crops_per_s"] if fused else None,
        "mfu": with_target(fused.get("mfu") if fused else None, TARGETS["train_mfu"]),
        "mfu_datasheet": fused.get("mfu_datasheet") if fused else None,
        "fused_vs_reference": with_target(ratio(ratios, "fused", "reference"), TARGETS["train_fused_vs_reference"]),
        "fused_vs_peer": with_target(ratio(ratios, "fused", "peer"), TARGETS["train_fused_vs_peer"]),
    })
    if fused and not DRYRUN:
        paper = flops.paper_run_summary()
        head["device_hours_for_paper_crops"] = flops.gpu_hours_for(paper["crops"], fused["crops_per_s"])


def stage_train(writer: Writer, dev: torch.device, deadline) -> None:
    settings = settings_for(dev, deadline)
    ceiling = writer.payload["ceiling"] = _ceiling(dev, settings)
    label = pick(TRAIN_PRESET)
    train_headline(writer, label, {})
    writer.save()
    entry = compare(writer, "train", label, ["fused", "reference", "peer"], settings, ceiling["tflops"],
                    on_progress=lambda e: train_headline(writer, label, e))
    writer.payload["attention_choices"] = attention.sdpa_cache.report()  # the fused stack's measured choices
    writer.save()
    fused = _records(entry).get("fused")
    try:
        loader = loader_vs_step(writer, dev, deadline, label, entry.get("batch") or 2,
                                fused["crops_per_s"] if fused else None)
        writer.payload["headline"]["loader_vs_step"] = loader["loader_vs_step"]
    except (BudgetSpent, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - the loader fails alone; recorded, CA-MAE still measured
        loader = writer.payload.setdefault("loader", {})
        loader.update(status="error", error=f"{type(err).__name__}: {err}"[:300])
        print(f"headline: loader failed: {loader['error']}", file=sys.stderr)
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
    faults.point("loader")
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
             "at the same batch, measured just before in this stage",
        bound="upper bound: uncompressed (raw) packs, sites cached by the OS and repeated; a real screen adds "
              "decompression and cold reads")
    writer.save()
    return entry


def stage_infer(writer: Writer, dev: torch.device, deadline) -> None:
    settings = settings_for(dev, deadline)
    ceiling = writer.payload["ceiling"] = _ceiling(dev, settings)
    headline = writer.payload["headline"] = {}

    def infer_headline(label, entry):
        ok = _records(entry)
        crops = ok["fused"]["crops_per_s"] if "fused" in ok else None
        headline[label] = {"fused_crops_per_s": crops}
        if "peer" in (entry.get("stacks") or []):
            headline[label]["fused_vs_peer"] = with_target(ratio(entry.get("ratios") or [], "fused", "peer"),
                                                           TARGETS["embed_fused_vs_peer"])
        if label == INFER_PRESETS[0][0]:
            headline[label]["crops_per_s_target"] = with_target(crops, TARGETS["infer_vit_l8_crops_per_s"])

    for label in pick(INFER_PRESETS):
        compare(writer, "inference", label, ["fused", "peer"], settings, ceiling["tflops"],
                on_progress=lambda e, label=label: infer_headline(label, e))
        writer.save()


# Seconds to build and warm one regionally compiled stack of a preset from a cold cache (Dynamo + the backend +
# the first steps), per stack. The compiled stage is skipped (reason recorded) when less than the fused stack's
# number is left, and each stack is skipped when less than its own is left. Where the numbers come from:
#   mae_vit_large_patch8_256 (inductor, GPU): from the CPU's cold compile at ViT-L/8 widths with aot_eager
#       (benchmarks/results/compile_time_vitl8_cpu.json, `python benchmarks/compile_time.py`): 8.6 s for mae_fast's
#       2 graphs (one per block type; the reference stack compiles the same model), 22.8 s when it was 25 graphs --
#       which is what the peer compiles (timm keeps each block's drop-path rate as a Python float: 24 encoder graphs +
#       the decoder's). Inductor's code generation on top is NOT measured (no GPU): budgeted at ~25 s per graph
#       (forward + backward), so fused/reference ~60 s and the peer ~240 s (when less is left the peer alone is
#       skipped, its reason recorded); the GPU run's own first_step_s replaces these.
#   mae_vit_micro_patch8_256:img_size=64 (aot_eager, CPU dry run): first_step_s 7.5 s (fused), 2.1 s (reference),
#       2.1 s (peer) measured on the shared, loaded 2-core machine at 1adef0f+issue-23 with
#       `MAE_FAST_GPU_DRYRUN=1 STAGES=compiled bash benchmarks/gpu.sh OUT`, rounded up to 10 s each.
COLD_COMPILE_S = {
    "mae_vit_large_patch8_256": {"fused_compiled": 60.0, "reference_compiled": 60.0, "peer_compiled": 240.0},
    "mae_vit_micro_patch8_256:img_size=64": {"fused_compiled": 10.0, "reference_compiled": 10.0,
                                             "peer_compiled": 10.0},
}
COMPILED_STACKS = ["fused_compiled", "reference_compiled", "peer_compiled"]


def compiled_budget_reason(label: str, seconds_left: float | None) -> str | None:
    """Why the compiled stage cannot start with `seconds_left` (None: no deadline), or None when it can: it needs
    at least the fused stack's cold compile estimate (COLD_COMPILE_S; a preset not in the table: no limit)."""
    need = COLD_COMPILE_S.get(label, {}).get("fused_compiled")
    if need is None or seconds_left is None or seconds_left >= need:
        return None
    return (f"skipped: the fused stack's cold compile takes ~{need:.0f} s (COLD_COMPILE_S), "
            f"{max(0.0, seconds_left):.0f} s of the stage left")


def eager_batch(train_json: str) -> int | None:
    """The batch of the eager train stage's first comparison, None when it has none (stopped before its batch was
    known, failed, or the file is missing)."""
    try:
        with open(train_json) as f:
            batch = json.load(f)["comparisons"][0].get("batch")
    except (OSError, KeyError, IndexError, TypeError, AttributeError, json.JSONDecodeError):
        return None
    return batch if isinstance(batch, int) and batch > 0 else None


def stage_compiled(writer: Writer, dev: torch.device, deadline) -> None:
    """Regional compilation (each block compiled, `mae_fast.compiling`) of the three stacks on the train preset,
    inside its time: skipped (reason recorded) when the cold compile estimate does not fit what is left."""
    label = pick(TRAIN_PRESET)
    left = None if deadline is None else deadline - time.monotonic()
    reason = compiled_budget_reason(label, left)
    writer.payload["cold_compile_estimate_s"] = COLD_COMPILE_S.get(label)
    if reason:
        writer.payload["skipped"] = reason
        raise StageSkipped(reason)
    settings = settings_for(dev, deadline)
    ceiling = writer.payload["ceiling"] = _ceiling(dev, settings)
    # the eager stage's estimate: the same batch, no second estimate; without one, this stage estimates its own
    batch = eager_batch(os.path.join(os.path.dirname(os.path.abspath(writer.path)), "train.json"))
    writer.payload["batch_source"] = "train.json" if batch else "own estimate (train.json has no batch)"
    writer.payload["compilation"] = "regional: each transformer block compiled (mae_fast.compiling.compile_blocks)"

    def compiled_headline(entry):
        ratios = entry.get("ratios") or []
        writer.payload["headline"] = {
            "fused_compiled_vs_reference_compiled": ratio(ratios, "fused_compiled", "reference_compiled"),
            "fused_compiled_vs_peer_compiled": with_target(ratio(ratios, "fused_compiled", "peer_compiled"),
                                                           TARGETS["train_fused_vs_peer"]),
        }

    compare(writer, "train", label, COMPILED_STACKS, settings, ceiling["tflops"], batch=batch,
            on_progress=compiled_headline, build_seconds=COLD_COMPILE_S.get(label))


# --------------------------------------------------------------------------------------------------------------
# (f) the GPU pytest suites
# --------------------------------------------------------------------------------------------------------------

# the kernels the headline ran, in the order their tests run first (node ids naming them), before the rest of the
# GPU tests (the slow ones, such as a ViT-L build, last): a stage cut by its time keeps what matters most
TEST_FIRST = ("masked_patchify", "unshuffle", "masked_mae_loss", "mae_loss", "lion", "attention")


def tests_by_file(progress_path: str) -> dict:
    """{"collected": n, "finished": n, "files": {file: {outcome: count}}, "failed": [node ids], "run_order_head": the
    first 10 node ids in run order} from the progress plugin's lines
    (benchmarks/pytest_progress.py), whatever pytest managed to finish."""
    collected, first, files, failed = 0, [], {}, []
    try:
        with open(progress_path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        lines = []
    for line in lines:
        if "collected" in line:
            collected, first = len(line["collected"]), line["collected"][:10]
            continue
        path = line["nodeid"].split("::")[0]
        counts = files.setdefault(path, {})
        counts[line["outcome"]] = counts.get(line["outcome"], 0) + 1
        if line["outcome"] == "failed":
            failed.append(line["nodeid"])
    finished = sum(sum(c.values()) for c in files.values())
    return {"collected": collected, "finished": finished, "files": files, "failed": failed, "run_order_head": first}


def stage_tests(writer: Writer, dev: torch.device, deadline, selection: list[str] | None = None,
                cwd: str = ROOT) -> None:
    """pytest -m "gpu or triton" tests/ in a subprocess, the headline's kernels' tests first, each finished test
    appended to a progress file (benchmarks/pytest_progress.py) that is summarised per file into tests.json every few
    seconds; at the deadline pytest gets SIGINT (it writes its JUnit XML), then SIGKILL, and what finished is kept.
    The dry run only collects (the Triton tests run in the interpreter on a CPU: minutes)."""
    faults.point("tests")
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = os.path.join(tmp, "junit.xml")
        progress = os.path.join(tmp, "progress.jsonl")
        cmd = [sys.executable, "-m", "pytest", "-p", "pytest_progress", "-q", "-p", "no:cacheprovider", "-rs",
               f"--junitxml={xml_path}"] + (selection or ["-m", "gpu or triton", "tests/"]) \
            + (["--collect-only"] if DRYRUN else [])
        env = dict(os.environ, MAE_FAST_TEST_PROGRESS=progress, MAE_FAST_TEST_FIRST=",".join(TEST_FIRST),
                   PYTHONPATH=os.pathsep.join(filter(None, [HERE, ROOT, os.environ.get("PYTHONPATH")])))
        p = writer.payload
        p.update(command=" ".join(cmd), run_first=list(TEST_FIRST))
        writer.save()
        out_path = os.path.join(tmp, "output.txt")
        with open(out_path, "w") as out_file:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=out_file, stderr=subprocess.STDOUT, env=env)
            rc, interrupted = None, None
            try:
                while rc is None:
                    try:
                        rc = proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        p["progress"] = tests_by_file(progress)
                        writer.save()
                        if deadline is not None and time.monotonic() > deadline:
                            p["stopped"] = "time limit: pytest interrupted, the tests that finished are kept"
                            rc = _stop(proc)
            except KeyboardInterrupt as err:  # the stage's own limit: pytest does not outlive it, results kept
                interrupted = err
                p["stopped"] = "stage interrupted: pytest stopped, the tests that finished are kept"
                rc = _stop(proc)
        with open(out_path, errors="replace") as f:
            out = f.read()
        print(out[-20000:])
        p["rc"] = rc
        p["output_tail"] = out[-4000:]
        p["progress"] = tests_by_file(progress)
        p["summary"] = junit_summary(xml_path) if os.path.exists(xml_path) else None
        # what pytest selected ("N/M tests collected"): the dry run's JUnit XML counts no test, it runs none
        found = re.search(r"(\d+)(?:/\d+)? tests? collected", out)
        p["collected"] = int(found.group(1)) if found else p["progress"]["collected"]
    if interrupted is not None:
        raise interrupted


def _stop(proc: subprocess.Popen) -> int | str:
    """SIGINT (pytest ends the session and writes its report), SIGKILL 4 s later (gpu.sh leaves 8 s of margin)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=4)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "killed at the time limit"
    return "interrupted at the time limit"


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
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    return f"{100 * v:.1f}%" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _target_cell(t, pct=False) -> str:
    if not isinstance(t, dict):
        return "-"
    return f"{_fmt(t.get('value'), pct)} (target >= {_fmt(t.get('target'), pct)}: {t.get('verdict') or 'not measured'})"


def _cell(text) -> str:
    """A table cell: one line, no column separators."""
    return str(text).replace("|", "/").replace("\n", " ")


# the op names of a train step's record, short, in the order the step runs them
IMPL_COLUMNS = (("masked_patchify", "patchify"), ("unshuffle", "unshuffle"), ("masked_mae_loss", "loss"),
                ("lion_update", "Lion"), ("attention", "attention"))


def impl_cell(rec: dict) -> str:
    """Which implementation of each op ran in a stack's step (stacks.impls_that_ran, recorded at warm-up). A fused
    stack whose op ran the reference is a silent fallback: marked FALLBACK, so the table cannot hide it."""
    impls = rec.get("impls")
    if not isinstance(impls, dict) or not impls:
        return "-"
    if "model" in impls:  # the peer
        return ", ".join(f"{k} {v}" for k, v in impls.items())
    fused = str(rec.get("stack", "")).startswith("fused")
    cells = []
    for op, short in IMPL_COLUMNS:
        if op not in impls:
            continue
        ran = impls[op] or "not called"
        fallback = fused and op != "attention" and ran in ("reference", "foreach")
        cells.append(f"{short} {ran}" + (" (FALLBACK)" if fallback else ""))
    return ", ".join(cells)


def _entry_title(entry: dict, name: str) -> str:
    batch = entry.get("batch")
    status = entry.get("status")
    title = (f"### {entry.get('kind', '?')} {entry.get('preset', '?')} "
             f"{f'batch {batch}' if batch is not None else '(batch not known)'} ({name})")
    if status not in (None, "ok"):
        title += f": {status}" + (f" — {entry['error']}" if entry.get("error") else "")
    return title


def _render_header(data: dict) -> list[str]:
    lines = []
    any_payload = next((d for d in data.values() if isinstance(d, dict) and d.get("provenance")), None)
    if any_payload:
        prov = any_payload["provenance"]
        git = prov.get("git") or {}
        lines += [f"device {prov.get('device')}, torch {prov.get('torch')}, triton {prov.get('triton')}, commit "
                  f"{git.get('commit')} (from {git.get('source')}, dirty: {git.get('dirty')}), {prov.get('date')}"
                  + (" — DRY RUN on the CPU at toy sizes: " + NOT_MEASURED if any_payload.get("dryrun") else ""), ""]
    lines += ["| stage | status | seconds |", "| --- | --- | --- |"]
    for name in FILES:
        d = data[name]
        status = d.get("status", "?") if isinstance(d, dict) else "missing"
        if isinstance(d, dict) and d.get("error"):
            status += f": {d['error']}"
        lines.append(f"| {name} | {_cell(status)} | {d.get('elapsed_s', '-') if isinstance(d, dict) else '-'} |")
    env = data["env.json"] or {}
    c = env.get("matmul_ceiling")
    if isinstance(c, dict):
        copy = env.get("copy_ceiling") or {}
        lines += ["", f"Ceilings: matmul {_fmt(c.get('tflops'))} TFLOP/s ({c.get('dtype')} "
                      f"{(c.get('shape') or ['?'])[0]}^3), copy {_fmt(copy.get('GBps'))} GB/s"]
    return lines


def _render_train(data: dict) -> list[str]:
    train = data["train.json"] or {}
    lines = []
    h = train.get("headline")
    if isinstance(h, dict) and h:
        lines += ["", f"## Train step {h.get('preset')} (eager)", "",
                  f"- fused crops/s (the step alone, data already on the device): {_fmt(h.get('fused_crops_per_s'))};"
                  f" MFU {_target_cell(h.get('mfu'), pct=True)} against the ceiling measured in this run; "
                  f"{_fmt(h.get('mfu_datasheet'), pct=True) if h.get('mfu_datasheet') else 'n/a'} of the datasheet "
                  "dense bf16 peak",
                  f"- fused / reference: {_target_cell(h.get('fused_vs_reference'))}",
                  f"- fused / peer: {_target_cell(h.get('fused_vs_peer'))}"]
    loader = train.get("loader")
    if isinstance(loader, dict) and loader.get("status") == "ok":
        lines.append(
            f"- data path ({loader.get('preset')}, batch {loader.get('batch')}): {_fmt(loader.get('loader_crops_per_s'))}"
            f" crops/s to {loader.get('device')} ({loader.get('backend')} loader, {loader.get('workers')} workers, "
            f"{loader.get('generated_sites')} synthetic sites x{loader.get('site_repeats')}, {loader.get('codec')} pack"
            f"{', pinned' if loader.get('pinned') else ''}) vs the fused step's {_fmt(loader.get('step_crops_per_s'))}:"
            f" loader / step {_target_cell(loader.get('loader_vs_step'))} — an upper bound: uncompressed, cached "
            "and repeated sites; a real screen adds decompression and cold reads")
    elif isinstance(loader, dict):
        lines.append(f"- data path: {loader.get('status')}" + (f": {loader['error']}" if loader.get("error") else ""))
    return lines


def _render_comparisons(data: dict) -> list[str]:
    lines = []
    for name in ("train.json", "inference.json", "compiled.json"):
        d = data[name] or {}
        if d.get("skipped"):
            lines += ["", f"### {name}: {d['skipped']}"]
        for entry in d.get("comparisons") or []:
            lines += ["", _entry_title(entry, name)]
            if not entry.get("records"):
                continue
            lines += ["",
                      "crops/s: the step alone on crops already on the device (no loading); MFU: against the matmul "
                      "ceiling measured in this run, in the run's dtype / against the datasheet dense bf16 peak.", "",
                      "| stack | status | crops/s | MFU (run ceiling) | MFU (datasheet) | peak mem GiB | ops that ran |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in entry.get("records") or []:
                mem = r.get("peak_mem_bytes")
                status = r.get("status", "?") + (f": {r['error']}" if r.get("error") else "")
                datasheet = _fmt(r.get("mfu_datasheet"), pct=True) if r.get("mfu_datasheet") is not None else "n/a"
                lines.append(f"| {r.get('stack')} | {_cell(status)} | {_fmt(r.get('crops_per_s'))} | "
                             f"{_fmt(r.get('mfu'), pct=True)} | {datasheet} | "
                             f"{_fmt(mem / 2**30 if isinstance(mem, (int, float)) else None)} | "
                             f"{_cell(impl_cell(r))} |")
            for r in entry.get("ratios") or []:
                lines.append(f"\n{r.get('numerator')} / {r.get('denominator')}: {_fmt(r.get('ratio_median'))} "
                             f"[{_fmt(r.get('ratio_min'))}, {_fmt(r.get('ratio_max'))}]")
    inf = data["inference.json"] or {}
    for label, h in (inf.get("headline") or {}).items():
        lines.append(f"\n- embed {label}: {_fmt(h.get('fused_crops_per_s'))} crops/s (model only, no loading)"
                     + (f"; vs target {_target_cell(h['crops_per_s_target'])}" if "crops_per_s_target" in h else "")
                     + (f"; fused / peer {_target_cell(h['fused_vs_peer'])}" if "fused_vs_peer" in h else ""))
    return lines


def _render_kernels(data: dict) -> list[str]:
    kern = data["kernels.json"] or {}
    lines = []
    if kern.get("ops"):
        lines += ["", "## Kernels (correctness first, then time)", "",
                  "| op | correct | impl | median ms | of floor | predicted of floor |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for e in kern["ops"]:
            pred = e.get("prediction")
            pred_cell = _fmt(pred.get("predicted_fraction_of_floor"), pct=True) if isinstance(pred, dict) else pred
            ok = (e.get("correctness") or {}).get("ok")
            if e.get("error"):
                lines.append(f"| {e.get('op')} | {ok} | error: {_cell(e['error'])} | - | - | - |")
            for c in e.get("cases") or []:
                if "median_ms" not in c:
                    lines.append(f"| {e.get('op')} | {ok} | {c.get('impl')}: {_cell(c.get('error', 'not timed'))} "
                                 "| - | - | - |")
                    continue
                lines.append(f"| {e.get('op')} | {ok} | {c.get('impl')} | {_fmt(c.get('median_ms'))} | "
                             f"{_fmt(c.get('fraction_of_floor'), pct=True)} | "
                             f"{pred_cell if c.get('impl') == 'fused' else ''} |")
    att = kern.get("attention")
    if isinstance(att, dict) and att.get("shapes"):
        names = list(attention.SDPA_BACKENDS)
        lines += ["", f"## Attention: SDPA backends, forward + backward, {att.get('dtype')}, batch {att.get('batch')} "
                      f"(FlashAttention-4 installed: {(att.get('packages') or {}).get('flash_attn_4')})", "",
                  "| shape | q | " + " | ".join(f"{n} ms (TFLOP/s)" for n in names)
                  + " | SDPA's own ms | fastest | fastest / own |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- |"]
        for e in att["shapes"]:
            q = "x".join(map(str, e.get("q") or []))
            if e.get("error") or not isinstance(e.get("seconds"), dict):
                lines.append(f"| {e.get('shape')} | {q} | " + " | ".join("-" for _ in names)
                             + f" | - | error: {_cell(e.get('error', 'not measured'))} | - |")
                continue
            cells = []
            for n in names:
                t = e["seconds"].get(n)
                cells.append(f"{1e3 * t:.4g} ({_fmt((e.get('tflops') or {}).get(n))})" if isinstance(t, float)
                             else "n/a")
            own = e.get("sdpa_own_choice_s")
            lines.append(f"| {e.get('shape')} | {q} | " + " | ".join(cells)
                         + f" | {_fmt(1e3 * own) if isinstance(own, float) else 'n/a'} | {e.get('fastest')} | "
                         f"{_fmt(e.get('fastest_vs_own_choice'))} |")
    return lines


def _render_tests(data: dict) -> list[str]:
    tests = data["tests.json"] or {}
    lines = []
    s = tests.get("summary")
    if isinstance(s, dict):
        lines += ["", f"GPU tests: {s.get('tests')} tests, {s.get('failures')} failures, {s.get('errors')} errors, "
                      f"{s.get('skipped')} skipped (rc {tests.get('rc')})"]
        lines += [f"- FAILED {n}" for n in s.get("failed") or []]
    prog = tests.get("progress")
    if isinstance(prog, dict) and (prog.get("files") or prog.get("collected")):
        lines += ["", f"GPU tests by file: {prog.get('finished', 0)} of {prog.get('collected', 0)} collected finished"
                      + (f" ({tests['stopped']})" if tests.get("stopped") else "")]
        for path, counts in (prog.get("files") or {}).items():
            lines.append(f"- {path}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        if not isinstance(s, dict):
            lines += [f"- FAILED {n}" for n in prog.get("failed") or []]
    return lines


RENDER_SECTIONS = (_render_header, _render_train, _render_comparisons, _render_kernels, _render_tests)


def render(folder: str) -> str:
    """results.md from whatever stage files exist, complete or not: a section that cannot be read says so in one
    line and the others are rendered (the report never crashes)."""
    data = {}
    for name in FILES:
        try:
            with open(os.path.join(folder, name)) as f:
                payload = json.load(f)
            data[name] = payload if isinstance(payload, dict) else None
        except (OSError, json.JSONDecodeError):
            data[name] = None
    lines = ["# mae_fast GPU headline", ""]
    for section in RENDER_SECTIONS:
        try:
            lines += section(data)
        except Exception as err:  # noqa: BLE001 - one unreadable section must not lose the report
            lines += ["", f"({section.__name__.removeprefix('_render_')}: not rendered, "
                          f"{type(err).__name__}: {err})"]
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
