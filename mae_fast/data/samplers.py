"""Plate-grouped batch sampling for AdaBN models (`mae_fast.models.wsl`, ghost batch norm with batch statistics).

An AdaBN model normalises every batch with that batch's own statistics, at training and at inference, so each batch
must hold items of a single plate (the experimental batch whose technical effects the normalisation removes), and
at inference its items should be spread over the plate, not be the tiles of one well (whose statistics would remove
the well's own phenotype).

`PlateBatchSampler(plates, batch_size, train=...)` yields lists of item positions; `plates[i]` is the plate key of
item i (any hashable: `(experiment, plate)` for sites of a SiteIndex, see `from_index`). It is a torch batch sampler
(`DataLoader(dataset, batch_sampler=...)`).

    train=True   per epoch (`set_epoch`), seeded by (seed, epoch): each plate's items are permuted and cut into full
                 batches of `batch_size` (a plate's remainder, fewer than batch_size items, is left out that epoch --
                 a different remainder each epoch); the batches of all plates are then shuffled together. Ranks
                 take batches rank, rank + world_size, ...; every rank yields the same number (the last
                 n_batches mod world_size batches of the epoch are left out).
    train=False  every item exactly once: each plate's items in a seeded permutation (`shuffle=False`: in order),
                 cut into ceil(n / batch_size) batches of near-equal size (differing by at most one, none larger
                 than batch_size -- no tiny last batch with noisy statistics); plates in order of first
                 appearance. Ranks take batches rank, rank + world_size, ... (together: every item once).

With the crop loaders (k crops per decoded site): `PlateBatchSampler.from_index(index, B, repeat=k)` has as many
training batches per plate and epoch as a `make_train_loader` over that plate's sites alone (n_sites * k // B),
so `plate_of(batch)` of its batches can schedule which per-plate loader gives the next batch of crops.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)
_TRAIN_PERMUTE, _TRAIN_ORDER, _INFER_PERMUTE = 11, 12, 13  # stream tags: independent generators per purpose


def balanced_batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of ceil(n / batch_size) batches covering n items, differing by at most one (each <= batch_size)."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    k = math.ceil(n / batch_size)
    return [n // k + (1 if i < n % k else 0) for i in range(k)] if k else []


def plate_codes(plates: Sequence[Hashable]) -> tuple[np.ndarray, list]:
    """Per-item plate numbers 0..P-1 (in order of first appearance) and the P plate keys."""
    keys: dict = {}
    codes = np.empty(len(plates), dtype=np.int64)
    for i, p in enumerate(plates):
        codes[i] = keys.setdefault(p, len(keys))
    return codes, list(keys)


class PlateBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of item positions, each from one plate (see the module doc)."""

    def __init__(self, plates: Sequence[Hashable], batch_size: int, *, train: bool = True, seed: int = 0,
                 epoch: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(plates) == 0:
            raise ValueError("no items to sample: the plate list is empty")
        self.codes, self.plate_keys = plate_codes(plates)
        self.members = [np.flatnonzero(self.codes == p) for p in range(len(self.plate_keys))]  # sorted positions
        self.batch_size, self.train, self.seed, self.epoch = int(batch_size), bool(train), int(seed), int(epoch)
        self.shuffle, self.rank, self.world_size = bool(shuffle), int(rank), int(world_size)
        if self.train:
            small = [self.plate_keys[p] for p, m in enumerate(self.members) if len(m) < self.batch_size]
            full = sum(len(m) // self.batch_size for m in self.members)
            if full < self.world_size:
                raise ValueError(
                    f"no plate-pure training batches for every rank: {full} full batch(es) of {batch_size} over "
                    f"{len(self.plate_keys)} plate(s) (largest plate: {max(map(len, self.members))} items) for "
                    f"{world_size} rank(s); lower batch_size")
            if small:
                logger.warning("%d plate(s) have fewer than batch_size=%d items and are never sampled in training "
                               "(first: %r)", len(small), batch_size, small[0])
            self.never_sampled_plates = small
        else:
            self.never_sampled_plates = []

    @classmethod
    def from_index(cls, index, batch_size: int, repeat: int = 1, **kwargs) -> "PlateBatchSampler":
        """Items are the sites of a SiteIndex (plate key (experiment, plate)); with `repeat=k`, k items per site --
        item i is crop i % k of site i // k (the loaders' k crops per decoded site)."""
        if repeat < 1:
            raise ValueError(f"repeat must be positive, got {repeat}")
        keys = [(s.experiment, s.plate) for s in index for _ in range(repeat)]
        return cls(keys, batch_size, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plate_of(self, batch: Sequence[int]):
        """The plate key of a batch (all its items share it)."""
        return self.plate_keys[int(self.codes[batch[0]])]

    # -- batch lists ---------------------------------------------------------------------------------------------
    def _train_batches(self) -> list[np.ndarray]:
        batches = []
        for p, members in enumerate(self.members):
            rng = np.random.default_rng([_TRAIN_PERMUTE, self.seed, self.epoch, p])
            order = rng.permutation(members)
            full = len(order) // self.batch_size
            batches.extend(order[: full * self.batch_size].reshape(full, self.batch_size))
        perm = np.random.default_rng([_TRAIN_ORDER, self.seed, self.epoch]).permutation(len(batches))
        return [batches[i] for i in perm]

    def _inference_batches(self) -> list[np.ndarray]:
        batches = []
        for p, members in enumerate(self.members):
            order = (np.random.default_rng([_INFER_PERMUTE, self.seed, p]).permutation(members)
                     if self.shuffle else members)
            bounds = np.cumsum([0] + balanced_batch_sizes(len(order), self.batch_size))
            batches.extend(order[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        return batches

    def _mine(self) -> list[np.ndarray]:
        batches = self._train_batches() if self.train else self._inference_batches()
        if self.train:  # equal count on every rank
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._mine():
            yield batch.tolist()

    def __len__(self) -> int:
        if self.train:
            return sum(len(m) // self.batch_size for m in self.members) // self.world_size
        total = sum(math.ceil(len(m) / self.batch_size) for m in self.members)
        return len(range(self.rank, total, self.world_size))


__all__ = ["PlateBatchSampler", "balanced_batch_sizes", "plate_codes"]
