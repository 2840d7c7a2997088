"""`mae-fast` command line: one entry point, one module per subcommand.

Each module named in COMMANDS exposes `add_arguments(parser)` and `run(args) -> int`. Every command runs under one
error handler (`run_command`): a bad input or setting ends as one line on stderr naming the file, row or argument,
with exit code 2 and no traceback (MAE_FAST_DEBUG=1 prints the traceback too).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import traceback

from mae_fast.checkpoint import CheckpointError
from mae_fast.data.errors import DataError
from mae_fast.evaluation.table import EvaluationInputError
from mae_fast.io import OutputBusyError
from mae_fast.training.config import ConfigError

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


def number(kind: type = float, minimum: float | None = None, maximum: float | None = None, *,
           above: float | None = None, below: float | None = None):
    """An argparse `type`: a finite int or float within the bounds (>= minimum, <= maximum, > above, < below);
    anything else is refused before any work with one line naming the argument."""
    bounds = [(minimum, lambda x, b: x >= b, ">="), (maximum, lambda x, b: x <= b, "<="),
              (above, lambda x, b: x > b, ">"), (below, lambda x, b: x < b, "<")]

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        for bound, ok, sign in bounds:
            if bound is not None and not ok(value, bound):
                raise argparse.ArgumentTypeError(f"must be {sign} {bound:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# what a user can cause and fix: bad data, settings, checkpoints, a busy or unwritable output, a malformed table
# (pyarrow's ArrowInvalid, pandas' EmptyDataError / ParserError and UnicodeDecodeError are ValueErrors), a missing
# optional package
USER_ERRORS = (DataError, ConfigError, CheckpointError, EvaluationInputError, OutputBusyError, OSError, ValueError,
               ImportError)


def error_line(err: BaseException) -> str:
    """One line for an error: OSErrors as `FILE: reason`, other messages with their line breaks folded."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def run_command(run, args, prog: str) -> int:
    """`run(args)` with the CLI's one error handler (see the module doc)."""
    try:
        return int(run(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("MAE_FAST_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr, flush=True)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args._run, args, f"mae-fast {args.command}")


if __name__ == "__main__":
    sys.exit(main())
