"""The tables `embed` writes: per-plate parts (one parquet each, written atomically), their merge into the
per-well (and per-site) tables, and the file names."""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from mae_fast.evaluation.table import BLOCK_COLUMN
from mae_fast.io import TMP_PREFIX, OutputPathError, atomic_write
from mae_fast.training.config import ConfigError

RXRX3_COLUMNS = ("well_id", "experiment_name", "plate", "address", "gene", "treatment", "SMILES", "concentration",
                 "perturbation_type", "cell_type")
SITE_ONLY_COLUMNS = ("site", "site_id")  # per-site metadata keys left out of well rows
PART_META_KEY = b"mae_fast_embed"
MANIFEST = "manifest.json"  # in the parts folder: the settings and weights that made its parts


def output_paths(out: str) -> tuple[str, str, str]:
    """(well table, site table, parts folder) for OUT."""
    stem = out[:-len(".parquet")] if out.endswith(".parquet") else out
    return out, stem + "_sites.parquet", stem + "_parts"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def plate_part_name(experiment: str, plate: str) -> str:
    digest = hashlib.blake2b(f"{experiment}\x1f{plate}".encode(), digest_size=4).hexdigest()
    return f"{_safe(experiment)}__Plate{_safe(plate)}__{digest}.parquet"


def _metadata_row(site, well_level: bool) -> dict:
    """RxRx3 columns first (as far as present), the keys every table needs, then the other metadata."""
    meta = dict(site.metadata)
    row = {k: meta[k] for k in RXRX3_COLUMNS if k in meta}
    row.setdefault("well_id", site.well_id)
    row.setdefault("experiment_name", site.experiment)
    row.setdefault("plate", int(site.plate) if str(site.plate).isdigit() else site.plate)
    row.setdefault("address", site.address)
    row["perturbation"] = site.perturbation
    for k, v in meta.items():
        if k not in row and not (well_level and k in SITE_ONLY_COLUMNS):
            row[k] = v
    if not well_level:
        row["site"] = site.site
    return row


def plate_table(sites, sums: dict, counts: dict, dims: int, blocks: list[int] | None = None):
    """One plate's rows: a `level` column ("well"/"site"), metadata, n_sites, n_tiles, features. With `blocks`
    the sums hold (len(blocks), dims) arrays and the rows repeat per block, after a `block` column."""
    import pandas as pd

    if blocks is not None:
        frames = []
        for j, block in enumerate(blocks):
            frame = plate_table(sites, {k: v[j] for k, v in sums.items()}, counts, dims)
            frame.insert(1, BLOCK_COLUMN, block)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    rows, feats = [], []
    wells: dict[str, list] = {}
    for site in sites:
        key = (site.well_id, site.site)
        if counts.get(key, 0) == 0:
            continue
        wells.setdefault(site.well_id, []).append(site)
        rows.append({"level": "site", **_metadata_row(site, False), "n_sites": 1, "n_tiles": counts[key]})
        feats.append(sums[key] / counts[key])
    for well_id, members in wells.items():
        total = sum(sums[(s.well_id, s.site)] for s in members)
        n = sum(counts[(s.well_id, s.site)] for s in members)
        rows.append({"level": "well", **_metadata_row(members[0], True), "n_sites": len(members), "n_tiles": n})
        feats.append(total / n)
    meta = pd.DataFrame(rows)
    features = np.asarray(feats, dtype=np.float32).reshape(len(rows), dims)
    frame = pd.DataFrame(features, columns=[f"feature_{i}" for i in range(dims)])
    return pd.concat([meta.reset_index(drop=True), frame], axis=1)


def _numeric_metadata(frame):
    """Object columns holding only numbers and missing values (e.g. an empty `concentration`) become float."""
    import pandas as pd

    for column in frame.columns:
        if frame[column].dtype == object:
            values = frame[column].dropna()
            if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
                if column == "concentration" or len(values):
                    frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(np.float64)
    return frame


