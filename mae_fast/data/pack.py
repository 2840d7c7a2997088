"""`mae-fast pack`: convert a dataset once into tiles that a crop loader reads at full speed.

Why: a 2048² 16-bit PNG channel costs 85-170 ms of CPU to decode here (6 channels: 0.5-1 CPU-s per site), far from
the >= 600 crops/s per GPU a ViT-L/8 trainer consumes unless many crops share one decode. Lossless blosc2 (lz4,
bit-shuffle) decodes the same pixels >10x faster and stores them a little smaller than PNG, and storing each site as
tiles means a random crop decodes only the (at most 4) tiles it overlaps. See benchmarks/bench_data.py.

Layout of a pack folder (format version 1):
    pack.json        {"format": "mae_fast.pack", "version": 1, "codec", "tile", "channels", "dtype", "n_sites",
                      "shards", "source", "summary"}
    sites.parquet    one row per site: well_id, site, experiment, plate, address, perturbation, height, width,
                     shard, start (byte offset of the site's first tile), tile_sizes (list<int32>), metadata_json
                     (the site's full metadata row as JSON)
    shard-00000.bin  the sites' tiles, back to back. A site's tiles follow its tile grid row-major
                     (ceil(H/tile) x ceil(W/tile); edge tiles are smaller); each tile holds all C channels as one
                     C x th x tw array, encoded with `codec` ("blosc2": lz4 + bit-shuffle frames, or "raw").
The folder is written under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import mmap
import os
import shutil
from dataclasses import dataclass

import numpy as np

from mae_fast.io import OutputLock, beside_lock_path
from .errors import DataError, ErrorSummary, check_on_error, handle
from .index import Site, SiteIndex

logger = logging.getLogger("mae_fast.data")
FORMAT, VERSION = "mae_fast.pack", 1
CODECS = ("blosc2", "raw")


@dataclass(frozen=True, eq=False)
class PackRef:
    """Where one packed site lives: shard file, byte offset of its first tile and every tile's size."""

    path: str
    start: int
    tile_sizes: np.ndarray  # int32, one per tile, row-major over the tile grid
    height: int
    width: int
    channels: int
    dtype: np.dtype
    tile: int
    codec: str

    def __str__(self) -> str:
        return f"{self.path}@{self.start}"


def _encode_tile(tile: np.ndarray, codec: str) -> bytes:
    tile = np.ascontiguousarray(tile)
    if codec == "raw":
        return tile.tobytes()
    import imagecodecs

    # lz4 + bit-shuffle: measured on 6x256x256 16-bit cell-like tiles, ratio 1.94 and 0.5 ms to decode, against
    # zstd's 2.02 and 0.8 ms (blosc2 frames name their compressor, so the reader handles either).
    return imagecodecs.blosc2_encode(tile, compressor="lz4", shuffle="bitshuffle", typesize=tile.dtype.itemsize,
                                     level=5, numthreads=1)


