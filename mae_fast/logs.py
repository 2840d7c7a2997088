"""Logging: library modules log through `logging.getLogger(__name__)` (all under the "mae_fast" logger) and never
print; a program that wants the messages configures logging. The command line does, with `configure_logging`:

    level      -q: warnings and errors only; default: + progress notes (INFO); -v: + details (DEBUG)
    stdout     notes and details, as the bare message (the lines the commands always printed)
    stderr     warnings and errors, as "warning: MESSAGE" / "error: MESSAGE"

Without it (a user's `import mae_fast`), Python's defaults apply: notes stay silent, and a warning reaches stderr
only through logging's last-resort handler or the handlers the user set up. Progress bars are tqdm's, not logging.
"""
from __future__ import annotations

import logging
import sys

ROOT_LOGGER = "mae_fast"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}  # by verbosity (-q, default, -v)


class _CurrentStream(logging.StreamHandler):
    """A handler writing to sys.stdout / sys.stderr as they are at each message (so a caller that redirects them
    later, e.g. a test capturing output, still gets the lines)."""

    def __init__(self, name: str):
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the stream is looked up at each write
        pass


class _Prefixed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def configure_logging(verbosity: int = 0) -> logging.Logger:
    """Route the "mae_fast" loggers to stdout (below WARNING) and stderr (WARNING and above) at the level of
    `verbosity` (<= -1 quiet, 0 default, >= 1 verbose). Calling it again replaces what an earlier call installed
    (handlers set up by others are kept). Returns the "mae_fast" logger."""
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in [h for h in logger.handlers if getattr(h, "_mae_fast", False)]:
        logger.removeHandler(handler)
    notes, problems = _CurrentStream("stdout"), _CurrentStream("stderr")
    notes.addFilter(lambda record: record.levelno < logging.WARNING)
    notes.setFormatter(logging.Formatter("%(message)s"))
    problems.setLevel(logging.WARNING)
    problems.setFormatter(_Prefixed("%(message)s"))
    for handler in (notes, problems):
        handler._mae_fast = True
        logger.addHandler(handler)
    logger.setLevel(LEVELS[max(-1, min(1, verbosity))])
    return logger
