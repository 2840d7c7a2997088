"""`mae-fast pack`: convert a dataset (RxRx folders, RxRx3-core parquet, JUMP table) into a pack folder of
losslessly compressed tiles that the crop loader reads fast (see mae_fast/data/pack.py for the format).

Examples:
    mae-fast pack --layout rxrx --source rxrx3/ --out rxrx3_packed/ --workers 16
    mae-fast pack --layout rxrx3-core --source rxrx3_core/data/ --metadata rxrx3_core_metadata.csv --out core_packed/
    mae-fast pack --layout jump --source load_data.csv --jump-channels DNA,ER,RNA,AGP,Mito --out jump_packed/
"""
from __future__ import annotations

import argparse
import os

from mae_fast.cli.common import number
from mae_fast.training.config import max_workers

LAYOUTS = ("rxrx", "rxrx3-core", "jump")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=LAYOUTS, default="rxrx", help="dataset layout of --source (default rxrx)")
    parser.add_argument("--source", required=True,
                        help="rxrx: dataset root; rxrx3-core: parquet file/folder/glob; jump: load_data CSV/parquet")
    parser.add_argument("--out", required=True, help="pack folder to write (written under a temporary name, then renamed)")
    parser.add_argument("--metadata", default=None, help="metadata CSV (rxrx default: SOURCE/metadata.csv)")
    parser.add_argument("--channels", default=None, help="rxrx/rxrx3-core channel numbers, e.g. 1,2,3,4,5,6 (default: all found)")
    parser.add_argument("--jump-channels", default=None,
                        help="jump: NAME or NAME=COLUMN list in the wanted order (default DNA,ER,RNA,AGP,Mito from FileName_Orig*)")
    parser.add_argument("--jump-root", default=None, help="jump: folder holding the files (overrides PathName_* columns)")
    parser.add_argument("--experiment", action="append", default=None, help="keep only this experiment (repeatable)")
    parser.add_argument("--plate", action="append", default=None, help="keep only this plate (repeatable)")
    parser.add_argument("--tile", type=number(int, minimum=1), default=256, help="pack tile size in pixels (default 256)")
    parser.add_argument("--codec", choices=("blosc2", "raw"), default="blosc2", help="tile codec (default blosc2: lz4 + bit-shuffle, lossless)")
    parser.add_argument("--shard-gb", type=number(float, above=0), default=1.0, help="approximate shard file size in GB (default 1)")
    parser.add_argument("--workers", type=number(int, minimum=0, maximum=max_workers()), default=os.cpu_count() or 1,
                        help=f"decoding processes, at most {max_workers()} (4 per core; default: all cores)")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="raise: stop at the first bad input; skip: leave bad sites out and list them")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _jump_map(spec: str | None):
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if all("=" in s for s in items):
        from mae_fast.data.index import check_unique_channels

        pairs = [s.split("=", 1) for s in items]
        check_unique_channels([name for name, _ in pairs])
        return dict(pairs)
    if any("=" in s for s in items):
        raise ValueError("--jump-channels: use either NAME,NAME,... or NAME=COLUMN,NAME=COLUMN,..., not both")
    return items


def build_index(args):
    from mae_fast.data.index import SiteIndex

    channels = [int(c) for c in args.channels.split(",")] if args.channels else None
    if args.layout == "rxrx":
        index = SiteIndex.from_rxrx(args.source, args.metadata, channels=channels, on_error=args.on_error)
    elif args.layout == "rxrx3-core":
        index = SiteIndex.from_rxrx3_core(args.source, args.metadata, channels=channels, on_error=args.on_error)
    else:
        index = SiteIndex.from_jump(args.source, _jump_map(args.jump_channels), root=args.jump_root, on_error=args.on_error)
    if args.experiment or args.plate:
        index = index.select(experiment=args.experiment, plate=args.plate)
    return index


def interrupted(args) -> str:
    return f"nothing was written to {args.out} (the partial pack was removed)"


def run(args) -> int:
    from mae_fast.data.pack import pack_index

    from mae_fast.io import check_output_path, refuse_overwriting_inputs

    check_output_path(args.out, "--out")
    refuse_overwriting_inputs(args.out, {"--source": args.source, "--metadata": args.metadata,
                                         "--jump-root": args.jump_root})
    if args.overwrite and os.path.exists(args.out):
        from mae_fast.data.pack import check_replaceable

        check_replaceable(args.out)  # before any decoding; checked again under the output's lock
    index = build_index(args)
    print(f"packing {len(index)} sites ({', '.join(index.channels)}; {index.dtype}) from {index.description}")
    result = pack_index(index, args.out, tile=args.tile, codec=args.codec, shard_bytes=int(args.shard_gb * 2**30),
                        num_workers=args.workers, on_error=args.on_error, overwrite=args.overwrite)
    print(f"wrote {result.n_sites} sites, {result.n_bytes / 2**20:.1f} MiB, to {result.out_dir}; {result.summary}")
    for item in result.summary.skipped:
        print(f"  skipped {item.well}: [{item.reason}] {item.detail} ({item.file})")
    return 0
