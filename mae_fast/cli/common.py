"""What every subcommand shares: numeric argument types with bounds, and the one error handler that turns a user's
mistake into one line on stderr (exit code 2, no traceback; MAE_FAST_DEBUG=1 prints it)."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback

from mae_fast.checkpoint import CheckpointError
from mae_fast.data.errors import DataError
from mae_fast.evaluation.table import EvaluationInputError
from mae_fast.io import OutputBusyError
from mae_fast.training.config import ConfigError


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


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted (a redirected or captured stream included)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property always answers sys.stdout
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """The CLI's logging: mae_fast's records at `level` and above on stdout as bare lines (library code only logs;
    a Python user configures logging as they wish)."""
    root = logging.getLogger("mae_fast")
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


def rank_prefix() -> str:
    """`[rank N] ` under torchrun with several ranks (each rank's error line says whose it is), else ''."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def run_command(run, args, prog: str) -> int:
    """`run(args)` with the CLI's one error handler (see the module doc)."""
    configure_logging()
    try:
        return int(run(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("MAE_FAST_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"{rank_prefix()}{prog}: error: {error_line(err)}", file=sys.stderr, flush=True)
        return 2
