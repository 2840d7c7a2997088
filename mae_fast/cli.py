"""`mae-fast` command line: one entry point, one module per subcommand.

Each module named in COMMANDS exposes `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("mae_fast.demo", "the whole job on the synthetic screen: train (one model or several with --models), embed, evaluate"),
    "flops": ("mae_fast.flops", "FLOPs per crop and per training run (exact count and the paper's method), scaling plot"),
    "bench": ("mae_fast.bench", "end-to-end train-step and embedding benchmarks (crops/s, TFLOP/s, MFU) as JSON"),
    "evaluate": ("mae_fast.evaluate_cli", "recall of known relationships: TVN, arm correction, baselines, tables, plots"),
    "train": ("mae_fast.train", "train an MAE / CA-MAE or a baseline (WSL DenseNet-161, MU-Net); YAML/TOML + --set; torchrun"),
    "embed": ("mae_fast.embed", "embed every site of a screen; per-well (and per-site) parquet tables, resumable by plate"),
    "pack": ("mae_fast.pack_cli", "convert a dataset into losslessly compressed tiles the crop loader reads fast"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae-fast", description="Fast masked autoencoders for microscopy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
