"""`mae-fast bench`: end-to-end train-step and embedding benchmarks (crops/s, TFLOP/s, MFU) as JSON with provenance
(see `mae_fast.perf`)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import asdict

import torch

import mae_fast
from mae_fast.cli.common import number
from mae_fast.ops.triton import kernels_module
from mae_fast.device import amp_label, default_amp, resolve_device
from mae_fast.models import list_presets
from mae_fast.perf.harness import BenchSettings, compare_stacks, default_batch, paper_comparison, refresh_cpu_ceiling
from mae_fast.perf.provenance import SCHEMA, device_name, provenance, results_path, write_json
from mae_fast.perf.stacks import COMPILE_MODES, STACKS, default_stacks, parse_preset, parse_stacks
from mae_fast.perf.timing import measure_matmul_ceiling

CPU_PRESETS = ["mae_vit_micro_patch16_256", "camae_vit_micro_patch16_256:img_size=128"]
GPU_PRESETS = [  # the target first: a run cut short by its time budget still measures it
    "mae_vit_large_patch8_256", "mae_vit_small_patch16_256", "mae_vit_base_patch16_256", "mae_vit_base_patch8_256",
    "mae_vit_large_patch16_256", "camae_vit_small_patch16_256",
]
GPU_TARGET_PRESETS = ["mae_vit_large_patch8_256"]  # the target: compiled stacks and max-batch search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    parser.add_argument("--preset", action="append", default=None,
                        help="preset to benchmark, optionally with overrides (name:img_size=128,in_chans=3); "
                             "repeatable or comma-separated; 'all' for every preset. Default: CPU "
                             f"{' '.join(CPU_PRESETS)}; GPU the paper's MAEs and OpenPhenom's CA-MAE")
    parser.add_argument("--batch", type=number(int, minimum=1), default=None,
                        help="train batch (default: 2 on CPU; on GPU a power of two giving ~100 TFLOP per step)")
    parser.add_argument("--inference-batch", type=number(int, minimum=1), default=None,
                        help="embedding batch (same defaults)")
    parser.add_argument("--stacks", default=",".join(default_stacks()),
                        help=f"comma list of {', '.join(STACKS)} (default all; the peer's need timm)")
    parser.add_argument("--compile-presets", default=None,
                        help="presets that also run the compiled stacks: comma list, 'all' or 'none' "
                             f"(default: all on CPU; on GPU {', '.join(GPU_TARGET_PRESETS)}: compiling takes minutes)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor on GPU; aot_eager on CPU, where inductor "
                             "spends ~90 s in its C++ build per variant)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="regional",
                        help="regional: each transformer block compiled (compile time per block type); "
                             "model: the whole step compiled")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="autocast dtype (auto: bf16 on GPU and on CPUs with native bf16 units -- AMX / "
                             "AVX512-BF16 -- fp32 on other CPUs)")
    parser.add_argument("--warmup", type=number(int, minimum=0), default=2,
                        help="untimed steps per stack after the first")
    parser.add_argument("--iters", type=number(int, minimum=1), default=None,
                        help="timed steps per stack per round (GPU 5, CPU 2)")
    parser.add_argument("--rounds", type=number(int, minimum=1), default=3, help="interleaved rounds over the stacks")
    parser.add_argument("--no-train", action="store_true", help="skip the train-step benchmark")
    parser.add_argument("--no-inference", action="store_true", help="skip the embedding benchmark")
    parser.add_argument("--max-batch-presets", default=None,
                        help="presets whose eager stacks get the largest-batch search (GPU only): comma list, "
                             f"'all' or 'none' (default {', '.join(GPU_TARGET_PRESETS)})")
    parser.add_argument("--max-batch-time", type=float, default=45.0, help="seconds per largest-batch search")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; what is left when it runs out is recorded as skipped")
    parser.add_argument("--out", default=None,
                        help="results JSON file, or folder (default benchmarks/results/ in a checkout, else .)")


def _default_out() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(mae_fast.__file__)))
    return os.path.join(root, "benchmarks", "results") if os.path.isdir(os.path.join(root, "benchmarks")) else "."


def split_specs(items: list[str] | None) -> list[str]:
    """Repeatable and comma-separated values; commas inside "name:k=v,k=v" overrides stay with their preset."""
    out: list[str] = []
    for item in items or []:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part and ":" not in part and out and ":" in out[-1]:
                out[-1] += "," + part  # another override of the previous preset
            else:
                out.append(part)
    return out


def _presets_from(args, device: torch.device) -> list[str]:
    specs = split_specs(args.preset) or (CPU_PRESETS if device.type == "cpu" else GPU_PRESETS)
    names: list[str] = []
    for spec in specs:
        if spec == "all":
            names.extend(list_presets())
        else:
            parse_preset(spec)  # fails early, naming the preset or the override
            names.append(spec)
    return list(dict.fromkeys(names))


def preset_set(text: str | None, presets: list[str], default: list[str]) -> set[str]:
    """Presets named by an option: a comma list, "all" (every benchmarked preset), "none", or `default` if unset."""
    if text is None:
        return set(default)
    text = text.strip()
    if text == "all":
        return set(presets)
    if text == "none":
        return set()
    return set(split_specs([text]))


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def print_summary(payload: dict) -> None:
    c = payload["ceiling"]
    print(f"\nmatmul ceiling: {c['tflops']:.4g} TFLOP/s ({c['dtype']} {c['shape'][0]}^3, {c['device']})")
    for kind in ("train", "inference"):
        recs = payload[kind]
        if not recs:
            continue
        print(f"\n{kind}: {'preset':<42} {'stack':<19} {'batch':>5} {'crops/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
              f"{'peak mem':>10} {'max batch':>9} attention")
        for r in recs:
            if r.get("status") != "ok":
                print(f"       {r['preset']:<42} {r['stack']:<19} {r['batch']:>5} {r.get('status')}: "
                      f"{r.get('error') or r.get('note', '')}")
                continue
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            print(f"       {r['preset']:<42} {r['stack']:<19} {r['batch']:>5} {r['crops_per_s']:>9.2f} "
                  f"{r['achieved_tflops']:>8.3f} {mfu:>6} {_fmt_bytes(r.get('peak_mem_bytes')):>10} "
                  f"{str(r.get('max_batch') or '-'):>9} {r.get('impls', {}).get('attention')}")
    if payload["ratios"]:
        print("\nspeed ratios (same run, interleaved rounds; median [min, max] over rounds):")
        for r in payload["ratios"]:
            print(f"  {r['kind']:<9} {r['preset']:<42} {r['numerator']}/{r['denominator']}: "
                  f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]")
    pc = payload.get("paper_comparison")
    if pc:
        mfu = "-" if pc["measured_mfu"] is None else f"{100 * pc['measured_mfu']:.1f}%"
        print(f"\nViT-L/8 ({pc['best_stack']}): {pc['measured_crops_per_s']:.1f} crops/s on {pc['device']}, MFU {mfu}; "
              f"{pc['gpu_hours_for_paper_crops']:,.0f} device-hours for the paper's {pc['paper_crops']:.2g} crops "
              f"(paper: > {pc['paper_gpu_hours']:,} A100-hours, {pc['paper_crops_per_gpu_s']:.1f} crops/s per GPU, "
              f"~{100 * pc['paper_implied_mfu']:.0f}% MFU)")
        targets = pc.get("targets") or {}
        for name, t in targets.items():
            got = "not measured" if t["value"] is None else f"{t['value']:.3f}"
            verdict = "" if t["value"] is None else ("met" if t["value"] >= t["target"] else "NOT met")
            print(f"  target {name}: {got} (target >= {t['target']}) {verdict}")


def run(args: argparse.Namespace) -> int:
    kernels_module()  # this checkout's kernels/, not silently the references
    try:
        device = resolve_device(args.device)
        stacks = parse_stacks(args.stacks)
        presets = _presets_from(args, device)
    except (RuntimeError, ValueError, KeyError) as err:
        print(f"mae-fast bench: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    amp = {"auto": default_amp(device), "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
    settings = BenchSettings(
        device=device, amp=amp, warmup=args.warmup, rounds=args.rounds,
        iters=args.iters or (5 if device.type == "cuda" else 2),
        compile_backend=args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager"),
        max_batch_time_s=args.max_batch_time, compile_mode=args.compile_mode,
    )
    compile_presets = preset_set(args.compile_presets, presets,
                                  presets if device.type == "cpu" else GPU_TARGET_PRESETS)
    max_batch_presets = preset_set(args.max_batch_presets, presets, GPU_TARGET_PRESETS)
    path = results_path(args.out or _default_out(), device)
    t_start = time.perf_counter()

    print(f"device {device_name(device)}, {amp_label(amp, args.amp, device)}; measuring the matmul ceiling ...",
          flush=True)
    ceiling = measure_matmul_ceiling(device, dtype=amp or torch.float32)  # MFU against the run's own dtype
    payload = {
        "schema": SCHEMA,
        "provenance": provenance(device, getattr(args, "command_line", None)),
        "settings": {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v)
                     for k, v in asdict(settings).items()},
        "ceiling": ceiling,
        "train": [],
        "inference": [],
        "ratios": [],
        "skipped": [],
    }
    print(f"ceiling {ceiling['tflops']:.3f} TFLOP/s; results go to {path}", flush=True)

    kinds = [k for k, off in (("train", args.no_train), ("inference", args.no_inference)) if not off]
    interrupted = False
    for kind in kinds:
        for label in presets:
            cfg = parse_preset(label)
            wanted = [s for s in stacks if (not s.compiled or label in compile_presets)
                      and not (s.peer and cfg.channel_agnostic)]  # the peer is the standard MAE only
            if kind == "inference":  # embedding calls none of the dispatched training ops: the default path only
                wanted = [s for s in wanted if s.name.startswith("fused") or s.peer] or wanted[:1]
            batch = (args.batch if kind == "train" else args.inference_batch) or default_batch(cfg, device, kind)
            if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                payload["skipped"].append({"kind": kind, "preset": label, "reason": "time budget spent"})
                print(f"skip {kind} {label}: time budget spent", flush=True)
                continue
            if interrupted:
                payload["skipped"].append({"kind": kind, "preset": label, "reason": "interrupted"})
                continue
            print(f"{kind} {label} batch {batch}: {', '.join(s.name for s in wanted)}", flush=True)
            records, ratios, interrupted = compare_stacks(kind, label, cfg, wanted, batch, settings,
                                                          ceiling["tflops"], search_max_batch=label in max_batch_presets)
            payload[kind].extend(records)
            payload["ratios"].extend(ratios)
            payload["paper_comparison"] = paper_comparison(payload["train"], payload["ratios"])
            write_json(path, payload)  # after every preset: a run cut short keeps what it measured
            if interrupted:
                print("interrupted: writing what was measured", flush=True)
    refresh_cpu_ceiling(payload, device)
    payload["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    write_json(path, payload)
    print_summary(payload)
    errors = [r for r in payload["train"] + payload["inference"] if r.get("status") != "ok"]
    if payload["skipped"]:
        print(f"\n{len(payload['skipped'])} (kind, preset) pairs skipped: "
              + ", ".join(f"{s['kind']} {s['preset']} ({s['reason']})" for s in payload["skipped"]))
    if errors:
        print(f"{len(errors)} benchmark(s) failed: see 'error' in the results")
    print(f"\nwrote {path}")
    if interrupted:
        return 130
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae-fast bench", description="End-to-end train/inference benchmarks")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if argv is not None:  # called from Python: record the arguments given, not this process's
        args.command_line = " ".join(["mae-fast bench"] + [shlex.quote(a) for a in argv])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