def _decode_tile(data, codec: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
    if codec == "raw":
        raw = bytes(data)
    else:
        import imagecodecs

        raw = imagecodecs.blosc2_decode(bytes(data), numthreads=1)
    out = np.frombuffer(raw, dtype)
    if out.size != math.prod(shape):
        raise ValueError(f"tile holds {out.size} values, expected {shape}")
    return out.reshape(shape)


def _tile_shapes(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """(y, x, th, tw) of every pack tile, row-major."""
    return [(y, x, min(tile, height - y), min(tile, width - x))
            for y in range(0, height, tile) for x in range(0, width, tile)]


_MAPS: dict[tuple[int, str], mmap.mmap] = {}


def _shard_map(path: str) -> mmap.mmap:
    """Memory map of a shard, one per process (DataLoader workers open their own)."""
    key = (os.getpid(), path)
    m = _MAPS.get(key)
    if m is None:
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        _MAPS[key] = m
    return m


class PackedSiteImage:
    """A packed site read tile by tile; `region` decodes only the tiles it overlaps (cached for this site)."""

    def __init__(self, site: Site):
        self.site, self.ref = site, site.packed
        ref = self.ref
        self._ends = np.cumsum(ref.tile_sizes, dtype=np.int64) + ref.start
        self._cols = math.ceil(ref.width / ref.tile)
        self._cache: dict[int, np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.ref.channels, self.ref.height, self.ref.width)

    @property
    def dtype(self) -> np.dtype:
        return self.ref.dtype

    def _tile(self, t: int) -> np.ndarray:
        if t not in self._cache:
            ref = self.ref
            row, col = divmod(t, self._cols)
            th, tw = min(ref.tile, ref.height - row * ref.tile), min(ref.tile, ref.width - col * ref.tile)
            end = int(self._ends[t])
            begin = end - int(ref.tile_sizes[t])
            try:
                data = _shard_map(ref.path)[begin:end]
                if len(data) != end - begin:
                    raise ValueError(f"shard ends at byte {begin + len(data)}, tile needs {end}")
                self._cache[t] = _decode_tile(data, ref.codec, ref.dtype, (ref.channels, th, tw))
            except FileNotFoundError:
                raise DataError("missing_file", "pack shard not found", self.site.well_id, ref.path) from None
            except Exception as err:  # noqa: BLE001 - codec errors have their own types
                raise DataError("corrupt_image", f"packed tile {t} unreadable: {type(err).__name__}: {err}",
                                self.site.well_id, f"{ref.path}@{begin}") from None
        return self._cache[t]

    def region(self, y: int, x: int, h: int, w: int, out: np.ndarray | None = None) -> np.ndarray:
        """(C, h, w) copy of the packed site's rows y..y+h, columns x..x+w (into `out` when given, see
        loading.SiteImage.region)."""
        ref = self.ref
        if out is None:
            out = np.empty((ref.channels, h, w), ref.dtype)
        for row in range(y // ref.tile, (y + h - 1) // ref.tile + 1):
            for col in range(x // ref.tile, (x + w - 1) // ref.tile + 1):
                tile = self._tile(row * self._cols + col)
                ty, tx = row * ref.tile, col * ref.tile
                y0, y1 = max(y, ty), min(y + h, ty + tile.shape[1])
                x0, x1 = max(x, tx), min(x + w, tx + tile.shape[2])
                out[:, y0 - y:y1 - y, x0 - x:x1 - x] = tile[:, y0 - ty:y1 - ty, x0 - tx:x1 - tx]
        return out

    def full(self) -> np.ndarray:
        return self.region(0, 0, self.ref.height, self.ref.width)


def probe_packed_site(site: Site, dtype=None, min_size: int = 0):
    from .loading import SiteProbe

    ref = site.packed
    if dtype is not None and np.dtype(dtype) != ref.dtype:
        raise DataError("bit_depth", f"packed as {ref.dtype}, the dataset is {np.dtype(dtype)}", site.well_id, str(ref))
    if min(ref.height, ref.width) < min_size:
        raise DataError("too_small", f"image is {ref.height}x{ref.width}, smaller than {min_size}x{min_size}",
                        site.well_id, str(ref))
    if not os.path.exists(ref.path):
        raise DataError("missing_file", "pack shard not found", site.well_id, ref.path)
    return SiteProbe([], [], ref.height, ref.width, ref.dtype)


def open_packed_site(site: Site, dtype=None, min_size: int = 0) -> PackedSiteImage:
    probe_packed_site(site, dtype, min_size)
    return PackedSiteImage(site)


# ---------------------------------------------------------------------------------------------------------------
# writing


_WORKER: dict = {}


def _init_worker(index: SiteIndex, tile: int, codec: str, dtype) -> None:
    _WORKER.update(index=index, tile=tile, codec=codec, dtype=dtype)


def _encode_site(position: int) -> tuple[int, object]:
    """(position, (height, width, [tile bytes])) or (position, DataError); runs in a worker process."""
    from .loading import load_site

    site = _WORKER["index"][position]
    tile, codec = _WORKER["tile"], _WORKER["codec"]
    try:
        image = load_site(site, dtype=_WORKER["dtype"])
        _, height, width = image.shape
        tiles = [_encode_tile(image.region(y, x, th, tw), codec) for y, x, th, tw in _tile_shapes(height, width, tile)]
        return position, (height, width, tiles)
    except DataError as err:
        return position, err


@dataclass
class PackResult:
    out_dir: str
    n_sites: int
    n_bytes: int
    summary: ErrorSummary


def pack_index(index: SiteIndex, out_dir: str, tile: int = 256, codec: str = "blosc2", shard_bytes: int = 1 << 30,
               num_workers: int = 0, on_error: str = "raise", overwrite: bool = False) -> PackResult:
    """Decode every site of `index` once and write it as a pack folder (see module doc); one writer at a time
    (`mae_fast.io`)."""
    check_on_error(on_error)
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if codec == "blosc2":
        try:
            import imagecodecs  # noqa: F401
        except ImportError as err:
            raise ImportError("codec='blosc2' needs imagecodecs (`pip install 'mae_fast[jp2]'`), or use codec='raw'") from err
    if len(index) == 0:
        raise ValueError("the index has no sites to pack")
    with OutputLock(beside_lock_path(out_dir), f"pack folder {out_dir}"):
        if os.path.exists(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
        for stale in glob.glob(glob.escape(out_dir.rstrip(os.sep)) + ".tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        return _pack(index, out_dir, tile, codec, shard_bytes, num_workers, on_error)


def _pack(index: SiteIndex, out_dir: str, tile: int, codec: str, shard_bytes: int, num_workers: int,
          on_error: str) -> PackResult:
    import pandas as pd

    dtype = index.dtype
    summary = index.summary.copy()
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        rows, shards, n_bytes = _write_shards(index, tmp, tile, codec, dtype, shard_bytes, num_workers, on_error, summary)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    if not rows:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError("corrupt_image", f"no site of the index could be packed ({summary})")
    pd.DataFrame(rows).to_parquet(os.path.join(tmp, "sites.parquet"), index=False)
    manifest = {"format": FORMAT, "version": VERSION, "codec": codec, "tile": tile, "channels": list(index.channels),
                "dtype": np.dtype(dtype).name, "n_sites": len(rows), "shards": shards, "source": index.description,
                "summary": summary.to_dict()}
    with open(os.path.join(tmp, "pack.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return PackResult(out_dir, len(rows), n_bytes, summary)


def _write_shards(index, tmp, tile, codec, dtype, shard_bytes, num_workers, on_error, summary):
    """Encode every site (in worker processes) and append its tiles to the current shard; returns the rows."""
    rows, shards, n_bytes = [], [], 0
    shard_file, shard_size = None, 0
    pool = None
    try:
        if num_workers > 0:
            import multiprocessing

            pool = multiprocessing.get_context().Pool(num_workers, _init_worker, (index, tile, codec, dtype))
            results = pool.imap(_encode_site, range(len(index)), chunksize=1)
        else:
            _init_worker(index, tile, codec, dtype)
            results = map(_encode_site, range(len(index)))
        for position, result in results:
            site = index[position]
            if isinstance(result, DataError):
                handle(result, on_error, summary)
                continue
            height, width, tiles = result
            if shard_file is None or shard_size >= shard_bytes:
                if shard_file is not None:
                    shard_file.close()
                shards.append(f"shard-{len(shards):05d}.bin")
                shard_file, shard_size = open(os.path.join(tmp, shards[-1]), "wb"), 0
            start = shard_size
            for data in tiles:
                shard_file.write(data)
            size = sum(len(d) for d in tiles)
            shard_size += size
            n_bytes += size
            rows.append({"well_id": site.well_id, "site": site.site, "experiment": site.experiment, "plate": site.plate,
                         "address": site.address, "perturbation": site.perturbation, "height": height, "width": width,
                         "shard": len(shards) - 1, "start": start, "tile_sizes": [len(d) for d in tiles],
                         "metadata_json": json.dumps(dict(site.metadata), default=str)})
    finally:
        if pool is not None:
            pool.terminate()  # every result was consumed, or an error stops the remaining work now
            pool.join()
        if shard_file is not None:
            shard_file.close()
    return rows, shards, n_bytes


def read_pack_index(pack_dir: str) -> SiteIndex:
    """The SiteIndex of a pack folder (sites read from the shards, metadata as packed)."""
    import pandas as pd

    manifest_path = os.path.join(pack_dir, "pack.json")
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"{pack_dir} is not a mae-fast pack (no pack.json)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{manifest_path}: unsupported pack format {manifest.get('format')} v{manifest.get('version')}")
    df = pd.read_parquet(os.path.join(pack_dir, "sites.parquet"))
    channels = tuple(manifest["channels"])
    dtype = np.dtype(manifest["dtype"])
    summary = _summary_from_dict(manifest.get("summary", {}))
    sites = []
    for row in df.itertuples(index=False):
        ref = PackRef(os.path.join(pack_dir, manifest["shards"][row.shard]), int(row.start),
                      np.asarray(row.tile_sizes, np.int32), int(row.height), int(row.width), len(channels), dtype,
                      int(manifest["tile"]), manifest["codec"])
        perturbation = None if row.perturbation is None or (isinstance(row.perturbation, float) and math.isnan(row.perturbation)) else str(row.perturbation)
        sites.append(Site(row.well_id, int(row.site), row.experiment, str(row.plate), row.address, perturbation,
                          channels, (), json.loads(row.metadata_json), ref))
    return SiteIndex(sites, summary, f"pack {pack_dir} (from {manifest.get('source', '?')})", dtype)


def _summary_from_dict(saved: dict) -> ErrorSummary:
    from .errors import SkippedItem

    summary = ErrorSummary()
    summary.counts.update(saved.get("counts", {}))
    summary.skipped.extend(SkippedItem(**item) for item in saved.get("skipped", []))
    summary.ignored_files.extend(saved.get("ignored_files", []))
    summary.replaced_crops = int(saved.get("replaced_crops", 0))
    return summary
