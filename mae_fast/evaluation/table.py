"""Read and validate an embeddings table: metadata columns + numeric feature columns, one row per well.

Bad input raises `EvaluationInputError` with a message that names the file, the columns or the rows at fault.
Rows that cannot take part (no perturbation label) are skipped and counted, never dropped silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mae_fast.data.errors import reading_table

# Columns of the RxRx3 metadata schema: never used as features even when numeric (e.g. `plate`, `concentration`).
RXRX3_METADATA_COLUMNS = (
    "well_id", "experiment_name", "plate", "address", "gene", "treatment",
    "SMILES", "concentration", "perturbation_type", "cell_type",
    "site", "site_id", "well", "experiment", "sirna", "sirna_id", "well_type", "dataset",
)
MAX_NAMED = 10  # how many offending rows/genes an error message lists before "... and N more"


# block-wise embedding tables (`mae-fast embed --blocks`): the 1-based encoder block of each row; `evaluate` scores
# each block as its own source
BLOCK_COLUMN = "block"


class EvaluationInputError(ValueError):
    """Bad evaluation input; the message names the file, columns or rows at fault."""


def name_some(items, limit: int = MAX_NAMED) -> str:
    """'a, b, c' or 'a, b, ... and 7 more' for error messages and reports."""
    items = [str(x) for x in items]
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head}, ... and {len(items) - limit} more"


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns of the table mean what.

    Controls are the rows whose `perturbation` value is one of `control_values`, or, when `control_column` is
    set, the rows where that boolean column is true. Features are `feature_columns` when given, else every
    column named `{feature_prefix}*`, else every numeric column that is not metadata.
    `batch=None` puts every well in one batch.
    """

    perturbation: str = "gene"
    batch: str | None = "experiment_name"
    plate: str | None = "plate"
    control_values: tuple[str, ...] = ("EMPTY_control", "CRISPR_control")
    control_column: str | None = None
    feature_prefix: str = "feature_"
    feature_columns: tuple[str, ...] | None = None
    row_id: str = "well_id"  # only used to name rows in messages

    def metadata_columns(self) -> set[str]:
        named = {self.perturbation, self.batch, self.plate, self.control_column, self.row_id}
        return (named | set(RXRX3_METADATA_COLUMNS) | {BLOCK_COLUMN}) - {None}


