"""Reading `mae-fast pack` folders (the format is described in pack.py, which writes them): where a packed site lives
(`PackRef`) and its tiles, decoded only where a crop overlaps them."""
from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .sites import Site, SiteProbe

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


def tile_shapes(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
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