def write_parquet(frame, path: str, extra_meta: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if extra_meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               PART_META_KEY: json.dumps(extra_meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def merge_parts(parts_dir: str, part_names: list[str], out: str, sites_path: str | None):
    """Concatenate the plates' parts (in plate order) into the well table (and the site table)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from mae_fast.data.errors import ErrorSummary, SkippedItem

    frames, summary = [], ErrorSummary()
    for name in part_names:
        path = os.path.join(parts_dir, name)
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(PART_META_KEY, b"{}"))
        skipped = meta.get("skipped") or {}
        summary.counts.update(skipped.get("counts", {}))
        summary.skipped.extend(SkippedItem(**s) for s in skipped.get("skipped", []))
        frames.append(table.to_pandas())
    frames = [f for f in frames if len(f)]
    if not frames:
        raise ConfigError(f"no site could be embedded ({summary})")
    everything = _numeric_metadata(pd.concat(frames, ignore_index=True))
    features = [c for c in everything.columns if c.startswith("feature_")]
    wells = everything[everything["level"] == "well"].drop(columns=["level", "site"], errors="ignore")
    wells = wells.reset_index(drop=True)
    wells[features] = wells[features].astype(np.float32)
    write_parquet(wells[[c for c in wells.columns if c not in features] + features], out)
    if sites_path:
        sites = everything[everything["level"] == "site"].drop(columns=["level"]).reset_index(drop=True)
        sites[features] = sites[features].astype(np.float32)
        write_parquet(sites[[c for c in sites.columns if c not in features] + features], sites_path)
    return len(wells), int((everything["level"] == "site").sum()), summary


# ------------------------------------------------------------------------------------------------------------
# Parts: reused only while what made them is unchanged; --overwrite removes only embed's own files
# ------------------------------------------------------------------------------------------------------------

def _is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def check_own_outputs(out: str, sites_path: str, parts_dir: str) -> None:
    """--overwrite removes only what embed wrote: parquet tables, and a parts folder of parts, their manifest and
    temporaries; a foreign file there is refused, never deleted."""
    for path in (out, sites_path):
        if os.path.exists(path) and (not os.path.isfile(path) or not _is_parquet(path)):
            raise OutputPathError(f"--overwrite: {path} is not a parquet table written by embed; refusing to delete "
                                  "it: write elsewhere or remove it yourself")
    if os.path.exists(parts_dir):
        if not os.path.isdir(parts_dir):
            raise OutputPathError(f"--overwrite: {parts_dir} (the parts folder) is not a folder; refusing to delete it")
        foreign = sorted(n for n in os.listdir(parts_dir)
                         if not (n == MANIFEST or n.endswith(".parquet") or n.startswith(TMP_PREFIX)))
        if foreign:
            raise OutputPathError(f"--overwrite: {parts_dir} holds files embed did not write ({', '.join(foreign[:5])}"
                                  "); refusing to delete them: move them or write elsewhere")


def _source_identity(source) -> str:
    """One channel's (or packed site's) file as path, size and modification time; in-memory bytes by content."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes:" + hashlib.blake2b(bytes(source), digest_size=16).hexdigest()
    path = str(getattr(source, "path", source))
    where = "".join(f":{getattr(source, k)}" for k in ("row_group", "row", "start") if hasattr(source, k))
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}{where}:missing"
    return f"{path}{where}:{st.st_size}:{st.st_mtime_ns}"


def plate_inputs_digest(sites, manifest: dict) -> str:
    """What a plate's part is made from: the run's settings and weights (`manifest`), every site's metadata row
    and its files' sizes and modification times. A part is reused only while this is unchanged."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(manifest, sort_keys=True, default=str).encode())
    for s in sites:
        row = [s.well_id, s.site, s.experiment, s.plate, s.address, s.perturbation, list(s.channels), dict(s.metadata)]
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        for source in (*s.sources, *((s.packed,) if s.packed is not None else ())):
            h.update(_source_identity(source).encode() + b"\x1e")
    return h.hexdigest()


def part_inputs_digest(path: str) -> str | None:
    """The inputs digest recorded in a part file (None: unreadable, or written before parts recorded it)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(PART_META_KEY, b"{}")).get("inputs")
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------
