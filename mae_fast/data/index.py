"""An index of image sites, read from the published dataset layouts.

A *site* is one field of view of one well: C channel images plus the well's metadata row. `SiteIndex` holds the
sites in a stable order -- (experiment, plate, address, site), numbers compared as numbers -- so that shuffling,
sharding and crop sampling are reproducible on every machine.

Readers:
    SiteIndex.from_rxrx(root, metadata_csv)        RxRx1 / RxRx2 / RxRx3 folders `{experiment}/Plate{n}/{address}_s{site}_w{c}.{ext}`
                                                   (under `root/images/` when that folder exists) + metadata CSV in the
                                                   RxRx1 schema (experiment, plate, well, site, sirna, ...) or the RxRx3
                                                   schema (experiment_name, plate, address, gene, treatment, ...)
    SiteIndex.from_rxrx3_core(parquet_paths)       RxRx3-core shards: `__key__` = `{experiment}/Plate{n}/{address}_s{site}_{c}`,
                                                   `jp2` = the encoded channel, one row per channel
    SiteIndex.from_jump(table, channel_map)        JUMP load_data tables: one row per site, one file column per channel,
                                                   channels chosen and ordered by name
    SiteIndex.from_pack(pack_dir)                  the output of `mae-fast pack` (see pack.py)

Bad input (`on_error="raise"` stops, `"skip"` leaves the site out and counts it in `index.summary`): a channel file
missing, a metadata row without files, files without a metadata row, duplicate keys.  Decoding problems (corrupt
files, sizes, bit depth) are found when images are read; `index.check()` finds them up front from the headers.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import DataError, ErrorSummary, check_on_error, handle, logger, reading_table

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "jp2", "j2k", "tif", "tiff")
RXRX_FILE_RE = re.compile(
    r"^(?P<address>[A-Za-z]+\d+)_s(?P<site>\d+)_w(?P<channel>\d+)\.(?P<ext>" + "|".join(IMAGE_EXTENSIONS) + r")$", re.I
)
PLATE_DIR_RE = re.compile(r"^Plate(?P<plate>.+)$", re.I)
RXRX3_CORE_KEY_RE = re.compile(r"^(?P<experiment>[^/]+)/Plate(?P<plate>[^/]+)/(?P<address>[A-Za-z]+\d+)_s(?P<site>\d+)_w?(?P<channel>\d+)$")
RXRX1_KEYS = ("experiment", "plate", "well", "site")
RXRX3_KEYS = ("experiment_name", "plate", "address")
JUMP_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")


@dataclass(frozen=True, eq=False)
class Site:
    """One field of view. `sources[i]` is channel `channels[i]`: a file path, encoded bytes or a parquet BlobRef;
    packed sites (`mae-fast pack`) carry `packed` instead and an empty `sources`."""

    well_id: str
    site: int
    experiment: str
    plate: str
    address: str
    perturbation: str | None
    channels: tuple[str, ...]
    sources: tuple = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    packed: Any = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.well_id, self.site)

    def source_name(self, channel: int) -> str:
        """A readable name of one channel's file for error messages."""
        if self.packed is not None:
            return str(self.packed)
        src = self.sources[channel]
        if isinstance(src, (bytes, bytearray, memoryview)):
            return f"<{len(src)} bytes: {self.well_id} s{self.site} {self.channels[channel]}>"
        return str(src)

    def crop_stream(self) -> int:
        """A 63-bit number fixed by (well_id, site): seeds this site's crops independently of order and sharding."""
        digest = hashlib.blake2b(f"{self.well_id}\x1f{self.site}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


def natural_key(value: Any) -> tuple:
    """Sort key comparing runs of digits as numbers ("A2" < "A10", "Plate2" < "Plate10")."""
    parts = re.split(r"(\d+)", str(value))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p != "")


def site_sort_key(site: Site) -> tuple:
    return (natural_key(site.experiment), natural_key(site.plate), natural_key(site.address), site.site, site.well_id)


