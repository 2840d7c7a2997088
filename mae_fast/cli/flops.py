"""`mae-fast flops`: FLOPs per crop and per training run (the exact count and the paper's method), and the scaling plot
(see `mae_fast.perf.flops`)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from mae_fast.cli.common import number
from mae_fast.io import atomic_write_json
from mae_fast.models import model_config
from mae_fast.perf.flops import (
    PAPER_MODELS,
    PAPER_VIT_L8_RUN,
    RunPoint,
    gpu_hours_for,
    load_runs,
    model_flops,
    paper_run_summary,
    plot_scaling,
)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action="append", default=None,
                        help="preset(s) to count (repeatable; default: the paper's ViT-S/16 ... ViT-L/8)")
    parser.add_argument("--mask-ratio", type=number(float, minimum=0, below=1), default=None, help="mask ratio (default: the preset's, 0.75)")
    parser.add_argument("--in-chans", type=number(int, minimum=1), default=None, help="channels per crop (default: the preset's)")
    parser.add_argument("--crops", type=number(float, above=0), default=PAPER_VIT_L8_RUN["crops"],
                        help="crops seen in training, for total training FLOPs (default 3.5e9, the ViT-L/8+ run)")
    parser.add_argument("--crops-per-s", type=number(float, above=0), default=None,
                        help="a measured training rate (ViT-L/8 crops/s) to convert into GPU-hours for --crops")
    parser.add_argument("--metrics", default=None,
                        help="CSV/JSON of runs (model, crops, metric) to plot against training FLOPs")
    parser.add_argument("--metric", default=None, help="metric column of --metrics to plot")
    parser.add_argument("--plot", default="flops_scaling.png", help="PNG to write (default flops_scaling.png)")
    parser.add_argument("--no-plot", action="store_true", help="print only")
    parser.add_argument("--json", default=None, help="also write the counts as JSON here")


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:,.1f}"


def run(args: argparse.Namespace) -> int:
    if args.preset:
        try:
            rows = [(name, model_config(name)) for name in args.preset]
        except KeyError as err:
            print(f"mae-fast flops: error: {err.args[0]}", file=sys.stderr)
            return 2
    else:
        rows = [(label, model_config(preset)) for label, preset in PAPER_MODELS]
    if args.in_chans is not None:
        rows = [(label, replace(cfg, in_chans=args.in_chans)) for label, cfg in rows]
    try:
        counts = [model_flops(label, cfg, args.mask_ratio) for label, cfg in rows]
    except ValueError as err:
        print(f"mae-fast flops: error: {err}", file=sys.stderr)
        return 2

    print("Per 256x256 crop (GFLOP; exact = every matmul 2mnk + attention 4n^2d; training = 3x masked forward)")
    header = f"{'model':<28} {'paper method':>13} {'exact fwd':>10} {'exact train':>12} {'exact infer':>12}"
    print(header)
    print("-" * len(header))
    for c in counts:
        print(f"{c.label:<28} {_g(c.paper_per_crop):>13} {_g(c.forward_per_crop):>10} "
              f"{_g(c.training_per_crop):>12} {_g(c.inference_per_crop):>12}")
    print("paper method = Touvron et al. 2022 GFLOPs at 224^2 (a multiply-add counted once) x1.69, x16 for patch 8:"
          " encoder only, no masking, no backward")
    print()
    print(f"Total training FLOPs for {args.crops:.3g} crops:")
    for c in counts:
        paper = "-" if c.paper_per_crop is None else f"{c.paper_per_crop * args.crops:.3e}"
        print(f"  {c.label:<28} paper method {paper:>10}   exact {c.training_per_crop * args.crops:.3e}")
    print()
    s = paper_run_summary()
    print(f"The paper's {s['name']}: {s['crops']:.2g} crops in > {s['gpu_hours']:,} A100-hours "
          f"({s['implied_crops_per_gpu_s']:.1f} crops/s per GPU)")
    print(f"  exact training FLOPs {s['exact_total_training_flops']:.3e} -> implied MFU "
          f"{100 * s['implied_mfu_exact']:.1f}% of 312 TFLOP/s bf16")
    print(f"  paper-method FLOPs   {s['paper_total_training_flops']:.3e} -> {100 * s['implied_mfu_paper_method']:.1f}%"
          " (the paper's count is no training count: no masking, no backward, x1.69 x16 factors)")
    if args.crops_per_s:
        hours = gpu_hours_for(args.crops, args.crops_per_s)
        print(f"  at {args.crops_per_s:,.1f} crops/s: {hours:,.0f} GPU-hours for {args.crops:.3g} crops "
              f"(paper: > {s['gpu_hours']:,})")

    if args.metrics:
        try:
            points, metric = load_runs(args.metrics, args.metric)
        except (OSError, ValueError) as err:
            print(f"mae-fast flops: error: {err}", file=sys.stderr)
            return 2
    else:
        metric = None
        points = [RunPoint(c.label, c.training_per_crop * args.crops,
                           None if c.paper_per_crop is None else c.paper_per_crop * args.crops, None)
                  for c in counts]
    if not args.no_plot:
        title = None if metric else f"Training FLOPs of the paper's models for {args.crops:.3g} crops"
        plot_scaling(points, args.plot, metric, title)
        print(f"\nwrote {args.plot}")
    if args.json:
        payload = {
            "crops": args.crops,
            "models": [c.__dict__ for c in counts],
            "paper_run": s,
            "points": [p.__dict__ for p in points],
            "metric": metric,
        }
        atomic_write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae-fast flops", description="FLOPs of MAE ViTs, exact and paper method")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
