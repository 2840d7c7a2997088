"""`mae-fast demo`: the whole job on the built-in synthetic screen.

1. generate the screen (RxRx3 layout) with `mae_fast.data.synthetic`;
2. train each model on random 256² crops with `mae_fast.train` (data pipeline, fused ops, optimiser, checkpoints):
   by default a small MAE; `--models` compares several, e.g. the MAE with the seed paper's baselines
   (`--models mae_vit_micro_patch16_256,wsl_densenet_micro_256,munet_micro_256`);
3. embed every site tile by tile and average per well with `mae_fast.embed`;
4. score recall of the planted complexes with `mae_fast.evaluate`: one table with every model side by side,
   beside random and pixel-statistics baselines.

Outputs (OUT = --out): the screen in OUT/screen; per model its training run (OUT/<model>/train) and embeddings
(OUT/<model>/embeddings.parquet) -- a single model keeps the flat layout OUT/train, OUT/embeddings.parquet; the
combined evaluation in OUT/evaluation (evaluation.json, recall.md, recall_curve.png, similarity_heatmap.png), the
recall table again at OUT/recall.md, and OUT/demo_summary.json.

Learning rates: the MAE's Lion --lr (1e-3); the WSL classifier's SGD --wsl-lr (0.05: the preset's linear
scaling, 0.1 per 256 crops, would give ~0.006 at a demo batch of 16, too small to learn in a few hundred steps);
MU-Net's AdamW --munet-lr (1e-3, the paper's). AdaBN models get ghost batches no larger than the batch.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from mae_fast import baselines as bl
from mae_fast.cli import number
from mae_fast.models import list_presets

DEFAULT_WSL_LR = 0.05
DEFAULT_MUNET_LR = 1e-3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    p.add_argument("--preset", default="mae_vit_micro_patch16_256", help=f"model preset ({', '.join(list_presets())})")
    p.add_argument("--models", type=_names,
                   help="comma-separated presets to train, embed and compare (default: --preset alone), e.g. "
                        "mae_vit_micro_patch16_256,wsl_densenet_micro_256,munet_micro_256; baselines: "
                        + ", ".join(bl.list_baselines()))
    p.add_argument("--seconds", type=number(float, above=0), default=150.0,
                   help="training time budget per model in seconds (default 150)")
    p.add_argument("--max-steps", type=number(int, minimum=1), default=300, help="training steps planned for the schedule (default 300)")
    p.add_argument("--batch-size", type=number(int, minimum=1), default=16)
    p.add_argument("--lr", type=number(float, above=0), default=1e-3, help="peak Lion learning rate of the MAE (default 1e-3)")
    p.add_argument("--wsl-lr", type=number(float, above=0), default=DEFAULT_WSL_LR,
                   help=f"peak SGD learning rate of WSL baselines (default {DEFAULT_WSL_LR})")
    p.add_argument("--munet-lr", type=number(float, above=0), default=DEFAULT_MUNET_LR,
                   help=f"peak AdamW learning rate of MU-Net baselines (default {DEFAULT_MUNET_LR:g})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="a very small screen and run (for tests)")


def _names(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def screen_config(tiny: bool, seed: int):
    from mae_fast.data.synthetic import SyntheticScreenConfig

    if tiny:
        return SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=3, complex_size=3, n_singletons=3,
                                     n_empty_controls=3, n_crispr_controls=1, site_size=256, seed=seed)
    return SyntheticScreenConfig(seed=seed)


def check_models(names: list[str]) -> list[str]:
    """Known, distinct presets; raises ValueError naming the valid ones."""
    valid = list_presets() + bl.list_baselines()
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown model preset(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated or not names:
        raise ValueError(f"--models needs distinct presets, got {', '.join(names) or 'none'}")
    return names


def train_config(preset: str, screen_root: str, out_dir: str, args):
    """The demo's training run of one model: its family's demo lr, one micro-batch per step."""
    from mae_fast.train import DataConfig, TrainConfig

    model: dict = {}
    lr = args.lr
    if bl.is_baseline(preset):
        base = bl.get_baseline_config(preset)
        lr = args.wsl_lr if base.family == "wsl" else args.munet_lr
        if getattr(base, "adabn", False):  # ghost batches live within one (single-plate) micro-batch
            model["virtual_batch_size"] = min(base.virtual_batch_size, args.batch_size)
    return TrainConfig(
        preset=preset, model=model, data=DataConfig(root=screen_root), out_dir=out_dir, overwrite=True,
        global_batch=args.batch_size, micro_batch=args.batch_size, steps=args.max_steps, lr=lr,
        max_seconds=args.seconds, seed=args.seed, device=args.device,
        checkpoint_every=max(1, args.max_steps // 2), log_every=max(1, args.max_steps // 20),
    )


def merge_evaluations(results: list, names: list[str]):
    """One EvaluationResult holding the sources `names` (models, then baselines) of several evaluations of the same
    relationships, e.g. one per model embedding table."""
    from mae_fast.evaluate import EvaluationResult

    first = results[0]
    merged = EvaluationResult(sources={}, relationships=first.relationships, config=first.config,
                              relationship_sets=first.relationship_sets)
    for name in names:
        source = next(r for r in results if name in r.sources)
        merged.sources[name] = source.sources[name]
        merged.maps[name] = source.maps[name]
    return merged


def _loss_ends(losses: list[float]) -> tuple[float, float]:
    k = max(1, min(10, len(losses) // 4))
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def run(args) -> int:
    from mae_fast.data.synthetic import make_synthetic_screen
    from mae_fast.embed import embed_dataset
    from mae_fast.evaluate import evaluate, write_outputs
    from mae_fast.train import train, validate

    models = check_models(args.models or [args.preset])  # errors: the CLI's one handler (mae_fast.cli)
    single = len(models) == 1
    out = os.path.abspath(args.out)
    for preset in models:  # every training setting checked before the screen is generated
        validate(train_config(preset, os.path.join(out, "screen"), os.path.join(out, preset, "train"), args))
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    screen = make_synthetic_screen(os.path.join(out, "screen"), screen_config(args.tiny, args.seed))
    print(f"synthetic screen: {screen.root} ({len(screen.genes)} genes, {time.time() - t0:.1f} s)")

    runs: dict[str, dict] = {}
    for preset in models:
        folder = out if single else os.path.join(out, preset)
        result = train(train_config(preset, screen.root, os.path.join(folder, "train"), args))
        first, last = _loss_ends(result.losses)
        print(f"trained {preset} for {result.steps} steps ({result.crops} crops, {result.crops_per_second:.1f} "
              f"crops/s): loss {first:.4f} -> {last:.4f}")
        embeddings = embed_dataset(result.model_dir, screen.root, os.path.join(folder, "embeddings.parquet"),
                                   overwrite=True, device=args.device, seed=args.seed)
        print(f"embedded {embeddings.n_wells} wells with {preset} ({embeddings.n_tiles} tiles, "
              f"{embeddings.tiles_per_second:.1f} tiles/s)")
        runs[preset] = {"result": result, "embeddings": embeddings, "loss_first": first, "loss_last": last}

    # one evaluation per embedding table (the first also scores random and pixel statistics), merged into one table
    sources = ["model"] if single else models
    relationships = {"synthetic_complexes": screen.relationships_csv}
    evaluations = [evaluate(runs[models[0]]["embeddings"].out, relationships, arms=screen.arms_csv,
                            baselines=("random", "pixel-stats"), images_root=screen.root, name=sources[0])]
    for preset, source in zip(models[1:], sources[1:]):
        evaluations.append(evaluate(runs[preset]["embeddings"].out, relationships, arms=screen.arms_csv, name=source))
    evaluation = merge_evaluations(evaluations, sources + ["random", "pixel-stats"])
    figures = write_outputs(evaluation, os.path.join(out, "evaluation"), heatmap_relationships="synthetic_complexes")
    table_path = os.path.join(out, "recall.md")
    with open(table_path, "w") as f:
        f.write(evaluation.markdown())
    print("\nrecall of the planted complexes (pairs in the top/bottom 5% of cosine similarities):")
    print(evaluation.markdown())

    per_model = {}
    for preset, source in zip(models, sources):
        r = runs[preset]
        result = r["result"]
        per_model[preset] = {
            "preset": preset, "source": source, "steps": result.steps, "crops": result.crops,
            "train_seconds": round(result.seconds, 2), "crops_per_second": round(result.crops_per_second, 2),
            "loss_first": r["loss_first"], "loss_last": r["loss_last"], "losses": result.losses,
            "train_dir": result.out_dir, "embeddings": r["embeddings"].out,
        }
    summary = {**(per_model[models[0]] if single else {}), "models": per_model,
               "recall": evaluation.recall_table().to_dict(orient="index"), "recall_table": table_path}
    summary_path = os.path.join(out, "demo_summary.json")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1, default=str)

    for preset in models:
        result = runs[preset]["result"]
        print(f"\n{preset}:" if not single else "")
        print(f"loss curve:      {result.loss_curve_path}")
        for path in result.recon_paths[-1:]:
            print(f"reconstruction:  {path}")
        print(f"embeddings:      {runs[preset]['embeddings'].out}")
    print()
    for key, path in figures.items():
        print(f"{key + ':':16} {path}")
    print(f"recall table:    {table_path}")
    print(f"summary:         {summary_path}")
    return 0
