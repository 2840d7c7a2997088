"""Recall vs training time of the demo's MAE: ONE training run of `--minutes`, snapshotted at `--snapshots` minutes
of training, each snapshot embedded and evaluated as `mae-fast demo` does (same screen, training settings, embedding
and evaluation functions: mae_fast.cli.demo, mae_fast.training, mae_fast.inference, mae_fast.evaluation).

    python benchmarks/demo_curve.py --minutes 10 --snapshots 1,2.5,5,10        # the README's curve (2 CPU cores)
    python benchmarks/demo_curve.py --tiny --seconds 6 --snapshots 0.05         # toy size (tests)

How the snapshots are taken: the run's schedule is planned for the whole `--minutes` (like `mae-fast demo
--minutes N`: planned from the step time of a probe run, or --max-steps); the run stops at each snapshot time (its checkpoint written),
the weights are embedded and evaluated, and the same run resumes from that checkpoint (`resume=True`; bit for bit
on CPUs). So the early snapshots are points of one long run, mid-schedule (learning rate not annealed), not short
runs of their own. Training time is the trainer's own clock, summed over the segments (resuming, embedding and
evaluation not counted).

Outputs: --json (default benchmarks/results/demo_curve.json): per snapshot the training minutes, steps, loss,
and recall [95% bootstrap interval] (n pairs) of the planted complexes (overall and per phenotype class) and of
EFAAR's CORUM (when efaar-benchmarking is installed; every EFAAR database is in the JSON), plus the random and
pixel-statistics baselines once (they do not depend on the model); --png: the curve. Work files (screen, run,
embeddings) under --out (default demo_curve_out).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mae_fast.cli import demo, demo_plan  # noqa: E402
from mae_fast.data.synthetic import make_synthetic_screen  # noqa: E402
from mae_fast.device import resolve_device  # noqa: E402
from mae_fast.evaluation import evaluate  # noqa: E402
from mae_fast.inference.embed import embed_dataset  # noqa: E402
from mae_fast.io import atomic_write, atomic_write_json  # noqa: E402
from mae_fast.perf.provenance import provenance  # noqa: E402
from mae_fast.training.config import validate  # noqa: E402
from mae_fast.training.loop import train  # noqa: E402

DEFAULT_SNAPSHOTS = (1.0, 2.5, 5.0, 10.0)
CURVE_DATABASES = ("planted", "CORUM")     # drawn in the PNG (when present); the JSON has every database
REFERENCE_BASELINES = ("random", "pixel-stats")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    p.set_defaults(out="demo_curve_out", minutes=None)
    p.add_argument("--snapshots", type=_minutes_list, default=None,
                   help="training minutes at which to snapshot, comma-separated (default: "
                        f"{','.join(f'{m:g}' for m in DEFAULT_SNAPSHOTS)} up to --minutes; the end is always one)")
    p.add_argument("--no-baselines", action="store_true", help="skip the random / pixel-statistics reference lines")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "demo_curve.json"))
    p.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "results", "demo_curve.png"))
    args = p.parse_args(argv)
    if args.minutes is None and args.seconds is None:
        args.minutes = DEFAULT_SNAPSHOTS[-1]
    return args


def _minutes_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated minutes, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"snapshot minutes must be finite and > 0, got {text!r}")
    return values


def snapshot_seconds(snapshots: list[float] | None, total_seconds: float) -> list[float]:
    """Sorted distinct snapshot times in seconds, none past the run's budget, the budget itself last."""
    minutes = DEFAULT_SNAPSHOTS if snapshots is None else snapshots
    if snapshots is not None and max(snapshots) * 60 > total_seconds + 1e-9:
        raise ValueError(f"--snapshots reach {max(snapshots):g} min, past the run's {total_seconds / 60:g} min")
    times = sorted({round(m * 60, 6) for m in minutes if m * 60 < total_seconds} | {round(total_seconds, 6)})
    return times


def _recall_rows(evaluation, source: str) -> dict:
    """{database: {class: {recall, low, high, n_pairs}}} of one source ("all" = the whole database)."""
    out: dict = {}
    table = evaluation.table()
    for row in table[table.source == source].to_dict(orient="records"):
        out.setdefault(row["database"], {})[row["phenotype_class"]] = {
            "recall": _number(row["recall"]), "low": _number(row["recall_low"]), "high": _number(row["recall_high"]),
            "n_pairs": int(row["n_pairs"]), "seeds": int(row["seeds"]),
        }
    return out


def _number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 4)