def _as_values(value) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, int, np.integer)):
        return {_plain_str(value)}
    return {_plain_str(v) for v in value}


def _plain_str(value: Any) -> str:
    """str() that writes integral floats (plates read from a CSV with gaps) as integers: 3.0 -> "3"."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _clean(value: Any) -> Any:
    """numpy scalars -> python, NaN -> None (metadata dicts are plain python)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _present(value: Any) -> bool:
    value = _clean(value)
    return value is not None and str(value).strip() != ""


class SiteIndex(Sequence):
    """Sites in a stable order; `summary` tells what the reader skipped and why."""

    def __init__(self, sites: Iterable[Site], summary: ErrorSummary | None = None, description: str = "", dtype=None):
        self.sites: list[Site] = sorted(sites, key=site_sort_key)
        self.summary = summary if summary is not None else ErrorSummary()
        self.description = description
        self._dtype = np.dtype(dtype) if dtype is not None else None
        seen: dict[tuple, Site] = {}
        for s in self.sites:
            if s.key in seen:
                raise DataError("duplicate_key", f"two sites share the key {s.key}", s.well_id, s.source_name(0) if s.sources or s.packed else None)
            seen[s.key] = s

    # -- sequence protocol -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._derive(self.sites[i])
        return self.sites[i]

    def __iter__(self):
        return iter(self.sites)

    def __repr__(self) -> str:
        return f"SiteIndex({len(self)} sites{', ' + self.description if self.description else ''})"

    def _derive(self, sites: Iterable[Site]) -> "SiteIndex":
        return SiteIndex(sites, self.summary.copy(), self.description, self._dtype)

    # -- selection and sharding ------------------------------------------------------------------------------
    def select(
        self,
        experiment=None,
        plate=None,
        perturbation=None,
        well=None,
        where: Callable[[Site], bool] | None = None,
    ) -> "SiteIndex":
        """Sites matching every given filter; each filter is one value or a collection of values (compared as
        strings, so plate=1 matches "1"). `well` matches well_id or address; `where` is any predicate on a Site."""
        exps, plates, perts, wells = map(_as_values, (experiment, plate, perturbation, well))

        def keep(s: Site) -> bool:
            return (
                (exps is None or s.experiment in exps)
                and (plates is None or s.plate in plates)
                and (perts is None or (s.perturbation is not None and s.perturbation in perts))
                and (wells is None or s.well_id in wells or s.address in wells)
                and (where is None or where(s))
            )

        return self._derive(s for s in self.sites if keep(s))

    def shard(self, rank: int, world_size: int) -> "SiteIndex":
        """Sites rank, rank + world_size, ...: every site in exactly one shard, shard sizes differ by at most one."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return self._derive(self.sites[rank::world_size])

    # -- facts about the images ------------------------------------------------------------------------------
    @property
    def channels(self) -> tuple[str, ...]:
        return self.sites[0].channels if self.sites else ()

    @property
    def dtype(self) -> np.dtype | None:
        """The dataset's pixel dtype (uint8 or uint16): given by the reader, else read from the first readable
        site's headers. Every site must match it (a different bit depth is a `bit_depth` error)."""
        if self._dtype is None and self.sites:
            from .loading import probe_site

            for site in self.sites[:8]:
                try:
                    self._dtype = probe_site(site).dtype
                    break
                except DataError:
                    continue
        return self._dtype

    def fingerprint(self) -> str:
        """A short hash of the site keys in order: a saved loader state is only valid for the same index."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.blake2b(digest_size=8)
            for s in self.sites:
                h.update(f"{s.well_id}\x1f{s.site}\x1e".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def metadata_frame(self):
        """One row per site: well_id, site, experiment, plate, address, perturbation, then the metadata columns."""
        import pandas as pd

        rows = []
        for s in self.sites:
            row = {"well_id": s.well_id, "site": s.site, "experiment": s.experiment, "plate": s.plate,
                   "address": s.address, "perturbation": s.perturbation}
            row.update({k: v for k, v in s.metadata.items() if k not in row})
            rows.append(row)
        return pd.DataFrame(rows)

    def check(self, min_size: int = 0, on_error: str = "raise", num_threads: int = 8) -> "SiteIndex":
        """Read every channel's header (no pixel decoding): missing/unreadable files, colour or wrong bit depth,
        channels of different sizes, images smaller than `min_size`. Returns the index of the good sites; the
        bad ones are raised or counted in the returned index's summary."""
        from concurrent.futures import ThreadPoolExecutor

        from .loading import probe_site

        check_on_error(on_error)
        dtype = self.dtype

        def probe_one(site: Site):
            try:
                probe_site(site, dtype=dtype, min_size=min_size)
                return None
            except DataError as err:
                return err

        summary = self.summary.copy()
        good = []
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            for site, err in zip(self.sites, pool.map(probe_one, self.sites)):
                if err is None:
                    good.append(site)
                else:
                    handle(err, on_error, summary)
        return SiteIndex(good, summary, self.description, dtype)

    # -- readers ---------------------------------------------------------------------------------------------
    @classmethod
    def from_rxrx(
        cls,
        root: str,
        metadata_csv: str | None = None,
        channels: Sequence[int] | None = None,
        on_error: str = "raise",
        dtype=None,
    ) -> "SiteIndex":
        """RxRx1/RxRx3 folders under `root/images` (or `root`), joined with `metadata_csv` (default
        `root/metadata.csv` if it exists; without any CSV, every file group is a site with path-derived metadata).
        `channels` (e.g. [1, 2, 3, 4, 5, 6]) defaults to every channel number found in the folders."""
        check_on_error(on_error)
        summary = ErrorSummary()
        images_dir = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(f"RxRx root {root!r} is not a folder")
        groups, bad_groups = _scan_rxrx_folders(images_dir, summary, on_error)
        if metadata_csv is None and os.path.exists(os.path.join(root, "metadata.csv")):
            metadata_csv = os.path.join(root, "metadata.csv")
        meta = _read_rxrx_metadata(metadata_csv, summary, on_error) if metadata_csv else None
        sites = _assemble(groups, bad_groups, meta, channels, summary, on_error)
        return cls(sites, summary, f"rxrx {root}", dtype)

    @classmethod
    def from_rxrx3_core(
        cls,
        parquet_paths,
        metadata_csv: str | None = None,
        channels: Sequence[int] | None = None,
        on_error: str = "raise",
        in_memory: bool = False,
    ) -> "SiteIndex":
        """RxRx3-core parquet shards (a file, a folder, a glob or a list). Only the `__key__` column is read here;
        the `jp2` bytes are read lazily per row group when images are decoded (`in_memory=True` loads them now)."""
        import pyarrow.parquet as pq

        from .decode import BlobRef

        check_on_error(on_error)
        summary = ErrorSummary()
        paths = _expand_paths(parquet_paths, "*.parquet")
        groups: dict[tuple, dict[int, tuple]] = defaultdict(dict)
        bad_groups: set[tuple] = set()
        for path in paths:
            pf = pq.ParquetFile(path)
            missing = {"__key__", "jp2"} - set(pf.schema_arrow.names)
            if missing:
                raise ValueError(f"{path}: not an RxRx3-core shard, missing columns {sorted(missing)}")
            for rg in range(pf.num_row_groups):
                table = pf.read_row_group(rg, columns=["__key__", "jp2"] if in_memory else ["__key__"])
                keys = table.column("__key__").to_pylist()
                blobs = table.column("jp2").to_pylist() if in_memory else None
                for row, key in enumerate(keys):
                    m = RXRX3_CORE_KEY_RE.match(str(key))
                    if m is None:
                        summary.ignored_files.append(f"{path}::{key}")
                        continue
                    gkey = (m["experiment"], m["plate"], m["address"], int(m["site"]))
                    source = blobs[row] if in_memory else BlobRef(path, rg, row)
                    _add_channel(groups, bad_groups, gkey, int(m["channel"]), source, f"{path}::{key}", summary, on_error)
        meta = _read_rxrx_metadata(metadata_csv, summary, on_error) if metadata_csv else None
        sites = _assemble(groups, bad_groups, meta, channels, summary, on_error)
        return cls(sites, summary, f"rxrx3-core {len(paths)} shards", np.uint8)

    @classmethod
    def from_jump(
        cls,
        table,
        channel_map: Mapping[str, str] | Sequence[str] | None = None,
        root: str | None = None,
        on_error: str = "raise",
        check_files: bool = True,
        dtype=None,
    ) -> "SiteIndex":
        """A JUMP load_data table (DataFrame, CSV or parquet path), one row per site. `channel_map` maps channel
        names, in the order wanted, to file columns (default: DNA, ER, RNA, AGP, Mito from `FileName_Orig{name}`);
        a sequence of names means `FileName_Orig{name}` each. Paths are `root/FileName` when `root` is given, else
        `PathName_X/FileName_X` when that column exists, else the column's value."""
        import pandas as pd

        check_on_error(on_error)
        summary = ErrorSummary()
        df = _read_table(table) if not isinstance(table, pd.DataFrame) else table
        if channel_map is None:
            channel_map = JUMP_CHANNELS
        if not isinstance(channel_map, Mapping):
            channel_map = {name: f"FileName_Orig{name}" for name in channel_map}
        for column in list(channel_map.values()) + ["Metadata_Plate", "Metadata_Well"]:
            if column not in df.columns:
                raise ValueError(f"JUMP table has no column {column!r}; columns are {list(df.columns)}")
        names = tuple(channel_map)
        sites: list[Site] = []
        key_rows: dict[tuple, list[int]] = defaultdict(list)
        for i, (plate, well, site_no) in enumerate(zip(
            df["Metadata_Plate"], df["Metadata_Well"], df["Metadata_Site"] if "Metadata_Site" in df.columns else [1] * len(df)
        )):
            key_rows[(_plain_str(plate), str(well), int(site_no))].append(i)
        bad_rows = set()
        for key, rows in key_rows.items():
            if len(rows) > 1:
                bad_rows.update(rows)
                handle(DataError("duplicate_key", f"rows {rows} of the JUMP table share plate/well/site {key}", f"{key[0]}_{key[1]}"),
                       on_error, summary)
        records = df.to_dict("records")
        for i, row in enumerate(records):
            if i in bad_rows:
                continue
            plate, address = _plain_str(row["Metadata_Plate"]), str(row["Metadata_Well"])
            site_no = int(row.get("Metadata_Site", 1))
            source = row.get("Metadata_Source")
            well_id = f"{source}_{plate}_{address}" if _present(source) else f"{plate}_{address}"
            experiment = next((str(row[c]) for c in ("Metadata_Batch", "Metadata_Source") if _present(row.get(c))), "")
            paths, missing = [], []
            for name, column in channel_map.items():
                fname = row[column]
                if not _present(fname):
                    missing.append(f"{name} ({column} empty)")
                    paths.append(None)
                    continue
                paths.append(_jump_path(row, column, str(fname), root))
            if len(missing) == len(names):
                handle(DataError("no_files", f"table row {i} has no channel file names", well_id), on_error, summary)
                continue
            if missing:
                handle(DataError("missing_file", f"table row {i} lacks channels {missing}", well_id), on_error, summary)
                continue
            absent = [p for p in paths if check_files and not os.path.exists(p)]
            if absent:
                handle(DataError("missing_file", "file not found", well_id, absent[0]), on_error, summary)
                continue
            perturbation = next((str(_clean(row[c])) for c in
                                 ("Metadata_JCP2022", "Metadata_InChIKey", "Metadata_broad_sample", "Metadata_pert_iname")
                                 if _present(row.get(c))), None)
            sites.append(Site(well_id, site_no, experiment, plate, address, perturbation, names, tuple(paths),
                              {k: _clean(v) for k, v in row.items()}))
        return cls(sites, summary, "jump table", dtype)

    @classmethod
    def from_pack(cls, pack_dir: str) -> "SiteIndex":
        """The sites of a `mae-fast pack` output folder (tiles read directly, metadata as packed)."""
        from .pack import read_pack_index

        return read_pack_index(pack_dir)


