"""What the dataset readers of `SiteIndex` share: the published layouts' file patterns and keys, path expansion,
table reading, the RxRx folder scan and metadata join, and the checks that turn rows and files into sites."""
from __future__ import annotations

import glob
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError, ErrorSummary, handle, reading_table
from .sites import Site, natural_key

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "jp2", "j2k", "tif", "tiff")
RXRX_FILE_RE = re.compile(
    r"^(?P<address>[A-Za-z]+\d+)_s(?P<site>\d+)_w(?P<channel>\d+)\.(?P<ext>" + "|".join(IMAGE_EXTENSIONS) + r")$", re.I
)
PLATE_DIR_RE = re.compile(r"^Plate(?P<plate>.+)$", re.I)
RXRX3_CORE_KEY_RE = re.compile(r"^(?P<experiment>[^/]+)/Plate(?P<plate>[^/]+)/(?P<address>[A-Za-z]+\d+)_s(?P<site>\d+)_w?(?P<channel>\d+)$")
RXRX1_KEYS = ("experiment", "plate", "well", "site")
RXRX3_KEYS = ("experiment_name", "plate", "address")
JUMP_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")


def as_values(value) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, int, np.integer)):
        return {plain_str(value)}
    return {plain_str(v) for v in value}


def plain_str(value: Any) -> str:
    """str() that writes integral floats (plates read from a CSV with gaps) as integers: 3.0 -> "3"."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def clean_value(value: Any) -> Any:
    """numpy scalars -> python, NaN -> None (metadata dicts are plain python)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def is_present(value: Any) -> bool:
    value = clean_value(value)
    return value is not None and str(value).strip() != ""


def expand_paths(paths, pattern: str) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            out.extend(sorted(glob.glob(os.path.join(p, pattern))))
        elif any(ch in p for ch in "*?["):
            out.extend(sorted(glob.glob(p)))
        else:
            out.append(p)
    if not out:
        raise FileNotFoundError(f"no files found for {paths!r}")
    for p in out:
        if not os.path.exists(p):
            raise FileNotFoundError(p)
    return out


def read_table(path):
    import pandas as pd

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a table: a JUMP source is a load_data CSV or parquet file (an RxRx "
                         "folder needs --format rxrx, a pack folder --format pack)")
    with reading_table(path):
        return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)


def jump_path(row: Mapping, column: str, fname: str, root: str | None) -> str:
    if root is not None:
        return os.path.join(root, fname)
    if column.startswith("FileName_"):
        folder = row.get("PathName_" + column[len("FileName_"):])
        if is_present(folder):
            return os.path.join(str(folder), fname)
    return fname


def add_channel(groups, bad_groups, gkey, channel: int, source, label: str, summary, on_error) -> None:
    """Record one channel file of a site group; a second file for the same channel is a duplicate key."""
    group = groups[gkey]
    if channel in group:
        bad_groups.add(gkey)
        handle(DataError("duplicate_key", f"two files for channel {channel}: {group[channel][1]} and {label}",
                         group_well(gkey), label), on_error, summary)
        return
    group[channel] = (source, label)


def group_well(gkey: tuple) -> str:
    experiment, plate, address, _ = gkey
    return f"{experiment}_{plate}_{address}"


def scan_rxrx_folders(images_dir: str, summary: ErrorSummary, on_error: str):
    """{(experiment, plate, address, site): {channel: (path, path)}} from `{experiment}/Plate{n}/` folders."""
    groups: dict[tuple, dict[int, tuple]] = defaultdict(dict)
    bad_groups: set[tuple] = set()
    for exp in sorted(os.scandir(images_dir), key=lambda e: e.name):
        if not exp.is_dir():
            continue
        for plate_dir in sorted(os.scandir(exp.path), key=lambda e: e.name):
            m = PLATE_DIR_RE.match(plate_dir.name) if plate_dir.is_dir() else None
            if m is None:
                summary.ignored_files.append(plate_dir.path)
                continue
            for f in sorted(os.scandir(plate_dir.path), key=lambda e: e.name):
                fm = RXRX_FILE_RE.match(f.name)
                if fm is None or not f.is_file():
                    summary.ignored_files.append(f.path)
                    continue
                gkey = (exp.name, m["plate"], fm["address"], int(fm["site"]))
                add_channel(groups, bad_groups, gkey, int(fm["channel"]), f.path, f.path, summary, on_error)
    return groups, bad_groups


@dataclass
class RxrxMetadata:
    """Metadata rows keyed for the join: per site (RxRx1) or per well (RxRx3)."""

    per_site: bool
    rows: dict[tuple, dict]
    bad_keys: set[tuple]
    experiment_column: str
    path: str