def run_curve(args) -> dict:

    models, seconds, steps = demo.check_options(args)
    if len(models) != 1:
        raise ValueError("demo_curve trains one model: give --preset, not --models")
    preset = models[0]
    times = snapshot_seconds(args.snapshots, seconds)
    out = os.path.abspath(args.out)
    load_start = os.getloadavg()
    validate(demo.train_config(preset, os.path.join(out, "screen"), os.path.join(out, "train"), args, seconds,
                               steps or demo_plan.MIN_STEPS))
    os.makedirs(out, exist_ok=True)
    screen = make_synthetic_screen(os.path.join(out, "screen"), demo.screen_config(args.tiny, args.seed))
    if steps is None:  # as the demo plans it: from a probe run's step time
        steps, _ = demo.planned_steps(preset, screen.root, out, args, seconds)
    base = demo.train_config(preset, screen.root, os.path.join(out, "train"), args, seconds, steps)
    relationships, efaar_note = demo.demo_relationships(screen)

    snapshots, references, trained = [], {}, 0.0
    for i, target in enumerate(times):
        # a segment that overshot the next target still trains one step (max_seconds 0 would mean no limit)
        segment = dataclasses.replace(base, max_seconds=max(target - trained, 1e-3), overwrite=i == 0, resume=i > 0)
        result = train(segment)
        trained += result.seconds
        embeddings = embed_dataset(result.model_dir, screen.root, os.path.join(out, f"embeddings_{i}.parquet"),
                                   overwrite=True, device=args.device, seed=args.seed, progress=False)
        baselines = () if (references or args.no_baselines) else REFERENCE_BASELINES
        evaluation = evaluate(embeddings.out, relationships, arms=screen.arms_csv, baselines=baselines,
                              images_root=screen.root, gene_classes=screen.plan.gene_class, name="model")
        for name in baselines:
            references[name] = _recall_rows(evaluation, name)
        snapshots.append({
            "target_minutes": round(target / 60, 4), "train_minutes": round(trained / 60, 4), "steps": result.steps,
            "loss_last": float(result.losses[-1]) if result.losses else None, "recall": _recall_rows(evaluation, "model"),
        })
        print(f"snapshot {i + 1}/{len(times)}: {trained / 60:.2f} min of training, step {result.steps} of {steps}, "
              f"planted recall {snapshots[-1]['recall']['planted']['all']['recall']}", flush=True)
        if result.steps >= steps:     # the schedule is done: later snapshots would be the same weights
            break

    return {
        "what": "recall vs training time of one MAE run of the demo (snapshots of one schedule; see the script's doc)",
        "command": " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]) if __name__ == "__main__" else None,
        "preset": preset, "budget_minutes": round(seconds / 60, 4), "planned_steps": steps,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "device": args.device, "tiny": args.tiny,
        "tail": evaluation.config.tails[0], "interval": evaluation.config.interval,
        "screen": {"genes": len(screen.genes), "complexes": len(screen.complexes), "source": screen.source},
        "efaar_note": efaar_note, "snapshots": snapshots, "baselines": references,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "provenance": provenance(resolve_device(args.device),
                                 command=" ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])),
    }


def plot_curve(curve: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [s["train_minutes"] for s in curve["snapshots"]]
    for k, db in enumerate(d for d in CURVE_DATABASES if d in curve["snapshots"][0]["recall"]):
        points = [s["recall"][db]["all"] for s in curve["snapshots"]]
        y = [p["recall"] for p in points]
        err = [[p["recall"] - p["low"] for p in points], [p["high"] - p["recall"] for p in points]]
        colour = f"C{k}"
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colour,
                    label=f"MAE, {db} (n={points[0]['n_pairs']})")
        for style, name in zip(("--", ":"), REFERENCE_BASELINES):
            ref = curve["baselines"].get(name, {}).get(db, {}).get("all")
            if ref and ref["recall"] is not None:
                ax.axhline(ref["recall"], linestyle=style, color=colour, alpha=0.7, label=f"{name}, {db}")
    ax.set_xlabel("training time (minutes, trainer's clock)")
    ax.set_ylabel(f"recall at the {curve['tail']:g}% tails [95% interval]")
    ax.set_title(f"{curve['preset']}: one run, {curve['planned_steps']} planned steps", fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        curve = run_curve(args)
    except ValueError as err:
        print(f"demo_curve: {err}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    atomic_write_json(args.json, curve)
    plot_curve(curve, args.png)
    print(f"curve: {args.json}\nplot:  {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
