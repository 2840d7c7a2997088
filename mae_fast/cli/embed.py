"""`mae-fast embed`: embed every site of a screen into per-well (and per-site) parquet tables, resumable by plate
(see `mae_fast.inference.embed`)."""
from __future__ import annotations

import argparse
import sys

from mae_fast.cli.common import number, run_command
from mae_fast.inference.embed import EmbedConfig, embed
from mae_fast.training.config import ConfigError, DataConfig, max_workers
from mae_fast.training.distributed import env_world


def _csv(text: str) -> list[str]:
    items = [t for t in (s.strip() for s in text.split(",")) if t]
    if not items:  # "--channels ," would silently mean "all"
        raise argparse.ArgumentTypeError(f"expected a comma list with at least one item, got {text!r}")
    return items


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="our checkpoint folder / training run folder, an OpenPhenom folder or file, a timm encoder "
                        "folder, a timm state dict file (with --preset), or a Hugging Face Hub repo id "
                        "(e.g. recursionpharma/OpenPhenom; HF_HUB_OFFLINE=1 reads the local cache only)")
    p.add_argument("--preset", help="architecture of a single weights file (timm state dict, or a baseline's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="architecture overrides for --preset, e.g. model.img_size=128")
    p.add_argument("--data", required=True, help="dataset root (RxRx folder, RxRx3-core parquet, JUMP table, pack)")
    p.add_argument("--format", default="auto", help="auto, rxrx, rxrx3_core, jump, pack")
    p.add_argument("--metadata", help="metadata CSV (default ROOT/metadata.csv)")
    p.add_argument("--channels", type=_csv, help="comma list: RxRx channel numbers or JUMP channel names")
    p.add_argument("--experiments", type=_csv, help="comma list of experiments to embed")
    p.add_argument("--plates", type=_csv, help="comma list of plates to embed")
    p.add_argument("--out", required=True, help="well table (parquet)")
    p.add_argument("--sites", action="store_true", help="also write OUT_STEM_sites.parquet (one row per site)")
    p.add_argument("--per-channel", action="store_true", help="CA-MAE: per-channel embeddings")
    p.add_argument("--blocks", metavar="all|LIST",
                   help="ViTs: each encoder block's embedding (all, or 1-based block numbers such as 2,4) in one "
                        "table with a `block` column; `mae-fast evaluate` scores each block")
    p.add_argument("--batch-size", type=number(int, minimum=1), default=64, help="tiles per forward pass (default 64)")
    p.add_argument("--edge", default="drop", help="tiles at the border: drop, center, pad, error")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto (bf16 on GPU and on CPUs with native bf16 units -- AMX / AVX512-BF16 -- else fp32), "
                        "bf16, fp32")
    p.add_argument("--num-workers", type=number(int, minimum=0, maximum=max_workers()), default=None,
                   help="decode workers (default min(4, cores); at most 4 per core)")
    p.add_argument("--backend", default="auto", help="image decoding: auto, torch, dali")
    p.add_argument("--on-error", default="raise", choices=("raise", "skip"), help="bad sites: stop, or skip and count")
    p.add_argument("--threads", type=number(int, minimum=0), default=0, help="torch CPU threads (0: default)")
    p.add_argument("--seed", type=number(int, minimum=0, maximum=2**63 - 1), default=0,
                   help="AdaBN models: seed of which tiles share a batch (default 0)")
    p.add_argument("--adabn-window", type=number(int, minimum=0), default=0,
                   help="AdaBN models: tiles of one plate shuffled together into batches (default 8 x batch size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and its parts)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> EmbedConfig:
    from mae_fast.training.config import _coerce, _model_fields, parse_override

    model = {}
    fields = _model_fields(args.preset)
    for text in args.overrides:
        key, value = parse_override(text)
        name = key[len("model."):] if key.startswith("model.") else key
        if name not in fields:
            raise ConfigError(f"unknown model key {key!r}; valid keys: {', '.join('model.' + k for k in fields)}")
        model[name] = _coerce(value, fields[name], key)
    data = DataConfig(root=args.data, format=args.format, metadata=args.metadata, channels=args.channels,
                      experiments=args.experiments, plates=args.plates, num_workers=args.num_workers,
                      backend=args.backend, on_error=args.on_error)
    return EmbedConfig(checkpoint=args.checkpoint, out=args.out, data=data, preset=args.preset, model=model,
                       edge=args.edge, batch_size=args.batch_size, device=args.device, amp=args.amp,
                       per_channel=args.per_channel, sites=args.sites, overwrite=args.overwrite,
                       progress=not args.no_progress, threads=args.threads, seed=args.seed,
                       adabn_window=args.adabn_window, blocks=args.blocks)


def run(args) -> int:
    result = embed(config_from_args(args))  # errors: the CLI's one handler (mae_fast.cli.common.run_command)
    if env_world().is_main:
        print(f"embeddings:  {result.out}")
        if result.sites_path:
            print(f"sites:       {result.sites_path}")
    return 0


def interrupted(args) -> str:
    """What an interrupted embedding keeps: the finished plates' parts, reused by a rerun."""
    import os

    from mae_fast.inference.tables import output_paths

    parts_dir = output_paths(args.out)[2]
    done = [n for n in os.listdir(parts_dir) if n.endswith(".parquet")] if os.path.isdir(parts_dir) else []
    return (f"{len(done)} finished plate part(s) kept in {parts_dir}; run the same command again to continue"
            if done else "no plate was finished; run the command again")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae-fast embed", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv), "mae-fast embed", interrupted)


if __name__ == "__main__":
    sys.exit(main())
