"""Non-overlapping tiles of every site, for embedding (inference).

Tile order: row-major over the tile grid -- tile_idx = row * n_cols + col, tile (row, col) covering
image[:, top + row*tile : top + (row+1)*tile, left + col*tile : left + (col+1)*tile]. A 2048² site gives 64 tiles,
a 512² site 4.

Edge policy when a side is not a multiple of `tile` (`edge=`):
    "drop"   (default) floor(H/tile) x floor(W/tile) tiles anchored at the top-left; the remainder rows at the
             bottom and columns at the right are not embedded (top = left = 0).
    "center" the same number of tiles, the grid centred: the remainder is split between the two sides
             (top = (H mod tile) // 2, left = (W mod tile) // 2).
    "pad"    ceil(H/tile) x ceil(W/tile) tiles; pixels beyond the image are 0 (the partial tiles are embedded too).
    "error"  raise a DataError(reason="too_small"/"size_mismatch") naming the site.
An image smaller than one tile has no tile under "drop"/"center": that is a "too_small" DataError (raised, or
skipped and counted with on_error="skip").

`iter_tiles` yields (B, C, tile, tile) integer tensors batched across sites in index order, with the key
(well_id, site, tile_idx) of each tile; sites are decoded by DataLoader workers or by DALI (backend=).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .dali import DaliDecodeError, DaliDecoder
from .errors import DataError, ErrorSummary, check_on_error, handle
from .index import SiteIndex
from .loader import resolve_backend
from .loading import SiteImage, load_site, probe_site
from .sites import Site

EDGES = ("drop", "center", "pad", "error")


def decode_workers(n: int | None) -> int:
    """Decode workers of a tile iteration: `n`, or by default up to 4 (one per CPU core)."""
    return min(4, os.cpu_count() or 1) if n is None else int(n)


def tile_grid(height: int, width: int, tile: int = 256, edge: str = "drop") -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the tiles in tile_idx order (under "pad" the last row/column of tiles may
    extend past the image)."""
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
    if edge == "pad":
        rows, cols, top, left = math.ceil(height / tile), math.ceil(width / tile), 0, 0
    else:
        rows, cols = height // tile, width // tile
        top, left = ((height % tile) // 2, (width % tile) // 2) if edge == "center" else (0, 0)
    return [(top + r * tile, left + c * tile) for r in range(rows) for c in range(cols)]


def site_tiles(image, tile: int, edge: str) -> np.ndarray:
    """(n_tiles, C, tile, tile) tiles of one decoded site image (anything with .shape (C,H,W) and .region)."""
    channels, height, width = image.shape
    corners = tile_grid(height, width, tile, edge)
    out = np.zeros((len(corners), channels, tile, tile), image.dtype)
    for i, (y, x) in enumerate(corners):
        h, w = min(tile, height - y), min(tile, width - x)  # < tile only at the padded edge
        out[i, :, :h, :w] = image.region(y, x, h, w)
    return out


@dataclass
class _SiteTiles:
    position: int
    tiles: torch.Tensor | None
    error: DataError | None = None


class _TileJobs(torch.utils.data.Dataset):
    def __init__(self, index: SiteIndex, tile: int, edge: str, dtype):
        self.index, self.tile, self.edge, self.dtype = index, tile, edge, dtype

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> _SiteTiles:
        site: Site = self.index[i]
        try:
            image = load_site(site, dtype=self.dtype, min_size=0 if self.edge == "pad" else self.tile)
            _, height, width = image.shape
            _check_edge(site, height, width, self.tile, self.edge)
            return _SiteTiles(i, torch.from_numpy(site_tiles(image, self.tile, self.edge)))
        except DataError as err:
            return _SiteTiles(i, None, err)


def _keep(item):
    return item


def _check_edge(site: Site, height: int, width: int, tile: int, edge: str) -> None:
    if edge == "error" and (height % tile or width % tile):
        raise DataError("size_mismatch", f"image is {height}x{width}, not a multiple of the tile {tile} (edge='error')",
                        site.well_id, site.source_name(0))


def _dali_site_tiles(index: SiteIndex, tile: int, edge: str, dtype, device: torch.device, threads, sites_per_run: int = 8):
    """_SiteTiles for every site in order, channel files decoded by DALI (GPU for JPEG/JPEG 2000 on CUDA)."""

    device_id = None if device.type != "cuda" else (device.index if device.index is not None else torch.cuda.current_device())
    decoder = DaliDecoder(sites_per_run * max(1, len(index.channels)), dtype, device_id, threads)
    min_size = 0 if edge == "pad" else tile
    for start in range(0, len(index), sites_per_run):
        probed, out = [], {}
        for i in range(start, min(start + sites_per_run, len(index))):
            site = index[i]
            try:
                p = probe_site(site, dtype=dtype, min_size=min_size)
                _check_edge(site, p.height, p.width, tile, edge)
                probed.append((i, site, p))
            except DataError as err:
                out[i] = _SiteTiles(i, None, err)
        try:
            planes = decoder.decode([b for _, _, p in probed for b in p.blobs]) if probed else []
        except DaliDecodeError:
            planes = None  # decode site by site in Python to name the bad file
        for n, (i, site, p) in enumerate(probed):
            try:
                if planes is None:
                    image = load_site(site, dtype=dtype, min_size=min_size)
                    out[i] = _SiteTiles(i, torch.from_numpy(site_tiles(image, tile, edge)).to(device))
                    continue
                site_planes = planes[n * len(p.blobs):(n + 1) * len(p.blobs)]
                if device.type == "cpu":
                    tiles = torch.from_numpy(site_tiles(SiteImage([t.numpy() for t in site_planes]), tile, edge))
                else:
                    tiles = _torch_tiles(site_planes, tile, edge)
                out[i] = _SiteTiles(i, tiles)
            except DataError as err:
                out[i] = _SiteTiles(i, None, err)
        for i in sorted(out):
            yield out[i]


def _torch_tiles(planes: list[torch.Tensor], tile: int, edge: str) -> torch.Tensor:
    """(n_tiles, C, tile, tile) tiles of C (H, W) device tensors, same order and padding as site_tiles."""
    height, width = planes[0].shape
    corners = tile_grid(height, width, tile, edge)
    out = torch.zeros((len(corners), len(planes), tile, tile), dtype=planes[0].dtype, device=planes[0].device)
    for i, (y, x) in enumerate(corners):
        h, w = min(tile, height - y), min(tile, width - x)
        for c, plane in enumerate(planes):
            out[i, c, :h, :w] = plane[y:y + h, x:x + w]
    return out


class TileIterator:
    """Iterable of (tiles (B, C, tile, tile), keys [(well_id, site, tile_idx)]); `summary` counts skipped sites."""

    def __init__(self, index: SiteIndex, tile: int = 256, batch_size: int = 64, edge: str = "drop",
                 on_error: str = "raise", num_workers: int = 0, device="cpu", backend: str = "torch",
                 dali_threads: int | None = None):
        if edge not in EDGES:
            raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
        if tile < 1 or batch_size < 1:
            raise ValueError("tile and batch_size must be positive")
        self.index, self.tile, self.batch_size, self.edge = index, tile, batch_size, edge
        self.on_error = check_on_error(on_error)
        self.num_workers, self.device = num_workers, torch.device(device)

        self.backend = resolve_backend(backend, index, self.device)
        self.dali_threads = dali_threads
        self.summary = ErrorSummary()

    def _site_tiles(self):
        if self.backend == "dali":
            return _dali_site_tiles(self.index, self.tile, self.edge, self.index.dtype, self.device, self.dali_threads)
        jobs = _TileJobs(self.index, self.tile, self.edge, self.index.dtype)
        return torch.utils.data.DataLoader(jobs, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                           collate_fn=_keep, prefetch_factor=4 if self.num_workers > 0 else None)

    def __iter__(self):
        loader = self._site_tiles()
        carry: list[torch.Tensor] = []
        keys: list[tuple[str, int, int]] = []
        n = 0
        for item in loader:
            if item.error is not None:
                handle(item.error, self.on_error, self.summary)
                continue
            site = self.index[item.position]
            carry.append(item.tiles)
            keys.extend((site.well_id, site.site, t) for t in range(len(item.tiles)))
            n += len(item.tiles)
            while n >= self.batch_size:
                yield self._emit(carry, keys, self.batch_size)
                n -= self.batch_size
        if n:
            yield self._emit(carry, keys, n)

    def _emit(self, carry: list, keys: list, n: int):
        tiles = _cat(carry) if len(carry) > 1 else carry[0]
        batch, rest = tiles[:n], tiles[n:]
        carry[:] = [rest] if len(rest) else []
        batch_keys = keys[:n]
        del keys[:n]
        batch = batch.contiguous()
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        elif batch.device != self.device:
            batch = batch.to(self.device)
        return batch, batch_keys


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, through numpy for CPU tensors (torch.cat of uint16 is several times slower than a memcpy)."""
    if tensors[0].device.type == "cpu":
        return torch.from_numpy(np.concatenate([t.numpy() for t in tensors]))
    return torch.cat(tensors)


def iter_tiles(index: SiteIndex, tile: int = 256, batch_size: int = 64, edge: str = "drop", on_error: str = "raise",
               num_workers: int = 0, device="cpu", backend: str = "torch", dali_threads: int | None = None) -> TileIterator:
    """Tiles of every site of `index` in index order (see module doc for the tile order and edge policy).
    backend: "torch" (DataLoader workers), "dali" (DALI decoding; GPU for JPEG/JPEG 2000 on a CUDA device) or
    "auto" (DALI on CUDA for JPEG/JPEG 2000 files, as loader.resolve_backend)."""
    return TileIterator(index, tile, batch_size, edge, on_error, num_workers, device, backend, dali_threads)
