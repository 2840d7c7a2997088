"""Embedding with AdaBN models (WSL with ghost batch norm): batches drawn from one plate, in seeded windows of
sites, so each forward pass normalises with statistics of that plate and not of one well (see embed.py)."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from mae_fast.data.tiling import decode_workers
from mae_fast.training.config import ConfigError

_ADABN_SITE_ORDER, _ADABN_TILE_ORDER = 21, 22  # stream tags: independent generators per purpose


def is_adabn(model: torch.nn.Module) -> bool:
    """Batch statistics at inference: batches must be of one plate (see the module doc)."""
    return bool(getattr(model.cfg, "adabn", False))


def adabn_window_tiles(cfg) -> int:
    """Tiles per AdaBN window of an `EmbedConfig` (see embed.py)."""
    return cfg.adabn_window or 8 * cfg.batch_size


def adabn_batch_sizes(n: int, batch_size: int) -> list[int]:
    """Near-equal sizes of batches covering n tiles, each <= batch_size and >= 2 (batch statistics need two
    samples); only with batch_size 2 and an odd n does one batch hold 3."""
    from mae_fast.data.samplers import balanced_batch_sizes

    if n < 2 or batch_size < 2:
        raise ValueError(f"AdaBN batches need n >= 2 tiles and batch_size >= 2, got n={n}, batch_size={batch_size}")
    sizes = balanced_batch_sizes(n, batch_size)
    if min(sizes) < 2:
        k = n // 2
        sizes = [n // k + (1 if j < n % k else 0) for j in range(k)]
    return sizes


def _plate_seed(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=4).digest(), "little")


def _tiles_per_site(sites, tile: int, edge: str) -> int:
    """Tiles of the first readable site (from its headers; sites of a dataset share a size)."""
    from mae_fast.data.errors import DataError
    from mae_fast.data.loading import probe_site
    from mae_fast.data.tiling import tile_grid

    for site in sites.sites[:8]:
        try:
            probe = probe_site(site)
        except DataError:
            continue
        return max(1, len(tile_grid(probe.height, probe.width, tile, edge)))
    return 1


class AdaBNPlateTiles:
    """(tiles, keys) batches of one plate for an AdaBN model (see the module doc): sites in a seeded order, cut into
    windows of >= 2 sites and about `adabn_window` tiles; each window's tiles shuffled (seeded by seed, plate,
    window) and cut by `adabn_batch_sizes`. `summary` counts the sites skipped (on_error="skip")."""

    def __init__(self, sites, plate_label: str, tile: int, cfg, device):
        from mae_fast.data.errors import ErrorSummary

        self.sites, self.plate_label, self.tile, self.cfg, self.device = sites, plate_label, tile, cfg, device
        self.summary = ErrorSummary()

    def windows(self) -> list[list[int]]:
        """Positions of the plate's sites per window: balanced, >= 2 sites each (when the plate has 2)."""
        n = len(self.sites)
        order = np.random.default_rng([_ADABN_SITE_ORDER, self.cfg.seed, _plate_seed(self.plate_label)]).permutation(n)
        per_site = _tiles_per_site(self.sites, self.tile, self.cfg.edge)
        sites_per_window = max(2, math.ceil(adabn_window_tiles(self.cfg) / per_site))
        k = max(1, n // sites_per_window)
        bounds = np.cumsum([0] + [n // k + (1 if j < n % k else 0) for j in range(k)])
        return [sorted(order[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]

    def _window_tiles(self, positions: list[int]):
        """Every tile of the window's sites: (n, C, tile, tile) and their keys."""
        from mae_fast.data.tiling import iter_tiles

        wanted = {self.sites[p].key for p in positions}
        window = self.sites.select(where=lambda s: s.key in wanted)
        cfg = self.cfg
        it = iter_tiles(window, tile=self.tile, batch_size=cfg.batch_size, edge=cfg.edge, on_error=cfg.data.on_error,
                        num_workers=decode_workers(cfg.data.num_workers), device=self.device, backend=cfg.data.backend)
        parts, keys = [], []
        for tiles, batch_keys in it:
            parts.append(tiles)
            keys.extend(batch_keys)
        self.summary.merge(it.summary)
        return (torch.cat(parts) if parts else None), keys

    def __iter__(self):
        for w, positions in enumerate(self.windows()):
            tiles, keys = self._window_tiles(positions)
            if not keys:
                continue  # every site of the window was skipped (counted in the summary)
            if len(keys) < 2:
                raise ConfigError(f"plate {self.plate_label}: only {len(keys)} tile could be read, but an AdaBN model "
                                  "needs batches of >= 2 tiles of one plate (its batch statistics)")
            perm = np.random.default_rng([_ADABN_TILE_ORDER, self.cfg.seed, _plate_seed(self.plate_label), w]
                                         ).permutation(len(keys))
            start = 0
            for size in adabn_batch_sizes(len(keys), self.cfg.batch_size):
                chosen = perm[start:start + size]
                start += size
                yield tiles[torch.from_numpy(chosen).to(tiles.device)], [keys[j] for j in chosen]
