"""Scaling study on the built-in synthetic screen: what the MAE learns as training compute grows.

    python benchmarks/scaling_study.py            # the study: 3 sizes x 4 budgets (32x) + Fourier 0 vs 0.01
    python benchmarks/scaling_study.py --toy      # toy size (the test; seconds of work, not a result)

Grid: model sizes (`--presets`, default the micro, tiny and small ViT/16) x crop budgets (`--crops`, default 1k to
32k crops: 32x), every point its own run with its own full schedule (so every point is annealed, unlike the
snapshots of demo_curve.py), plus the Fourier-loss weight 0 against the default 0.01 (`--fourier-preset`, at the
largest budget). Training, embedding and evaluation are the demo's (mae_fast.cli.demo.train_config,
mae_fast.inference, mae_fast.evaluation), with the autocast dtype of `--amp` (auto: bf16 on CPUs with native bf16).

Per run: the loss (first / last steps), training FLOPs (mae_fast.perf.flops.training_flops_per_crop x crops),
and per encoder block (`embed --blocks all`) recall of the planted complexes overall and per phenotype class
[95% bootstrap interval] and phenotypic activity mAP; the block the evaluation headlines (highest activity mAP,
no relationships used) is marked. Baselines (random, pixel statistics; the CellProfiler-style row when its packages
are installed; not with --toy) are evaluated once, beside the first run: they do not depend on the model.

Outputs: --json (default benchmarks/results/scaling_study.json) and --png (…/scaling_study.png: recall of the
last and of the headlined block, and the final loss, against training FLOPs; one line per size; baselines as
horizontal lines). Work files (screen, runs, embeddings) under --out, deleted per run unless --keep.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

from demo_curve import _number, _recall_rows  # noqa: E402  (the same recall rows as the demo's curve)

from mae_fast.cli import demo  # noqa: E402
from mae_fast.cli.common import number  # noqa: E402
from mae_fast.data.synthetic import make_synthetic_screen  # noqa: E402
from mae_fast.device import resolve_device  # noqa: E402
from mae_fast.evaluation import cellprofiler, evaluate  # noqa: E402
from mae_fast.inference.embed import embed_dataset  # noqa: E402
from mae_fast.io import atomic_write, atomic_write_json  # noqa: E402
from mae_fast.models import model_config  # noqa: E402
from mae_fast.perf import flops  # noqa: E402
from mae_fast.perf.provenance import provenance  # noqa: E402
from mae_fast.training.config import validate  # noqa: E402
from mae_fast.training.loop import train  # noqa: E402

DEFAULT_PRESETS = ("mae_vit_micro_patch16_256", "mae_vit_tiny_patch16_256", "mae_vit_small_patch16_256")
DEFAULT_CROPS = (1_000, 4_000, 16_000, 32_000)
TOY_PRESETS = ("mae_vit_micro_patch16_256",)
TOY_CROPS = (4, 8)
FOURIER_WEIGHTS = (0.0, 0.01)   # the papers' weight, and none


def _ints(text: str) -> list[int]:
    try:
        values = [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated crop counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"crop counts must be >= 1, got {text!r}")
    return sorted(set(values))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=demo._names, help=f"model sizes (default {','.join(DEFAULT_PRESETS)})")
    p.add_argument("--crops", type=_ints, help=f"crop budgets (default {','.join(map(str, DEFAULT_CROPS))})")
    p.add_argument("--fourier-preset", help="the size at which Fourier weight 0 is compared with 0.01 (default: the "
                                            "first preset; 'none' to skip)")
    p.add_argument("--batch-size", type=number(int, minimum=1), default=16)
    p.add_argument("--lr", type=number(float, above=0), default=1e-3)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy", action="store_true", help="the tiny screen, the micro model, a few crops (tests)")
    p.add_argument("--keep", action="store_true", help="keep every run's folder and embeddings")
    p.add_argument("--out", default="scaling_study_out", help="work folder (default ./scaling_study_out)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "scaling_study.json"))
    p.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "results", "scaling_study.png"))
    args = p.parse_args(argv)
    args.presets = args.presets or list(TOY_PRESETS if args.toy else DEFAULT_PRESETS)
    args.crops = args.crops or list(TOY_CROPS if args.toy else DEFAULT_CROPS)
    args.fourier_preset = args.fourier_preset or args.presets[0]
    return args


def study_runs(args) -> list[dict]:
    """Every run of the study: (preset, crops, Fourier weight), the grid at the presets' default weight, then the
    other weight at --fourier-preset and the largest budget."""
    runs = [{"preset": p, "crops": c, "fourier_alpha": model_config(p).fourier_alpha}
            for p in args.presets for c in args.crops]
    if args.fourier_preset != "none":
        default = model_config(args.fourier_preset).fourier_alpha
        runs += [{"preset": args.fourier_preset, "crops": max(args.crops), "fourier_alpha": w}
                 for w in FOURIER_WEIGHTS if w != default]
    return runs


def _train_args(args) -> argparse.Namespace:
    """The namespace demo.train_config reads, from the study's options."""
    return argparse.Namespace(lr=args.lr, wsl_lr=demo.DEFAULT_WSL_LR, munet_lr=demo.DEFAULT_MUNET_LR,
                              batch_size=args.batch_size, seed=args.seed, device=args.device, amp=args.amp)


