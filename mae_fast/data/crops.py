"""Seeded crop/flip sampling and the epoch plan, shared by every backend so that the same seed gives the same
crops on the torch DataLoader path and on the DALI path.

Determinism:
  * A site's crops in an epoch depend only on (seed, epoch, the site's key, k, image size): `sample_boxes` draws
    k uniforms per crop from a generator seeded by those numbers, so order, sharding and backend do not matter.
  * The epoch's site order is a permutation seeded by (seed, epoch); rank r takes positions r, r + W, ...
  * Crops of `shuffle_sites` consecutive sites form a *window*; the window's crops are emitted in a seeded random
    order, so a batch mixes crops of many sites instead of k crops of one.
  * Every rank yields the same number of batches: (n_sites // world_size) * k // batch_size. The crops beyond that
    (at most one site's crops plus less than one batch) are the epoch's drop_last; every site is still assigned to
    exactly one rank.

Crop geometry: box (y, x) is the top-left corner, y = floor(u * (H - crop + 1)); `hflip` mirrors columns
(left-right), `vflip` mirrors rows (top-bottom); the crop is image[:, y:y+crop, x:x+crop] then flipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError
from .index import SiteIndex
from .sites import Site
from .loading import load_site

_SITE_ORDER, _WINDOW_ORDER, _CROPS = 1, 2, 3  # stream tags: independent generators per purpose


@dataclass(frozen=True)
class CropBoxes:
    """k crop boxes of one site: top-left corners and flips, each an array of length k."""

    y: np.ndarray
    x: np.ndarray
    hflip: np.ndarray
    vflip: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx) -> "CropBoxes":
        return CropBoxes(self.y[idx], self.x[idx], self.hflip[idx], self.vflip[idx])


def sample_boxes(seed: int, epoch: int, site: Site, k: int, height: int, width: int, crop: int, flips: bool = True) -> CropBoxes:
    """The k random crops of `site` in `epoch` (independent of which rank or backend asks)."""
    if height < crop or width < crop:
        raise ValueError(f"image {height}x{width} is smaller than the crop {crop}")
    stream = site.crop_stream()
    rng = np.random.default_rng([_CROPS, int(seed), int(epoch), stream & 0xFFFFFFFF, stream >> 32])
    u = rng.random((k, 4))  # (k, [y, x, hflip, vflip])
    y = np.minimum((u[:, 0] * (height - crop + 1)).astype(np.int64), height - crop)
    x = np.minimum((u[:, 1] * (width - crop + 1)).astype(np.int64), width - crop)
    hflip = (u[:, 2] < 0.5) & flips
    vflip = (u[:, 3] < 0.5) & flips
    return CropBoxes(y, x, hflip, vflip)


def center_boxes(height: int, width: int, crop: int) -> CropBoxes:
    """The one centre crop (validation)."""
    if height < crop or width < crop:
        raise ValueError(f"image {height}x{width} is smaller than the crop {crop}")
    z = np.zeros(1, bool)
    return CropBoxes(np.array([(height - crop) // 2]), np.array([(width - crop) // 2]), z, z.copy())


def cut_numpy(image, boxes: CropBoxes, crop: int) -> np.ndarray:
    """(n, C, crop, crop) crops of a site image (anything with .shape (C, H, W), .dtype and
    `region(y, x, h, w, out)`): each region is copied once, straight into a flipped view of its output slot."""
    out = np.empty((len(boxes), image.shape[0], crop, crop), image.dtype)
    for i in range(len(boxes)):
        dst = out[i]
        if boxes.hflip[i]:
            dst = dst[:, :, ::-1]
        if boxes.vflip[i]:
            dst = dst[:, ::-1, :]
        image.region(int(boxes.y[i]), int(boxes.x[i]), crop, crop, out=dst)
    return out


def cut_torch(planes: list[torch.Tensor], boxes: CropBoxes, crop: int) -> torch.Tensor:
    """(n, C, crop, crop) crops of C (H, W) tensors (any device), same geometry as cut_numpy."""
    crops = []
    for i in range(len(boxes)):
        y, x = int(boxes.y[i]), int(boxes.x[i])
        r = torch.stack([p[y:y + crop, x:x + crop] for p in planes])  # (C, crop, crop)
        dims = [d for d, f in ((2, boxes.hflip[i]), (1, boxes.vflip[i])) if f]
        crops.append(torch.flip(r, dims) if dims else r)
    return torch.stack(crops)


# ---------------------------------------------------------------------------------------------------------------
# the epoch plan


@dataclass(frozen=True)
class Window:
    """`members[m]` is a position in the index; output slot s holds crop `slot_crop[s]` of member `slot_member[s]`."""

    number: int
    members: np.ndarray
    slot_member: np.ndarray
    slot_crop: np.ndarray
    first_position: int  # crop position (within this rank's epoch) of slot 0

    def needed(self, member: int) -> np.ndarray:
        """Sorted crop numbers of `member` that this window emits."""
        return np.unique(self.slot_crop[self.slot_member == member])


class TrainPlan:
    """Which crops rank `rank` yields in `epoch`, in order."""

    def __init__(self, n_sites: int, batch_size: int, crops_per_image: int, shuffle_sites: int,
                 seed: int, epoch: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size, self.k, self.epoch = batch_size, crops_per_image, epoch
        order = np.random.default_rng([_SITE_ORDER, seed, epoch]).permutation(n_sites)
        self.site_positions = order[rank::world_size]  # this rank's sites, in visiting order
        self.steps = (n_sites // world_size) * crops_per_image // batch_size
        if self.steps == 0:
            raise ValueError(f"an epoch has no batch: {n_sites} sites / world_size {world_size} x {crops_per_image} "
                             f"crops per image < batch_size {batch_size}")
        self.total = self.steps * batch_size
        self.windows: list[Window] = []
        position = 0
        for w in range(math.ceil(len(self.site_positions) / shuffle_sites)):
            if position >= self.total:
                break
            members = self.site_positions[w * shuffle_sites:(w + 1) * shuffle_sites]
            slots = np.random.default_rng([_WINDOW_ORDER, seed, epoch, rank, w]).permutation(len(members) * crops_per_image)
            slots = slots[: self.total - position]  # the epoch's tail (drop_last)
            self.windows.append(Window(w, members, slots // crops_per_image, slots % crops_per_image, position))
            position += len(slots)

    def windows_from(self, batch: int) -> list[Window]:
        """The rest of the epoch from batch number `batch` on (the first window trimmed to the resume point)."""
        start = batch * self.batch_size
        out = []
        for w in self.windows:
            skip = max(0, start - w.first_position)
            if skip < len(w.slot_crop):
                out.append(Window(w.number, w.members, w.slot_member[skip:], w.slot_crop[skip:], w.first_position + skip))
        return out


class ValPlan:
    """Centre crops of this rank's sites (positions rank, rank + W, ...) in index order, in windows."""

    def __init__(self, n_sites: int, batch_size: int, window_sites: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size, self.k, self.epoch = batch_size, 1, 0
        self.site_positions = np.arange(rank, n_sites, world_size)
        self.total = len(self.site_positions)
        self.steps = math.ceil(self.total / batch_size)
        self.windows = []
        for w in range(math.ceil(self.total / window_sites)):
            members = self.site_positions[w * window_sites:(w + 1) * window_sites]
            idx = np.arange(len(members))
            self.windows.append(Window(w, members, idx, np.zeros_like(idx), w * window_sites))

    windows_from = TrainPlan.windows_from


# ---------------------------------------------------------------------------------------------------------------
# torch DataLoader backend: one dataset item = one site of one window


@dataclass
class SiteCrops:
    """What one site contributes to a window: crops (n, C, crop, crop) for crop numbers `crop_ids`, or an error."""

    window: int
    member: int
    crop_ids: np.ndarray
    crops: torch.Tensor | None = None
    boxes: CropBoxes | None = None
    error: DataError | None = None


def site_crops(index: SiteIndex, plan, window: Window, member: int, crop: int, seed: int, dtype, flips: bool,
               center: bool) -> SiteCrops:
    """Load one site and cut the crops its window needs; a DataError is returned, not raised."""
    site = index[int(window.members[member])]
    crop_ids = window.needed(member)
    try:
        image = load_site(site, dtype=dtype, min_size=crop)
        _, height, width = image.shape
        boxes = center_boxes(height, width, crop) if center else sample_boxes(seed, plan.epoch, site, plan.k, height, width, crop, flips)
        boxes = boxes.take(crop_ids)
        return SiteCrops(window.number, member, crop_ids, torch.from_numpy(cut_numpy(image, boxes, crop)), boxes)
    except DataError as err:
        return SiteCrops(window.number, member, crop_ids, error=err)


class _SiteJobs(torch.utils.data.Dataset):
    """The (window, member) jobs of the rest of an epoch, in emission order (a map-style dataset for DataLoader)."""

    def __init__(self, index, plan, windows, crop, seed, dtype, flips, center):
        self.index, self.plan, self.crop, self.seed, self.dtype, self.flips, self.center = index, plan, crop, seed, dtype, flips, center
        self.windows = {w.number: w for w in windows}
        self.jobs = [(w.number, m) for w in windows for m in np.unique(w.slot_member)]

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> SiteCrops:
        w, m = self.jobs[i]
        return site_crops(self.index, self.plan, self.windows[w], int(m), self.crop, self.seed, self.dtype, self.flips, self.center)


def _keep(item):
    return item


def torch_window_results(index: SiteIndex, plan, windows, crop: int, seed: int, dtype, flips: bool, center: bool,
                         num_workers: int):
    """Yield (window, {member: SiteCrops}) for each window, sites decoded by DataLoader workers."""
    jobs = _SiteJobs(index, plan, windows, crop, seed, dtype, flips, center)
    loader = torch.utils.data.DataLoader(
        jobs, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_keep,
        prefetch_factor=4 if num_workers > 0 else None, persistent_workers=False,
    )
    it = iter(loader)
    for window in windows:
        results = {}
        for _ in np.unique(window.slot_member):
            item = next(it)
            results[item.member] = item
        yield window, results
