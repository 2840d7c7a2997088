"""`mae-fast` command line: one entry point, one module per subcommand (`mae_fast/cli/<command>.py`).

Each module named in COMMANDS exposes `add_arguments(parser)` and `run(args) -> int`. Every command runs under one
error handler (`common.run_command`): a bad input or setting ends as one line on stderr naming the file, row or argument,
with exit code 2 and no traceback (MAE_FAST_DEBUG=1 prints the traceback too). Every command takes -v/--verbose and
-q/--quiet, which set the level of the library's logging (`mae_fast.logs.configure_logging`).
"""
from __future__ import annotations

import argparse
import os
import sys
import importlib

from mae_fast.cli.common import add_logging_arguments, run_command

COMMANDS = {
    "demo": ("mae_fast.cli.demo", "the whole job on the synthetic screen: train (one model or several with --models), embed, evaluate"),
    "flops": ("mae_fast.cli.flops", "FLOPs per crop and per training run (exact count and the paper's method), scaling plot"),
    "bench": ("mae_fast.cli.bench", "end-to-end train-step and embedding benchmarks (crops/s, TFLOP/s, MFU) as JSON"),
    "evaluate": ("mae_fast.cli.evaluate", "recall of known relationships: TVN, arm correction, baselines, tables, plots"),
    "train": ("mae_fast.cli.train", "train an MAE / CA-MAE or a baseline (WSL DenseNet-161, MU-Net); YAML/TOML + --set; torchrun"),
    "embed": ("mae_fast.cli.embed", "embed every site of a screen; per-well (and per-site) parquet tables, resumable by plate"),
    "export": ("mae_fast.cli.export", "a training checkpoint (sharded under FSDP, or full) -> the single-file model folder embed reads"),
    "pack": ("mae_fast.cli.pack", "convert a dataset into losslessly compressed tiles the crop loader reads fast"),
}


def version_line() -> str:
    """`mae-fast --version`: the version, and whether this install has the C++ CPU kernels (pip's default isolated
    build leaves them out; its build log says so only under -v)."""
    import importlib.util

    from mae_fast import __version__

    built = importlib.util.find_spec("mae_fast._C") is not None
    kernels = "built" if built else "not built; to build them: pip install --no-build-isolation ."
    return f"mae-fast {__version__} (C++ CPU kernels: {kernels})"


class _PrintVersion(argparse.Action):
    """--version: print `version_line()` unwrapped (argparse's own action wraps it at the terminal width)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and whether the C++ CPU kernels are built, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae-fast", description="Fast masked autoencoders for microscopy.")
    parser.add_argument("--version", action=_PrintVersion)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        add_logging_arguments(cmd)
        cmd.set_defaults(_run=module.run, _interrupted=getattr(module, "interrupted", None))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = run_command(args._run, args, f"mae-fast {args.command}", args._interrupted)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End a torchrun rank once its command is done (its process group already destroyed), skipping the
    interpreter's teardown: there, torch 2.11's distributed runtime sometimes aborts ("terminate called without an
    active exception", SIGABRT, about 1 run in 5 on 2 gloo ranks here), which torchrun reports as a failed run
    after the run had finished and written everything."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