@dataclass
class WellTable:
    """One row per well: features and the metadata the evaluation needs."""

    source: str
    features: np.ndarray            # (N, D) float32
    perturbation: np.ndarray        # (N,) object labels; controls keep theirs
    is_control: np.ndarray          # (N,) bool
    batch_codes: np.ndarray         # (N,) int64 in [0, len(batch_names))
    batch_names: list[str]
    feature_columns: list[str]
    row_positions: np.ndarray       # (N,) int64 row number in the original table (0-based, header excluded)
    row_ids: np.ndarray | None      # (N,) e.g. well_id, for messages
    empty_perturbations: list[str] = field(default_factory=list)  # declared categories without any well
    n_rows_without_perturbation: int = 0

    @property
    def n_wells(self) -> int:
        return int(self.features.shape[0])

    @property
    def dims(self) -> int:
        return int(self.features.shape[1])

    def describe_rows(self, index, limit: int = MAX_NAMED) -> str:
        """Name rows (positions into this table) as 'row 12 (well_id=...)' for messages."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        labels = []
        for i in index[:limit]:
            label = f"row {int(self.row_positions[i])}"
            if self.row_ids is not None:
                label += f" ({self.row_ids[i]})"
            labels.append(label)
        if len(index) > limit:
            labels.append(f"... and {len(index) - limit} more")
        return ", ".join(labels)

    def with_features(self, features: np.ndarray, source: str, feature_columns: list[str] | None = None) -> "WellTable":
        """The same wells with other features (the random baseline)."""
        if features.shape[0] != self.n_wells:
            raise EvaluationInputError(f"{source}: {features.shape[0]} rows, expected {self.n_wells}")
        return WellTable(
            source=source,
            features=np.ascontiguousarray(features, dtype=np.float32),
            perturbation=self.perturbation,
            is_control=self.is_control,
            batch_codes=self.batch_codes,
            batch_names=self.batch_names,
            feature_columns=feature_columns or [f"feature_{i}" for i in range(features.shape[1])],
            row_positions=self.row_positions,
            row_ids=self.row_ids,
            empty_perturbations=list(self.empty_perturbations),
            n_rows_without_perturbation=self.n_rows_without_perturbation,
        )


def load_table(source, perturbation_column: str | None = None) -> tuple[pd.DataFrame, str]:
    """Read a parquet or CSV/TSV table (a DataFrame passes through). Returns (frame, name for messages).

    In CSV files the perturbation column is read as plain text so that gene symbols such as "NA" stay genes.
    """
    if isinstance(source, pd.DataFrame):
        return source, "<DataFrame>"
    path = os.fspath(source)
    if not os.path.exists(path):
        raise EvaluationInputError(f"table not found: {path}")
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")) or os.path.isdir(path):
        with reading_table(path, error=EvaluationInputError):
            return pd.read_parquet(path), path
    if lower.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
        sep = "\t" if ".tsv" in lower else ","
        with reading_table(path, error=EvaluationInputError):
            frame = pd.read_csv(path, sep=sep)
            if perturbation_column is not None and perturbation_column in frame.columns:
                labels = pd.read_csv(path, sep=sep, usecols=[perturbation_column], dtype=str, keep_default_na=False)
                frame[perturbation_column] = labels[perturbation_column].replace("", np.nan)
        return frame, path
    raise EvaluationInputError(f"{path}: unknown table format (expected .parquet, .csv or .tsv)")


def require_columns(frame: pd.DataFrame, columns, source: str, what: str = "table") -> None:
    missing = [c for c in columns if c is not None and c not in frame.columns]
    if missing:
        raise EvaluationInputError(
            f"{source}: {what} is missing column(s) {name_some(repr(c) for c in missing)}; "
            f"present columns: {name_some(repr(c) for c in frame.columns)}"
        )


COUNT_COLUMNS = ("n_sites", "n_tiles", "site", "n_cells")  # numbers about a row, not features of it


def check_one_row_per_well(frame: pd.DataFrame, spec: ColumnSpec, source: str) -> None:
    """A well in two rows would count twice (as its own replicate): refused, naming it and its rows."""
    if spec.row_id not in frame.columns:
        return
    ids = frame[spec.row_id].astype(str)
    repeated = ids[ids.duplicated(keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        rows = np.flatnonzero((ids == first).to_numpy())
        raise EvaluationInputError(
            f"{source}: {repeated.nunique()} {spec.row_id} value(s) appear in more than one row, e.g. {first!r} in "
            f"rows {name_some(rows)}; the table must hold one row per well (embed's per-well table, not --sites')"
        )


def select_feature_columns(frame: pd.DataFrame, spec: ColumnSpec, source: str) -> list[str]:
    """Feature columns: explicit list, else `{prefix}*`, else numeric non-metadata columns."""
    if spec.feature_columns:
        require_columns(frame, spec.feature_columns, source, "embeddings table")
        columns = list(spec.feature_columns)
    else:
        columns = [c for c in frame.columns if isinstance(c, str) and c.startswith(spec.feature_prefix)]
        if not columns:  # counts written beside the features (embed's n_sites, n_tiles) are never features
            metadata = spec.metadata_columns() | set(COUNT_COLUMNS)
            columns = [
                c for c in frame.columns
                if c not in metadata and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
            ]
    if not columns:
        raise EvaluationInputError(
            f"{source}: no feature columns (none named '{spec.feature_prefix}*' and no numeric non-metadata columns "
            f"other than the counts {', '.join(COUNT_COLUMNS)})"
        )
    non_numeric = [
        c for c in columns
        if not pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])
    ]
    if non_numeric:
        raise EvaluationInputError(f"{source}: feature column(s) {name_some(repr(c) for c in non_numeric)} are not numeric")
    return columns


def control_mask(frame: pd.DataFrame, spec: ColumnSpec, source: str) -> np.ndarray:
    """(N,) bool: negative-control wells."""
    if spec.control_column is not None:
        flag = frame[spec.control_column]
        if pd.api.types.is_bool_dtype(flag):
            return flag.to_numpy(dtype=bool)
        if pd.api.types.is_integer_dtype(flag) and set(np.unique(flag.to_numpy())) <= {0, 1}:
            return flag.to_numpy() == 1
        raise EvaluationInputError(
            f"{source}: control column {spec.control_column!r} must be boolean (or 0/1), found values "
            f"{name_some(pd.unique(flag)[:MAX_NAMED])}"
        )
    return frame[spec.perturbation].isin(list(spec.control_values)).to_numpy()


def batch_labels(frame: pd.DataFrame, spec: ColumnSpec, level: str, source: str) -> pd.Series:
    """The TVN batch of each row: the experiment (`level="experiment"`) or the plate within it (`"plate"`)."""
    if level not in ("experiment", "plate"):
        raise EvaluationInputError(f"TVN batch level must be 'experiment' or 'plate', got {level!r}")
    if spec.batch is None:
        batch = pd.Series("all", index=frame.index)
    else:
        batch = frame[spec.batch]
        missing = batch.isna().to_numpy()
        if missing.any():
            rows = np.flatnonzero(missing)
            raise EvaluationInputError(
                f"{source}: batch column {spec.batch!r} is empty in {len(rows)} row(s): rows {name_some(rows)}"
            )
        batch = batch.astype(str)
    if level == "plate":
        if spec.plate is None:
            raise EvaluationInputError("TVN per plate needs a plate column (ColumnSpec.plate)")
        plate = frame[spec.plate]
        if plate.isna().any():
            rows = np.flatnonzero(plate.isna().to_numpy())
            raise EvaluationInputError(f"{source}: plate column {spec.plate!r} is empty in rows {name_some(rows)}")
        batch = batch + "/Plate" + plate.astype(str)
    return batch


def well_table_from_frame(
    frame: pd.DataFrame, spec: ColumnSpec | None = None, source: str = "<DataFrame>", batch_level: str = "experiment"
) -> WellTable:
    """Validate `frame` and pull out what the evaluation needs.

    Errors name the missing columns or the rows with non-finite features. Rows with an empty perturbation label
    (e.g. compound wells of a CRISPR table) are skipped and counted; controls flagged by `control_column` are kept
    even when their label is empty.
    """
    spec = spec or ColumnSpec()
    required = [spec.perturbation, spec.batch, spec.control_column]
    if batch_level == "plate":
        required.append(spec.plate)
    require_columns(frame, required, source, "embeddings table")
    if frame.columns.duplicated().any():
        dup = frame.columns[frame.columns.duplicated()].unique()
        raise EvaluationInputError(f"{source}: duplicated column name(s) {name_some(repr(c) for c in dup)}")
    if len(frame) == 0:
        raise EvaluationInputError(f"{source}: the embeddings table has no rows")
    check_one_row_per_well(frame, spec, source)
    features_cols = select_feature_columns(frame, spec, source)

    is_control = control_mask(frame, spec, source)
    labels = frame[spec.perturbation]
    empty_perturbations: list[str] = []
    if isinstance(labels.dtype, pd.CategoricalDtype):
        present = set(labels.dropna().unique())
        empty_perturbations = sorted(str(c) for c in labels.cat.categories if c not in present and c not in spec.control_values)
    no_label = (labels.isna() | (labels.astype(str).str.len() == 0)).to_numpy() & ~is_control
    keep = ~no_label
    row_positions = np.flatnonzero(keep).astype(np.int64)

    batch = batch_labels(frame, spec, batch_level, source)
    codes, names = pd.factorize(batch.to_numpy()[keep], sort=True)

    perturbation = labels.astype(object).to_numpy()[keep]
    perturbation = np.where(pd.isna(perturbation), "<control>", perturbation).astype(object)
    row_ids = frame[spec.row_id].astype(str).to_numpy()[keep] if spec.row_id in frame.columns else None

    # One float32 copy of the feature block, kept rows only.
    features = frame[features_cols].to_numpy(dtype=np.float32, copy=False)
    if not keep.all():
        features = features[keep]
    features = np.ascontiguousarray(features)

    table = WellTable(
        source=source,
        features=features,
        perturbation=perturbation,
        is_control=is_control[keep],
        batch_codes=codes.astype(np.int64),
        batch_names=[str(n) for n in names],
        feature_columns=features_cols,
        row_positions=row_positions,
        row_ids=row_ids,
        empty_perturbations=empty_perturbations,
        n_rows_without_perturbation=int(no_label.sum()),
    )
    check_finite(table)
    if not table.is_control.any():
        how = (f"column {spec.control_column!r} is never true" if spec.control_column
               else f"no {spec.perturbation!r} value is one of {name_some(spec.control_values)}")
        raise EvaluationInputError(f"{source}: no negative controls ({how}); TVN needs them")
    return table


def check_finite(table: WellTable) -> None:
    """Raise naming the rows (and columns) that hold NaN or inf features."""
    finite = np.isfinite(table.features)
    if finite.all():
        return
    bad_rows = np.flatnonzero(~finite.all(axis=1))
    bad_cols = [table.feature_columns[j] for j in np.flatnonzero(~finite.all(axis=0))]
    raise EvaluationInputError(
        f"{table.source}: NaN or inf features in {len(bad_rows)} row(s): {table.describe_rows(bad_rows)}; "
        f"column(s) {name_some(bad_cols)}"
    )
