"""Scaling study on the built-in synthetic screen: what the MAE learns as training compute grows.

    python benchmarks/scaling_study.py            # the study (~60 min on 2 idle cores, bf16): grid + ablations
    python benchmarks/scaling_study.py --toy      # toy size (the test; seconds of work, not a result)

Grid: model sizes (`--presets`, default the micro, tiny and small ViT/16) x crop budgets: the first preset over
`--crops` (default 500 to 16k crops: 32x), the others over `--crops-other` (default 500 and 2k: tiny and small cost
about 25x micro's FLOPs per crop, because their 8-block decoder runs on all 256 tokens). Every point is its own run
with its own full schedule (annealed, unlike the snapshots of demo_curve.py).

Ablations (`--ablations`, at `--ablation-preset` = the first preset and `--ablation-crops`, default 8k), each
compared with the grid point of the same budget:
    fourier     the Fourier-loss weight 0 against the preset's 0.01 (the papers credit it with texture)
    mask_ratio  mask ratio 0.5 against 0.75
    patch8      the same model with 8-pixel patches, at the same training FLOPs (a quarter of the crops)
    untrained   the randomly initialised model (seeded), embedded without training: what the architecture and
                the pooling give before the MAE objective shapes the features
Training, embedding and evaluation are the demo's (mae_fast.cli.demo.train_config, mae_fast.inference,
mae_fast.evaluation), with the autocast dtype of `--amp` (auto: bf16 on CPUs with native bf16).

Per run: the loss (first / last steps), training FLOPs (mae_fast.perf.flops.training_flops_per_crop x crops),
and per encoder block (`embed --blocks all`) recall of the planted complexes overall and per phenotype class
[95% bootstrap interval] and phenotypic activity mAP; the block the evaluation headlines (highest activity mAP,
no relationships used) is marked. Baselines (random, pixel statistics; the CellProfiler-style row when its packages
are installed; not with --toy) are evaluated once, beside the first run: they do not depend on the model.

Outputs: --json (default benchmarks/results/scaling_study.json), the same numbers as a markdown table beside it
(scaling_study.md, also printed) and --png (…/scaling_study.png: recall of the
last and of the headlined block, and the final loss, against training FLOPs; one line per size; ablations as
markers; baselines as horizontal lines). Work files (screen, runs, embeddings) under --out, deleted per run unless
--keep.
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
from mae_fast.io import atomic_write, atomic_write_json, write_text  # noqa: E402
from mae_fast.models import model_config  # noqa: E402
from mae_fast.perf import flops  # noqa: E402
from mae_fast.perf.provenance import provenance  # noqa: E402
from mae_fast.training.config import validate  # noqa: E402
from mae_fast.training.loop import train  # noqa: E402

DEFAULT_PRESETS = ("mae_vit_micro_patch16_256", "mae_vit_tiny_patch16_256", "mae_vit_small_patch16_256")
DEFAULT_CROPS = (500, 2_000, 8_000, 16_000)
DEFAULT_CROPS_OTHER = (500, 2_000)
DEFAULT_ABLATION_CROPS = 8_000
ABLATIONS = ("fourier", "mask_ratio", "patch8", "untrained")
TOY_PRESETS = ("mae_vit_micro_patch16_256",)
TOY_CROPS = (4, 8)


def _ints(text: str) -> list[int]:
    try:
        values = [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated crop counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"crop counts must be >= 1, got {text!r}")
    return sorted(set(values))


def _names(text: str) -> list[str]:
    if text.strip() == "none":
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ablation(s) {', '.join(unknown)}; valid: {', '.join(ABLATIONS)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=demo._names, help=f"model sizes (default {','.join(DEFAULT_PRESETS)})")
    p.add_argument("--crops", type=_ints, help=f"crop budgets of the first preset (default "
                                               f"{','.join(map(str, DEFAULT_CROPS))})")
    p.add_argument("--crops-other", type=_ints, help=f"crop budgets of the other presets (default "
                                                     f"{','.join(map(str, DEFAULT_CROPS_OTHER))})")
    p.add_argument("--ablations", type=_names, help=f"comma-separated, or 'none' (default {','.join(ABLATIONS)})")
    p.add_argument("--ablation-preset", help="the size the ablations run at (default: the first preset)")
    p.add_argument("--ablation-crops", type=number(int, minimum=1),
                   help=f"the ablations' budget (default {DEFAULT_ABLATION_CROPS}; patch8: a quarter of it)")
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
    args.crops_other = args.crops_other or (list(args.crops) if args.toy else list(DEFAULT_CROPS_OTHER))
    args.ablations = list(ABLATIONS) if args.ablations is None else args.ablations
    args.ablation_preset = args.ablation_preset or args.presets[0]
    args.ablation_crops = args.ablation_crops or (max(args.crops) if args.toy else DEFAULT_ABLATION_CROPS)
    return args


def patch8_preset(preset: str) -> str:
    """The same size with 8-pixel patches (mae_vit_micro_patch16_256 -> mae_vit_micro_patch8_256)."""
    return preset.replace("_patch16_", "_patch8_")


def study_runs(args) -> list[dict]:
    """Every run of the study: the grid at the presets' defaults ("grid"), then each ablation at --ablation-preset
    and --ablation-crops (`model`: the overrides of the preset's config)."""
    runs = [{"preset": p, "crops": c, "model": {}, "label": "grid"}
            for i, p in enumerate(args.presets) for c in (args.crops if i == 0 else args.crops_other)]
    preset, crops = args.ablation_preset, args.ablation_crops
    cfg = model_config(preset)
    extra = {
        "fourier": {"preset": preset, "crops": crops, "model": {"fourier_alpha": 0.0 if cfg.fourier_alpha else 0.01},
                    "label": "fourier weight " + ("0" if cfg.fourier_alpha else "0.01")},
        "mask_ratio": {"preset": preset, "crops": crops, "model": {"mask_ratio": 0.5 if cfg.mask_ratio != 0.5 else 0.75},
                       "label": "mask ratio " + ("0.5" if cfg.mask_ratio != 0.5 else "0.75")},
        "patch8": {"preset": patch8_preset(preset), "crops": max(1, crops // 4), "model": {}, "label": "patch 8"},
        "untrained": {"preset": preset, "crops": 0, "model": {}, "label": "untrained"},
    }
    return runs + [extra[name] for name in args.ablations]


def _train_args(args) -> argparse.Namespace:
    """The namespace demo.train_config reads, from the study's options."""
    return argparse.Namespace(lr=args.lr, wsl_lr=demo.DEFAULT_WSL_LR, munet_lr=demo.DEFAULT_MUNET_LR,
                              batch_size=args.batch_size, seed=args.seed, device=args.device, amp=args.amp)


def untrained_model(preset: str, overrides: dict, folder: str, seed: int) -> str:
    """The preset's randomly initialised model (seeded), saved as a model folder `embed` reads."""
    import torch

    from mae_fast.checkpoint import save_model
    from mae_fast.models import create_model

    torch.manual_seed(seed)
    return save_model(create_model(preset, **overrides).eval(), os.path.join(folder, "untrained"))


def run_point(point: dict, screen, args, folder: str, baselines=()) -> tuple[dict, dict]:
    """Train, embed every block, evaluate: (one point of the study, the `baselines`' rows -- evaluated beside it, as
    the demo does, when asked). A point of 0 crops is the untrained model."""
    if point["crops"]:
        steps = -(-point["crops"] // args.batch_size)
        cfg = demo.train_config(point["preset"], screen.root, os.path.join(folder, "train"), _train_args(args), 0.0,
                                steps)
        cfg = dataclasses.replace(cfg, model={**cfg.model, **point["model"]}, progress=False, recon_every=0)
        validate(cfg)
        result = train(cfg)
        first, last = demo._loss_ends(result.losses)
        model_dir, trained = result.model_dir, {"steps": result.steps, "crops_trained": result.crops,
                                                "train_seconds": round(result.seconds, 2)}
    else:
        model_dir = untrained_model(point["preset"], point["model"], folder, args.seed)
        first = last = float("nan")
        trained = {"steps": 0, "crops_trained": 0, "train_seconds": 0.0}
    t0 = time.time()
    embeddings = embed_dataset(model_dir, screen.root, os.path.join(folder, "embeddings.parquet"),
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
    model_cfg = model_config(point["preset"], **point["model"])
    return {**point, **trained, "embed_evaluate_seconds": round(time.time() - t0, 2),
            "train_flops": flops.training_flops_per_crop(model_cfg) * trained["crops_trained"],
            "loss_first": _number(first), "loss_last": _number(last), "blocks": blocks,
            "headline_block": choice["block"], "last_block": choice["last_block"]}, reference


def run_study(args) -> dict:
    runs = study_runs(args)
    demo.check_models(sorted({r["preset"] for r in runs}))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    load_start = os.getloadavg()
    t0 = time.time()
    screen = make_synthetic_screen(os.path.join(out, "screen"), demo.screen_config(args.toy, args.seed))
    points, references = [], {}
    # the CellProfiler-style row when installed (not at toy size: it would be most of a toy run's time)
    baselines = ("random", "pixel-stats") + (() if args.toy or cellprofiler.missing_packages() else ("cellprofiler",))
    for i, point in enumerate(runs):
        folder = os.path.join(out, f"run_{i:02d}")
        record, reference = run_point(point, screen, args, folder, baselines if i == 0 else ())
        points.append(record)
        references.update(reference)
        p = points[-1]
        last = p["blocks"][str(p["last_block"])]["recall"]["planted"]["all"]["recall"]
        head = p["blocks"][str(p["headline_block"])]["recall"]["planted"]["all"]["recall"]
        print(f"run {i + 1}/{len(runs)}: {p['preset']} {p['label']}, {p['crops_trained']} crops: loss "
              f"{p['loss_last']}, planted recall {last} (last block), {head} (headline block {p['headline_block']}); "
              f"{p['train_seconds']:.0f} s training, {time.time() - t0:.0f} s so far", flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    command = " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + list(args.argv or []))
    return {
        "what": "scaling study on the synthetic screen: recall per phenotype class, activity mAP and loss vs "
                "training FLOPs; every point its own annealed run, plus ablations (see the script's doc)",
        "toy": args.toy, "presets": args.presets, "crops": args.crops, "crops_other": args.crops_other,
        "ablations": args.ablations, "ablation_preset": args.ablation_preset, "ablation_crops": args.ablation_crops,
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

    def recall(r, key="last_block", cls="all"):
        return r["blocks"][str(r[key])]["recall"]["planted"][cls]["recall"]

    fig, (ax_recall, ax_class, ax_loss) = plt.subplots(1, 3, figsize=(16, 4.4))
    runs = study["runs"]
    trained = [r["train_flops"] for r in runs if r["train_flops"]]
    untrained_x = min(trained) / 4 if trained else 1.0  # the untrained model, left of every trained point
    for k, preset in enumerate(study["presets"]):
        grid = sorted((r for r in runs if r["preset"] == preset and r["label"] == "grid"),
                      key=lambda r: r["train_flops"])
        x = [r["train_flops"] for r in grid]
        for style, key in (("-", "last_block"), ("--", "headline_block")):
            ax_recall.plot(x, [recall(r, key) for r in grid], style, marker="o", color=f"C{k}",
                           label=f"{preset.split('_patch')[0]}, {key.replace('_', ' ')}")
        ax_loss.plot(x, [r["loss_last"] for r in grid], "-o", color=f"C{k}", label=preset.split("_patch")[0])
        if k == 0:  # per phenotype class: the first preset's budget sweep (last block)
            classes = [c for c in grid[0]["blocks"][str(grid[0]["last_block"])]["recall"]["planted"] if c != "all"]
            for j, cls in enumerate(classes):
                ax_class.plot(x, [recall(r, cls=cls) for r in grid], "-o", color=f"C{j}", label=cls)
                value = study["baselines"].get("pixel-stats", {}).get("recall", {}).get("planted", {}).get(cls, {})
                if value.get("recall") is not None:
                    ax_class.axhline(value["recall"], linestyle=":", color=f"C{j}")
            ax_class.set_title(f"{preset.split('_patch')[0]} per class (dotted: pixel statistics)", fontsize=9)
    for m, r in enumerate(r for r in runs if r["label"] != "grid"):
        x = r["train_flops"] or untrained_x
        ax_recall.plot([x], [recall(r)], marker="xv^sD"[m % 5], color="k", linestyle="",
                       label=f"{r['preset'].split('_patch')[0]} {r['label']}" + (" (x: not to scale)"
                                                                                    if not r["train_flops"] else ""))
        if r["loss_last"] is not None:
            ax_loss.plot([x], [r["loss_last"]], marker="xv^sD"[m % 5], color="k", linestyle="")
    for style, name in zip((":", "-.", "--"), ("random", "pixel-stats", "cellprofiler")):
        value = study["baselines"].get(name, {}).get("recall", {}).get("planted", {}).get("all", {}).get("recall")
        if value is not None:
            ax_recall.axhline(value, linestyle=style, color="grey", label=name)
    for ax, label in ((ax_recall, "planted recall at the 5% tails"), (ax_class, "planted recall, last block"),
                      (ax_loss, "final training loss")):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_recall.set_ylim(0, 1)
    ax_class.set_ylim(0, 1)
    fig.suptitle("toy run: not a result" if study["toy"] else "scaling study, synthetic screen", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


CLASSES = ("intensity", "size_count", "shape", "texture", "localisation")


def study_table(study: dict) -> str:
    """The study as one markdown table: a row per run (its last block, and the block the evaluation headlines when
    that is another one) and per baseline; recall of the planted complexes overall [95% interval] and per phenotype
    class, phenotypic activity mAP."""
    def cells(recall: dict) -> list[str]:
        planted = recall["planted"]
        whole = planted["all"]
        if whole["recall"] is None:  # no scorable pair
            return ["n/a"] + ["" for _ in CLASSES]
        return [f"{whole['recall']:.3f} [{whole['low']:.2f}, {whole['high']:.2f}]"] + [
            "n/a" if planted.get(c, {}).get("recall", "") is None else
            f"{planted[c]['recall']:.2f}" if c in planted else "" for c in CLASSES]

    head = ["model", "run", "crops", "training FLOPs", "final loss", "block", "planted [95% CI]", *CLASSES,
            "activity mAP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in study["runs"]:
        blocks = [r["last_block"]] + ([r["headline_block"]] if r["headline_block"] != r["last_block"] else [])
        for b in blocks:
            block = r["blocks"][str(b)]
            mark = "last" if b == r["last_block"] else "headline"
            loss = "" if r["loss_last"] is None else f"{r['loss_last']:.3f}"
            lines.append("| " + " | ".join([r["preset"].replace("mae_vit_", "").replace("_256", ""), r["label"],
                                            f"{r['crops_trained']:,}", f"{r['train_flops']:.2e}", loss,
                                            f"{b} ({mark})", *cells(block["recall"]),
                                            f"{block['activity_map']:.3f}"]) + " |")
    for name, base in study["baselines"].items():
        lines.append("| " + " | ".join([name, "baseline", "", "", "", "", *cells(base["recall"]),
                                        f"{base['activity_map']:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


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
    table = os.path.splitext(args.json)[0] + ".md"
    write_text(table, study_table(study))
    print(study_table(study))
    print(f"study: {args.json}\nplot:  {args.png}\ntable: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
