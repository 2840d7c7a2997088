"""Bad-input handling shared by the readers, the crop loaders, tiling and packing.

Every problem with the input is a `DataError` that names the reason, the well and the file. A caller chooses
`on_error="raise"` (stop at the first problem) or `on_error="skip"` (leave the site out, log it and count it in an
`ErrorSummary` handed back to the caller). Nothing is dropped without being counted.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)

# Reason codes (the keys of ErrorSummary.counts) and what each means.
REASONS = {
    "missing_file": "a channel file does not exist",
    "corrupt_image": "the file cannot be read or decoded (truncated, corrupt, not an image)",
    "not_grayscale": "the image has colour channels; one grayscale plane per channel file is expected",
    "bit_depth": "the image is not 8- or 16-bit, or its bit depth differs from the dataset's",
    "size_mismatch": "the channels of one site have different sizes",
    "too_small": "the image is smaller than the crop or tile",
    "no_files": "a metadata row has no image files",
    "no_metadata": "image files have no metadata row",
    "duplicate_key": "two metadata rows or two files claim the same site/channel",
}
ON_ERROR = ("raise", "skip")


class DataError(Exception):
    """A bad input: `reason` (a key of REASONS), the well and the file it concerns, and a readable detail."""

    def __init__(self, reason: str, detail: str, well: str | None = None, file: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown DataError reason {reason!r}; expected one of {sorted(REASONS)}")
        self.reason, self.detail, self.well, self.file = reason, detail, well, file
        where = ", ".join(p for p in (f"well {well}" if well else "", f"file {file}" if file else "") if p)
        super().__init__(f"[{reason}] {detail}" + (f" ({where})" if where else ""))

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (DataError, (self.reason, self.detail, self.well, self.file))


@dataclass(frozen=True)
class SkippedItem:
    well: str | None
    file: str | None
    reason: str
    detail: str


@dataclass
class ErrorSummary:
    """What was skipped and why. `counts[reason]` counts skipped sites (or rows/files for index-level reasons);
    `ignored_files` lists files in image folders whose names match no known pattern (not images of a site)."""

    counts: Counter = field(default_factory=Counter)
    skipped: list[SkippedItem] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    replaced_crops: int = 0  # training crops whose site failed at decode time, filled from other sites of the window

    def record(self, err: DataError) -> None:
        self.counts[err.reason] += 1
        self.skipped.append(SkippedItem(err.well, err.file, err.reason, err.detail))

    def merge(self, other: "ErrorSummary") -> "ErrorSummary":
        self.counts.update(other.counts)
        self.skipped.extend(other.skipped)
        self.ignored_files.extend(other.ignored_files)
        self.replaced_crops += other.replaced_crops
        return self

    def copy(self) -> "ErrorSummary":
        return ErrorSummary().merge(self)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0 or bool(self.ignored_files) or self.replaced_crops > 0

    def to_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "skipped": [asdict(item) for item in self.skipped],
            "ignored_files": list(self.ignored_files),
            "replaced_crops": self.replaced_crops,
        }

    def __str__(self) -> str:
        if not self:
            return "no input skipped"
        parts = [f"{n} x {reason}" for reason, n in sorted(self.counts.items())]
        if self.ignored_files:
            parts.append(f"{len(self.ignored_files)} unrecognised files ignored")
        if self.replaced_crops:
            parts.append(f"{self.replaced_crops} crops refilled from other sites")
        return "skipped: " + ", ".join(parts)


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def handle(err: DataError, on_error: str, summary: ErrorSummary) -> None:
    """Raise `err` (on_error="raise") or log and count it (on_error="skip")."""
    if on_error == "raise":
        raise err
    summary.record(err)
    logger.warning("skipping: %s", err)


class TableError(ValueError):
    """A table file (CSV, parquet) that cannot be read: names the file and what is wrong with it."""


@contextlib.contextmanager
def reading_table(path, what: str = "table", error: type[Exception] = TableError):
    """Reading `path` inside the block: an empty, non-UTF-8, malformed CSV or a file that is not parquet becomes one
    `error` naming the file (pandas and pyarrow name it nowhere)."""
    import pandas as pd

    try:
        yield
    except UnicodeDecodeError as err:
        raise error(f"{path}: {what} is not UTF-8 text (it holds the byte 0x{err.object[err.start]:02x}); save it "
                    "as UTF-8") from err
    except pd.errors.EmptyDataError as err:
        raise error(f"{path}: {what} is empty (no header line)") from err
    except pd.errors.ParserError as err:
        raise error(f"{path}: {what} is not a well-formed CSV file: {str(err).strip()}") from err
    except ValueError as err:  # pyarrow's ArrowInvalid (a ValueError): not parquet, or a damaged parquet file
        if type(err).__module__.startswith("pyarrow"):
            raise error(f"{path}: {what} is not a readable parquet file: {err}") from err
        raise
