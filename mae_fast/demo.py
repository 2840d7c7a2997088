"""`mae-fast demo`: the whole job on the built-in synthetic screen.

1. generate the screen (RxRx3 layout) with `mae_fast.data.synthetic`;
2. train a small MAE on random 256² crops with `mae_fast.train` (data pipeline, fused ops, Lion, checkpoints);
3. embed every site tile by tile and average per well with `mae_fast.embed`;
4. score recall of the planted complexes with `mae_fast.evaluate`, beside random and pixel-statistics baselines.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from mae_fast.models import list_presets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    p.add_argument("--preset", default="mae_vit_micro_patch16_256", help=f"model preset ({', '.join(list_presets())})")
    p.add_argument("--seconds", type=float, default=150.0, help="training time budget in seconds (default 150)")
    p.add_argument("--max-steps", type=int, default=300, help="training steps planned for the schedule (default 300)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak Lion learning rate of the demo (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="a very small screen and run (for tests)")


def screen_config(tiny: bool, seed: int):
    from mae_fast.data.synthetic import SyntheticScreenConfig

    if tiny:
        return SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=3, complex_size=3, n_singletons=3,
                                     n_empty_controls=3, n_crispr_controls=1, site_size=256, seed=seed)
    return SyntheticScreenConfig(seed=seed)


def run(args) -> int:
    from mae_fast.data.synthetic import make_synthetic_screen
    from mae_fast.embed import embed_dataset
    from mae_fast.evaluate import evaluate, write_outputs
    from mae_fast.train import DataConfig, TrainConfig, train

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    screen = make_synthetic_screen(os.path.join(out, "screen"), screen_config(args.tiny, args.seed))
    print(f"synthetic screen: {screen.root} ({len(screen.genes)} genes, {time.time() - t0:.1f} s)")

    result = train(TrainConfig(
        preset=args.preset, data=DataConfig(root=screen.root), out_dir=os.path.join(out, "train"), overwrite=True,
        global_batch=args.batch_size, micro_batch=args.batch_size, steps=args.max_steps, lr=args.lr,
        max_seconds=args.seconds, seed=args.seed, device=args.device,
        checkpoint_every=max(1, args.max_steps // 2), log_every=max(1, args.max_steps // 20),
    ))
    losses = result.losses
    k = max(1, min(10, len(losses) // 4))
    loss_first, loss_last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    print(f"trained {args.preset} for {result.steps} steps ({result.crops} crops, {result.crops_per_second:.1f} "
          f"crops/s): loss {loss_first:.4f} -> {loss_last:.4f}")

    embeddings = embed_dataset(result.model_dir, screen.root, os.path.join(out, "embeddings.parquet"),
                               overwrite=True, device=args.device)
    print(f"embedded {embeddings.n_wells} wells ({embeddings.n_tiles} tiles, {embeddings.tiles_per_second:.1f} "
          f"tiles/s)")

    evaluation = evaluate(embeddings.out, {"synthetic_complexes": screen.relationships_csv}, arms=screen.arms_csv,
                          baselines=("random", "pixel-stats"), images_root=screen.root)
    figures = write_outputs(evaluation, os.path.join(out, "evaluation"), heatmap_relationships="synthetic_complexes")
    print("\nrecall of the planted complexes (pairs in the top/bottom 5% of cosine similarities):")
    print(evaluation.markdown())

    summary = {
        "preset": args.preset, "steps": result.steps, "crops": result.crops, "train_seconds": round(result.seconds, 2),
        "crops_per_second": round(result.crops_per_second, 2), "loss_first": loss_first, "loss_last": loss_last,
        "losses": losses, "embeddings": embeddings.out,
        "recall": evaluation.recall_table().to_dict(orient="index"),
    }
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"\nloss curve:      {result.loss_curve_path}")
    for path in result.recon_paths[-1:]:
        print(f"reconstruction:  {path}")
    print(f"embeddings:      {embeddings.out}")
    for key, path in figures.items():
        print(f"{key + ':':16} {path}")
    print(f"summary:         {os.path.join(out, 'demo_summary.json')}")
    return 0