def run_point(point: dict, screen, args, folder: str, baselines=()) -> tuple[dict, dict]:
    """Train, embed every block, evaluate: (one point of the study, the `baselines`' rows -- evaluated beside it, as
    the demo does, when asked)."""
    steps = -(-point["crops"] // args.batch_size)
    cfg = demo.train_config(point["preset"], screen.root, os.path.join(folder, "train"), _train_args(args), 0.0,
                            steps)
    cfg = dataclasses.replace(cfg, model={**cfg.model, "fourier_alpha": point["fourier_alpha"]}, progress=False,
                              recon_every=0)
    validate(cfg)
    result = train(cfg)
    first, last = demo._loss_ends(result.losses)
    embeddings = embed_dataset(result.model_dir, screen.root, os.path.join(folder, "embeddings.parquet"),
                               overwrite=True, device=args.device, amp=args.amp, seed=args.seed, blocks="all",
                               progress=False)
    evaluation = evaluate(embeddings.out, {"planted": screen.relationships_csv}, arms=screen.arms_csv,
                          baselines=baselines, images_root=screen.root, gene_classes=screen.plan.gene_class,
                          name="model")
    choice = evaluation.block_choice
    blocks, reference = {}, {}
    for name, source in evaluation.sources.items():
        if name in baselines:
            reference[name] = {"recall": _recall_rows(evaluation, name), "activity_map": _number(source.activity_map)}
            continue
        block = int(name.rsplit(" ", 1)[1])
        blocks[str(block)] = {"activity_map": _number(source.activity_map), "recall": _recall_rows(evaluation, name)}
    model_cfg = model_config(point["preset"], fourier_alpha=point["fourier_alpha"])
    return {**point, "steps": result.steps, "crops_trained": result.crops, "train_seconds": round(result.seconds, 2),
            "train_flops": flops.training_flops_per_crop(model_cfg) * result.crops,
            "loss_first": round(first, 5), "loss_last": round(last, 5), "blocks": blocks,
            "headline_block": choice["block"], "last_block": choice["last_block"]}, reference


def run_study(args) -> dict:
    for preset in args.presets + ([] if args.fourier_preset == "none" else [args.fourier_preset]):
        demo.check_models([preset])
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    load_start = os.getloadavg()
    t0 = time.time()
    screen = make_synthetic_screen(os.path.join(out, "screen"), demo.screen_config(args.toy, args.seed))
    points, references = [], {}
    # the CellProfiler-style row when installed (not at toy size: it would be most of a toy run's time)
    baselines = ("random", "pixel-stats") + (() if args.toy or cellprofiler.missing_packages() else ("cellprofiler",))
    for i, point in enumerate(study_runs(args)):
        folder = os.path.join(out, f"run_{i:02d}")
        record, reference = run_point(point, screen, args, folder, baselines if i == 0 else ())
        points.append(record)
        references.update(reference)
        p = points[-1]
        last = p["blocks"][str(p["last_block"])]["recall"]["planted"]["all"]["recall"]
        print(f"run {i + 1}: {p['preset']} {p['crops_trained']} crops (Fourier {p['fourier_alpha']:g}): loss "
              f"{p['loss_last']:.4f}, planted recall {last} (last block), headline block {p['headline_block']}",
              flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    command = " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + list(args.argv or []))
    return {
        "what": "scaling study on the synthetic screen: recall per phenotype class, activity mAP and loss vs "
                "training FLOPs; every point its own annealed run (see the script's doc)",
        "toy": args.toy, "presets": args.presets, "crops": args.crops, "fourier_preset": args.fourier_preset,
        "batch_size": args.batch_size, "lr": args.lr, "amp": args.amp, "seed": args.seed,
        "screen": {"genes": len(screen.genes), "complexes": len(screen.complexes), "source": screen.source},
        "runs": points, "baselines": references, "wall_seconds": round(time.time() - t0, 1),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "provenance": provenance(resolve_device(args.device), command=command),
    }


def plot_study(study: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_recall, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, preset in enumerate(study["presets"]):
        grid = sorted((r for r in study["runs"] if r["preset"] == preset
                       and r["fourier_alpha"] == model_config(preset).fourier_alpha), key=lambda r: r["train_flops"])
        x = [r["train_flops"] for r in grid]
        for style, key in (("-", "last_block"), ("--", "headline_block")):
            y = [r["blocks"][str(r[key])]["recall"]["planted"]["all"]["recall"] for r in grid]
            ax_recall.plot(x, y, style, marker="o", color=f"C{k}",
                           label=f"{preset.split('_patch')[0]}, {key.replace('_', ' ')}")
        ax_loss.plot(x, [r["loss_last"] for r in grid], "-o", color=f"C{k}", label=preset.split("_patch")[0])
    for r in study["runs"]:
        if r["fourier_alpha"] != model_config(r["preset"]).fourier_alpha:
            y = r["blocks"][str(r["last_block"])]["recall"]["planted"]["all"]["recall"]
            ax_recall.plot([r["train_flops"]], [y], "kx", label=f"Fourier weight {r['fourier_alpha']:g}")
            ax_loss.plot([r["train_flops"]], [r["loss_last"]], "kx")
    for style, name in zip((":", "-.", "--"), ("random", "pixel-stats", "cellprofiler")):
        value = study["baselines"].get(name, {}).get("recall", {}).get("planted", {}).get("all", {}).get("recall")
        if value is not None:
            ax_recall.axhline(value, linestyle=style, color="grey", label=name)
    for ax, label in ((ax_recall, "planted recall at the 5% tails"), (ax_loss, "final training loss")):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_recall.set_ylim(0, 1)
    fig.suptitle("toy run: not a result" if study["toy"] else "scaling study, synthetic screen", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    try:
        study = run_study(args)
    except ValueError as err:
        print(f"scaling_study: {err}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    atomic_write_json(args.json, study)
    plot_study(study, args.png)
    print(f"study: {args.json}\nplot:  {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