# ---------------------------------------------------------------------------------------------------------------
# reader helpers


def _expand_paths(paths, pattern: str) -> list[str]:
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


def _read_table(path):
    import pandas as pd

    path = os.fspath(path)
    with reading_table(path):
        return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)


def _jump_path(row: Mapping, column: str, fname: str, root: str | None) -> str:
    if root is not None:
        return os.path.join(root, fname)
    if column.startswith("FileName_"):
        folder = row.get("PathName_" + column[len("FileName_"):])
        if _present(folder):
            return os.path.join(str(folder), fname)
    return fname


def _add_channel(groups, bad_groups, gkey, channel: int, source, label: str, summary, on_error) -> None:
    """Record one channel file of a site group; a second file for the same channel is a duplicate key."""
    group = groups[gkey]
    if channel in group:
        bad_groups.add(gkey)
        handle(DataError("duplicate_key", f"two files for channel {channel}: {group[channel][1]} and {label}",
                         _group_well(gkey), label), on_error, summary)
        return
    group[channel] = (source, label)


def _group_well(gkey: tuple) -> str:
    experiment, plate, address, _ = gkey
    return f"{experiment}_{plate}_{address}"


def _scan_rxrx_folders(images_dir: str, summary: ErrorSummary, on_error: str):
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
                _add_channel(groups, bad_groups, gkey, int(fm["channel"]), f.path, f.path, summary, on_error)
    return groups, bad_groups


