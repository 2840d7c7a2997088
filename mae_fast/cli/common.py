"""What every subcommand shares: numeric argument types with bounds, -v/--verbose and -q/--quiet, and the one error
handler that turns a user's mistake into one line on stderr (exit code 2, no traceback; MAE_FAST_DEBUG=1 prints it)
and configures logging (`mae_fast.logs.configure_logging`) before the command runs."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import traceback

from mae_fast.checkpoint import CheckpointError
from mae_fast.data.errors import DataError
from mae_fast.evaluation.table import EvaluationInputError
from mae_fast.io import OutputBusyError
from mae_fast.logs import configure_logging
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


def rank_prefix() -> str:
    """`[rank N] ` under torchrun with several ranks (each rank's error line says whose it is), else ''."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="also log details (DEBUG); the default logs progress notes and warnings")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


def verbosity(args) -> int:
    """-1 quiet, 0 default, >= 1 verbose (commands run without the logging arguments: 0)."""
    return -1 if getattr(args, "quiet", False) else getattr(args, "verbose", 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` (locks, worker pools, temporaries) runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_command(run, args, prog: str, interrupted=None) -> int:
    """`run(args)` with logging configured and the CLI's one error handler (see the module doc). Ctrl-C and SIGTERM
    end as one line, exit 130 / 143 (128 + the signal), with what the command keeps: `interrupted(args)` says it
    (e.g. how to resume)."""
    configure_logging(verbosity(args))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return int(run(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("MAE_FAST_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        # one write of the whole line: several torchrun ranks share this stream, their lines must not interleave
        sys.stderr.write(f"{rank_prefix()}{prog}: error: {error_line(err)}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt as err:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one line, even when the signal comes twice
        terminated = isinstance(err, Terminated)
        try:
            kept = interrupted(args) if interrupted is not None else ""
        except Exception:  # noqa: BLE001 - the hint is a courtesy; the interruption is what is reported
            kept = ""
        what = "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"
        print(f"{prog}: {what}{'; ' + kept if kept else ''}", file=sys.stderr, flush=True)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