def read_rxrx_metadata(path: str, summary: ErrorSummary, on_error: str) -> RxrxMetadata:
    import pandas as pd

    with reading_table(path, "metadata CSV"):
        df = pd.read_csv(path, dtype={"well_id": str, "address": str, "well": str, "site_id": str})
    columns = set(df.columns)
    if set(RXRX1_KEYS) <= columns:
        per_site, exp_col = True, "experiment"
        keys = [(str(e), plain_str(p), str(w), int(s)) for e, p, w, s in zip(df["experiment"], df["plate"], df["well"], df["site"])]
    elif set(RXRX3_KEYS) <= columns:
        per_site, exp_col = False, "experiment_name"
        keys = [(str(e), plain_str(p), str(a)) for e, p, a in zip(df["experiment_name"], df["plate"], df["address"])]
    else:
        raise ValueError(f"{path}: neither the RxRx1 metadata columns {RXRX1_KEYS} nor the RxRx3 columns {RXRX3_KEYS}; "
                         f"columns are {sorted(columns)}")
    if "gene" not in columns:  # said, not silently assumed: which column names a site's perturbation
        used = [c for c in PERTURBATION_COLUMNS if c in columns]
        logger.warning("%s has no 'gene' column: %s", path,
                       f"a site's perturbation is read from {' (else '.join(repr(c) for c in used)}{')' * (len(used) - 1)}"
                       if used else f"none of {PERTURBATION_COLUMNS} is present, so sites have no perturbation label")
    rows: dict[tuple, dict] = {}
    bad: set[tuple] = set()
    for i, (key, record) in enumerate(zip(keys, df.to_dict("records"))):
        if key in rows or key in bad:
            if key not in bad:
                well = str(record.get("well_id", "_".join(map(str, key[:3]))))
                handle(DataError("duplicate_key", f"metadata row {i + 2} repeats the key {key}", well, path), on_error, summary)
            bad.add(key)
            rows.pop(key, None)
            continue
        rows[key] = {k: clean_value(v) for k, v in record.items()}
    return RxrxMetadata(per_site, rows, bad, exp_col, path)


PERTURBATION_COLUMNS = ("gene", "treatment", "sirna", "sirna_id")  # a row's perturbation: the first one filled


def row_perturbation(row: Mapping) -> str | None:
    for column in PERTURBATION_COLUMNS:
        if is_present(row.get(column)):
            return plain_str(clean_value(row[column]))
    return None


def assemble_sites(groups, bad_groups, meta: RxrxMetadata | None, channels, summary: ErrorSummary, on_error: str) -> list[Site]:
    """Join file groups with metadata rows; every mismatch is raised or counted."""
    if channels is None:
        found = sorted({c for g in groups.values() for c in g})
    else:
        found = sorted(int(str(c).lstrip("wW")) for c in channels)
    names = tuple(f"w{c}" for c in found)
    used_keys: set[tuple] = set()
    sites: list[Site] = []
    for gkey in sorted(groups, key=lambda k: (natural_key(k[0]), natural_key(k[1]), natural_key(k[2]), k[3])):
        if gkey in bad_groups:
            continue
        experiment, plate, address, site_no = gkey
        files = groups[gkey]
        well = group_well(gkey)
        row: dict = {}
        if meta is not None:
            mkey = gkey if meta.per_site else gkey[:3]
            if mkey in meta.bad_keys:
                continue  # already counted as duplicate_key
            if mkey not in meta.rows:
                first = files[min(files)][1]
                handle(DataError("no_metadata", f"files of site {site_no} have no row in {meta.path}", well, first), on_error, summary)
                continue
            used_keys.add(mkey)
            row = meta.rows[mkey]
            well = str(row.get("well_id") or well)
        missing = [c for c in found if c not in files]
        if missing:
            example = files[min(files)][1]
            expected = re.sub(r"_w\d+\.", f"_w{missing[0]}.", example) if "_w" in os.path.basename(example) else f"channel {missing[0]}"
            handle(DataError("missing_file", f"site {site_no} lacks channel(s) {['w%d' % c for c in missing]}", well, expected),
                   on_error, summary)
            continue
        if not row:
            row = {"well_id": well, "experiment": experiment, "plate": plate, "address": address, "site": site_no}
        sites.append(Site(well, site_no, experiment, plate, address, row_perturbation(row), names,
                          tuple(files[c][0] for c in found), row))
    if meta is not None:
        present = set(groups) if meta.per_site else {g[:3] for g in groups}
        for mkey, row in meta.rows.items():
            if mkey not in used_keys and mkey not in present:
                well = str(row.get("well_id") or "_".join(map(str, mkey[:3])))
                what = f"site {mkey[3]}" if meta.per_site else "any site"
                handle(DataError("no_files", f"metadata row has no image files for {what}", well, meta.path), on_error, summary)
    return sites