@dataclass
class _Metadata:
    """Metadata rows keyed for the join: per site (RxRx1) or per well (RxRx3)."""

    per_site: bool
    rows: dict[tuple, dict]
    bad_keys: set[tuple]
    experiment_column: str
    path: str


def _read_rxrx_metadata(path: str, summary: ErrorSummary, on_error: str) -> _Metadata:
    import pandas as pd

    with reading_table(path, "metadata CSV"):
        df = pd.read_csv(path, dtype={"well_id": str, "address": str, "well": str, "site_id": str})
    columns = set(df.columns)
    if set(RXRX1_KEYS) <= columns:
        per_site, exp_col = True, "experiment"
        keys = [(str(e), _plain_str(p), str(w), int(s)) for e, p, w, s in zip(df["experiment"], df["plate"], df["well"], df["site"])]
    elif set(RXRX3_KEYS) <= columns:
        per_site, exp_col = False, "experiment_name"
        keys = [(str(e), _plain_str(p), str(a)) for e, p, a in zip(df["experiment_name"], df["plate"], df["address"])]
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
        rows[key] = {k: _clean(v) for k, v in record.items()}
    return _Metadata(per_site, rows, bad, exp_col, path)


PERTURBATION_COLUMNS = ("gene", "treatment", "sirna", "sirna_id")  # a row's perturbation: the first one filled


def _perturbation(row: Mapping) -> str | None:
    for column in PERTURBATION_COLUMNS:
        if _present(row.get(column)):
            return _plain_str(_clean(row[column]))
    return None


def _assemble(groups, bad_groups, meta: _Metadata | None, channels, summary: ErrorSummary, on_error: str) -> list[Site]:
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
        well = _group_well(gkey)
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
        sites.append(Site(well, site_no, experiment, plate, address, _perturbation(row), names,
                          tuple(files[c][0] for c in found), row))
    if meta is not None:
        present = set(groups) if meta.per_site else {g[:3] for g in groups}
        for mkey, row in meta.rows.items():
            if mkey not in used_keys and mkey not in present:
                well = str(row.get("well_id") or "_".join(map(str, mkey[:3])))
                what = f"site {mkey[3]}" if meta.per_site else "any site"
                handle(DataError("no_files", f"metadata row has no image files for {what}", well, meta.path), on_error, summary)
    return sites

