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

The record of one site is `sites.Site`; what the readers share (layouts' patterns, the RxRx scan) is `sources.py`.

Bad input (`on_error="raise"` stops, `"skip"` leaves the site out and counts it in `index.summary`): a channel file
missing, a metadata row without files, files without a metadata row, duplicate keys.  Decoding problems (corrupt
files, sizes, bit depth) are found when images are read; `index.check()` finds them up front from the headers.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Callable

import numpy as np

from .decode import BlobRef
from .errors import DataError, ErrorSummary, SkippedItem, check_on_error, handle
from .loading import probe_site
from .packed import FORMAT, VERSION, PackRef
from .sites import Site, site_sort_key
from .sources import (
    JUMP_CHANNELS,
    RXRX3_CORE_KEY_RE,
    add_channel,
    as_values,
    assemble_sites,
    clean_value,
    expand_paths,
    is_present,
    jump_path,
    plain_str,
    read_rxrx_metadata,
    read_table,
    scan_rxrx_folders,
)


def check_unique_channels(channels) -> None:
    """A channel asked for twice would be decoded twice and fed as two channels: refused, naming it."""
    if channels is None:
        return
    seen, repeated = set(), []
    for c in channels:
        if c in seen and c not in repeated:
            repeated.append(c)
        seen.add(c)
    if repeated:
        raise ValueError(f"channels {', '.join(map(str, channels))}: {', '.join(map(str, repeated))} "
                         f"given more than once; each channel may appear once")


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
        exps, plates, perts, wells = map(as_values, (experiment, plate, perturbation, well))

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
        check_unique_channels(channels)
        summary = ErrorSummary()
        images_dir = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(f"RxRx root {root!r} is not a folder")
        groups, bad_groups = scan_rxrx_folders(images_dir, summary, on_error)
        if metadata_csv is None and os.path.exists(os.path.join(root, "metadata.csv")):
            metadata_csv = os.path.join(root, "metadata.csv")
        meta = read_rxrx_metadata(metadata_csv, summary, on_error) if metadata_csv else None
        sites = assemble_sites(groups, bad_groups, meta, channels, summary, on_error)
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

        check_on_error(on_error)
        check_unique_channels(channels)
        summary = ErrorSummary()
        paths = expand_paths(parquet_paths, "*.parquet")
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
                    add_channel(groups, bad_groups, gkey, int(m["channel"]), source, f"{path}::{key}", summary, on_error)
        meta = read_rxrx_metadata(metadata_csv, summary, on_error) if metadata_csv else None
        sites = assemble_sites(groups, bad_groups, meta, channels, summary, on_error)
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
        df = read_table(table) if not isinstance(table, pd.DataFrame) else table
        if channel_map is None:
            channel_map = JUMP_CHANNELS
        check_unique_channels(list(channel_map))
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
            key_rows[(plain_str(plate), str(well), int(site_no))].append(i)
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
            plate, address = plain_str(row["Metadata_Plate"]), str(row["Metadata_Well"])
            site_no = int(row.get("Metadata_Site", 1))
            source = row.get("Metadata_Source")
            well_id = f"{source}_{plate}_{address}" if is_present(source) else f"{plate}_{address}"
            experiment = next((str(row[c]) for c in ("Metadata_Batch", "Metadata_Source") if is_present(row.get(c))), "")
            paths, missing = [], []
            for name, column in channel_map.items():
                fname = row[column]
                if not is_present(fname):
                    missing.append(f"{name} ({column} empty)")
                    paths.append(None)
                    continue
                paths.append(jump_path(row, column, str(fname), root))
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
            perturbation = next((str(clean_value(row[c])) for c in
                                 ("Metadata_JCP2022", "Metadata_InChIKey", "Metadata_broad_sample", "Metadata_pert_iname")
                                 if is_present(row.get(c))), None)
            sites.append(Site(well_id, site_no, experiment, plate, address, perturbation, names, tuple(paths),
                              {k: clean_value(v) for k, v in row.items()}))
        return cls(sites, summary, "jump table", dtype)

    @classmethod
    def from_pack(cls, pack_dir: str) -> "SiteIndex":
        """The sites of a `mae-fast pack` output folder (tiles read directly, metadata as packed)."""
        import pandas as pd

        manifest_path = os.path.join(pack_dir, "pack.json")
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"{pack_dir} is not a mae-fast pack (no pack.json)")
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{manifest_path}: the pack's manifest is not valid JSON ({err}); pack the dataset "
                             "again") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{manifest_path}: the pack's manifest is not a JSON object; pack the dataset again")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"{manifest_path}: unsupported pack format {manifest.get('format')} v{manifest.get('version')}")
        df = pd.read_parquet(os.path.join(pack_dir, "sites.parquet"))
        channels = tuple(manifest["channels"])
        dtype = np.dtype(manifest["dtype"])
        summary = summary_from_dict(manifest.get("summary", {}))
        sites = []
        for row in df.itertuples(index=False):
            ref = PackRef(os.path.join(pack_dir, manifest["shards"][row.shard]), int(row.start),
                          np.asarray(row.tile_sizes, np.int32), int(row.height), int(row.width), len(channels), dtype,
                          int(manifest["tile"]), manifest["codec"])
            perturbation = None if row.perturbation is None or (isinstance(row.perturbation, float) and math.isnan(row.perturbation)) else str(row.perturbation)
            sites.append(Site(row.well_id, int(row.site), row.experiment, str(row.plate), row.address, perturbation,
                              channels, (), json.loads(row.metadata_json), ref))
        return cls(sites, summary, f"pack {pack_dir} (from {manifest.get('source', '?')})", dtype)


def summary_from_dict(saved: dict) -> ErrorSummary:
    summary = ErrorSummary()
    summary.counts.update(saved.get("counts", {}))
    summary.skipped.extend(SkippedItem(**item) for item in saved.get("skipped", []))
    summary.ignored_files.extend(saved.get("ignored_files", []))
    summary.replaced_crops = int(saved.get("replaced_crops", 0))
    return summary
