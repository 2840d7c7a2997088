"""Train an MAE from Python on images in your own folder layout.

Any layout works once it is described as a table with one row per site (field of view) and one file column per
channel -- the shape of JUMP's load_data tables, which mae_fast reads (`SiteIndex.from_jump`). This example
assumes `IMAGES/<plate>/<well>/<channel>.<ext>` (e.g. `P1/B02/DNA.tif`); change `describe_layout` for yours.

    python examples/train_custom_layout.py --images IMAGES --channels DNA,ER,RNA,AGP,Mito --out runs/custom \\
        --preset mae_vit_small_patch16_256 --steps 20000 --batch 256
    python examples/train_custom_layout.py --toy --out /tmp/example_train   # seconds: a tiny synthetic screen

Images: PNG, TIFF, JPEG or JPEG 2000, 8 or 16 bit, at least 256² (the model trains on random 256² crops with
flips, each crop standardised per channel). The run folder holds checkpoints (`--resume` via
`TrainConfig(resume=True)`), metrics, a loss curve and the final model, which `mae-fast embed --checkpoint` takes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import pandas as pd

from mae_fast.training.config import DataConfig, TrainConfig
from mae_fast.training.loop import train

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".jp2")


def describe_layout(images: str, channels: list[str]) -> pd.DataFrame:
    """One row per `images/<plate>/<well>/` folder holding a file for every channel: Metadata_Plate,
    Metadata_Well and FileName_Orig<channel> (absolute paths). Folders that lack a channel are reported, not used."""
    rows, incomplete = [], []
    for plate in sorted(os.listdir(images)):
        plate_dir = os.path.join(images, plate)
        if not os.path.isdir(plate_dir):
            continue
        for well in sorted(os.listdir(plate_dir)):
            files = {os.path.splitext(f)[0]: os.path.join(plate_dir, well, f)
                     for f in os.listdir(os.path.join(plate_dir, well)) if f.lower().endswith(IMAGE_EXTENSIONS)}
            if not all(c in files for c in channels):
                incomplete.append(f"{plate}/{well}")
                continue
            rows.append({"Metadata_Plate": plate, "Metadata_Well": well,
                         **{f"FileName_Orig{c}": os.path.abspath(files[c]) for c in channels}})
    if incomplete:
        print(f"left out {len(incomplete)} folder(s) without every channel {channels}: {incomplete[:5]}")
    if not rows:
        raise SystemExit(f"no <plate>/<well>/ folder under {images} has a file for every channel {channels}")
    return pd.DataFrame(rows)


def toy_images(out: str) -> tuple[str, list[str]]:
    """A tiny synthetic screen (RxRx3 layout) copied into the custom layout, channels named after their stains."""
    from mae_fast.data.index import SiteIndex
    from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen

    stains = ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"]
    screen = make_synthetic_screen(os.path.join(out, "synthetic"), SyntheticScreenConfig(
        n_experiments=1, n_plates=1, n_complexes=2, complex_size=2, n_singletons=2, n_empty_controls=2,
        n_crispr_controls=0, site_size=256, seed=0))
    images = os.path.join(out, "images")
    for site in SiteIndex.from_rxrx(screen.root):
        folder = os.path.join(images, f"P{site.plate}", site.address)
        os.makedirs(folder, exist_ok=True)
        for stain, source in zip(stains, site.sources):
            shutil.copyfile(source, os.path.join(folder, stain + os.path.splitext(source)[1]))
    return images, stains


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="IMAGES/<plate>/<well>/<channel>.<ext>")
    parser.add_argument("--channels", help="channel file names (without extension), in model input order")
    parser.add_argument("--out", required=True, help="output folder (sites.csv, run/)")
    parser.add_argument("--preset", default="mae_vit_small_patch16_256")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64, help="crops per optimiser step")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--toy", action="store_true", help="a micro MAE for 3 steps on a tiny synthetic screen")
    args = parser.parse_args(argv)
    if args.toy:
        images, channels = toy_images(args.out)
        args.preset, args.steps, args.batch = "mae_vit_micro_patch16_256", 3, 4
    elif args.images and args.channels:
        images, channels = args.images, [c.strip() for c in args.channels.split(",") if c.strip()]
    else:
        parser.error("give --images and --channels, or --toy")

    table = describe_layout(images, channels)
    table_path = os.path.join(args.out, "sites.csv")
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(table_path, index=False)
    print(f"{len(table)} sites x {len(channels)} channels ({', '.join(channels)}) -> {table_path}")

    config = TrainConfig(
        preset=args.preset, model={"in_chans": len(channels)},
        data=DataConfig(root=table_path, format="jump", channels=channels),
        out_dir=os.path.join(args.out, "run"), overwrite=True, steps=args.steps,
        global_batch=args.batch, micro_batch=args.batch, device=args.device,
        checkpoint_every=max(1, args.steps // 2), log_every=max(1, args.steps // 10), progress=not args.toy,
    )
    result = train(config)
    print(f"trained {result.steps} steps ({result.crops} crops, {result.crops_per_second:.1f} crops/s): "
          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    print(f"model: {result.model_dir}  (mae-fast embed --checkpoint {result.model_dir} ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
