"""What every subcommand shares: numeric argument types with bounds, and the one error handler that turns a user's
mistake into one line on stderr (exit code 2, no traceback; MAE_FAST_DEBUG=1 prints it)."""
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` (locks, worker pools, temporaries) runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_command(run, args, prog: str, interrupted=None) -> int:
    """`run(args)` with the CLI's one error handler (see the module doc). Ctrl-C and SIGTERM end as one line, exit
    130 / 143 (128 + the signal), with what the command keeps: `interrupted(args)` says it (e.g. how to resume)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return int(run(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("MAE_FAST_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr, flush=True)
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
