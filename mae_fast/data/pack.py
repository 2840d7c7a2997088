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
import os
import shutil
from dataclasses import dataclass

import numpy as np

from mae_fast.io import OutputLock, OutputPathError, beside_lock_path, disk_full_error, is_disk_full
from .errors import DataError, ErrorSummary, check_on_error, handle
from .index import SiteIndex
from .loading import load_site
from .packed import CODECS, FORMAT, VERSION, tile_shapes

logger = logging.getLogger(__name__)


def _encode_tile(tile: np.ndarray, codec: str) -> bytes:
    tile = np.ascontiguousarray(tile)
    if codec == "raw":
        return tile.tobytes()
    import imagecodecs

    # lz4 + bit-shuffle: measured on 6x256x256 16-bit cell-like tiles, ratio 1.94 and 0.5 ms to decode, against
    # zstd's 2.02 and 0.8 ms (blosc2 frames name their compressor, so the reader handles either).
    return imagecodecs.blosc2_encode(tile, compressor="lz4", shuffle="bitshuffle", typesize=tile.dtype.itemsize,
                                     level=5, numthreads=1)


_WORKER: dict = {}


def _init_worker(index: SiteIndex, tile: int, codec: str, dtype) -> None:
    _WORKER.update(index=index, tile=tile, codec=codec, dtype=dtype)


def _init_pool_worker(*args) -> None:
    import signal

    # Ctrl-C reaches the whole process group: the parent handles it (and ends the pool); SIGTERM from the parent's
    # pool.terminate() ends a worker silently, without the parent's handler (inherited by fork) raising in here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(*args)


def _encode_site(position: int) -> tuple[int, object]:
    """(position, (height, width, [tile bytes])) or (position, DataError); runs in a worker process."""
    site = _WORKER["index"][position]
    tile, codec = _WORKER["tile"], _WORKER["codec"]
    try:
        image = load_site(site, dtype=_WORKER["dtype"])
        _, height, width = image.shape
        tiles = [_encode_tile(image.region(y, x, th, tw), codec) for y, x, th, tw in tile_shapes(height, width, tile)]
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
        if os.path.exists(out_dir):
            check_replaceable(out_dir)
        for stale in glob.glob(glob.escape(out_dir.rstrip(os.sep)) + ".tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        return _pack(index, out_dir, tile, codec, shard_bytes, num_workers, on_error)


def pack_files(out_dir: str) -> set[str] | None:
    """The files a pack folder's pack.json says `pack` wrote there, or None when it is not a readable pack."""
    try:
        with open(os.path.join(out_dir, "pack.json")) as f:
            manifest = json.load(f)
        return {"pack.json", "sites.parquet", *(str(s) for s in manifest["shards"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_replaceable(out_dir: str) -> None:
    """--overwrite replaces only a pack folder holding nothing but what `pack` wrote (its pack.json's files), or an
    empty folder: never a foreign file or folder."""
    if not os.path.isdir(out_dir):
        raise OutputPathError(f"--out {out_dir} exists and is not a folder; --overwrite replaces only a pack folder")
    present = set(os.listdir(out_dir))
    if not present:
        return
    own = pack_files(out_dir)
    if own is None:
        raise OutputPathError(f"--out {out_dir} is not a pack folder (no readable pack.json); --overwrite replaces "
                              "only what mae-fast pack wrote: write elsewhere or remove it yourself")
    foreign = sorted(present - own)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputPathError(f"--out {out_dir} holds files mae-fast pack did not write ({shown}); --overwrite "
                              "replaces only a pack's own files: move them or write elsewhere")


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
        if not rows:
            raise DataError("corrupt_image", f"no site of the index could be packed ({summary})")
        pd.DataFrame(rows).to_parquet(os.path.join(tmp, "sites.parquet"), index=False)
        manifest = {"format": FORMAT, "version": VERSION, "codec": codec, "tile": tile,
                    "channels": list(index.channels), "dtype": np.dtype(dtype).name, "n_sites": len(rows),
                    "shards": shards, "source": index.description, "summary": summary.to_dict()}
        with open(os.path.join(tmp, "pack.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    except BaseException as err:
        written = sum(e.stat().st_size for e in os.scandir(tmp)) if os.path.isdir(tmp) else 0
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        if is_disk_full(err):
            raise disk_full_error(os.path.dirname(os.path.abspath(out_dir)),
                                  f"packing into {out_dir} (after {written / 2**20:,.1f} MiB written, which is "
                                  "freed again)") from err
        raise
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

            pool = multiprocessing.get_context().Pool(num_workers, _init_pool_worker, (index, tile, codec, dtype))
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
