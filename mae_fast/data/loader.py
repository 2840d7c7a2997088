"""Training and validation crop loaders: `make_train_loader`, `make_val_loader`.

Batches are (B, C, crop, crop) uint8/uint16 tensors on the training device -- integers until the GPU, the model
standardises. Both backends (torch DataLoader workers; DALI, CPU or mixed GPU decoding) follow the same plan
(crops.TrainPlan) and cut crops at the same boxes (crops.sample_boxes), so they yield identical batches for the
same seed; see crops.py for the determinism rules.

Resuming: `state_dict()` holds the epoch and the number of batches already yielded in it; after
`load_state_dict(state)` iteration continues with the next batch of that epoch exactly. `set_epoch(e)` moves to
the start of epoch e unless the loader is already in epoch e (so the usual `for epoch in range(start, n):
loader.set_epoch(epoch); for batch in loader: ...` resumes mid-epoch after a load). Finishing an epoch moves the
loader to the start of the next one.

Bad input: with on_error="raise" the first DataError stops iteration; with "skip" the site is recorded in
`loader.summary` (once per bad file) and, for training, its crop slots are refilled from the other sites of the
same window, so every rank still yields the same number of full batches.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .crops import TrainPlan, ValPlan, torch_window_results
from .dali import DaliDecoder, dali_available, dali_window_results, require_dali
from .decode import read_bytes, sniff_format
from .errors import DataError, ErrorSummary, check_on_error
from .index import SiteIndex
from .loading import probe_site

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "dali")
MAX_AUTO_CROPS = 16


@dataclass
class CropInfo:
    """Where each crop of a batch came from: positions in the index, top-left corners and flips (numpy, length B)."""

    site_index: np.ndarray
    y: np.ndarray
    x: np.ndarray
    hflip: np.ndarray
    vflip: np.ndarray

    @staticmethod
    def concat(parts: list["CropInfo"]) -> "CropInfo":
        return CropInfo(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("site_index", "y", "x", "hflip", "vflip")))

    def take(self, sl: slice) -> "CropInfo":
        return CropInfo(self.site_index[sl], self.y[sl], self.x[sl], self.hflip[sl], self.vflip[sl])


def default_crops_per_image(index: SiteIndex, crop_size: int) -> int:
    """Non-overlapping crops that fit the first site (4 for 512², 64 for 2048²), capped at MAX_AUTO_CROPS = 16:
    the measured decode cost of a 2048² 16-bit PNG site (~0.5 CPU-s) is shared by 16 crops."""
    for site in index.sites[:8]:
        try:
            p = probe_site(site)
        except DataError:
            continue
        return int(max(1, min(MAX_AUTO_CROPS, (p.height // crop_size) * (p.width // crop_size))))
    return 1


def _first_format(index: SiteIndex) -> str | None:
    """Format of the first readable channel file (None for packed or unreadable sites)."""
    for site in index.sites[:8]:
        if site.packed is not None or not site.sources:
            return None
        try:
            return sniff_format(read_bytes(site.sources[0]))
        except DataError:
            continue
    return None


def resolve_backend(backend: str, index: SiteIndex, device: torch.device) -> str:
    """"auto": DALI when the device is CUDA, DALI is installed and the files are JPEG or JPEG 2000 (the formats
    DALI decodes on the GPU); otherwise the torch path (PNG and TIFF decode on the CPU either way, and the torch
    path is the one tested on CPU-only CI). "dali" forces DALI (CPU pipeline on a CPU device)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    packed = any(s.packed is not None for s in index.sites[:1])
    if backend == "dali":
        require_dali()
        if packed:
            raise ValueError("backend='dali' cannot read a `mae-fast pack` output (blosc2 tiles); use backend='torch'")
        return "dali"
    if backend == "auto":

        if device.type == "cuda" and not packed and dali_available() and _first_format(index) in ("jpeg", "jp2"):
            return "dali"
    return "torch"


class CropLoader:
    """Iterable of batches following a TrainPlan (random crops) or ValPlan (centre crops); see module doc."""

    def __init__(self, index: SiteIndex, *, crop_size: int, batch_size: int, crops_per_image: int, shuffle_sites: int,
                 seed: int, epoch: int, rank: int, world_size: int, backend: str, device, num_workers: int,
                 on_error: str, flips: bool, return_info: bool, train: bool, dali_threads: int | None = None):
        if len(index) == 0:
            raise ValueError("the index has no sites")
        if crop_size < 1 or batch_size < 1 or crops_per_image < 1 or shuffle_sites < 1:
            raise ValueError("crop_size, batch_size, crops_per_image and shuffle_sites must be positive")
        self.index = index
        self.crop_size, self.batch_size, self.k, self.shuffle_sites = crop_size, batch_size, crops_per_image, shuffle_sites
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.device = torch.device(device)
        self.backend = resolve_backend(backend, index, self.device)
        if self.backend == "dali":
            self._check_dali(forced=backend == "dali", dtype=index.dtype, threads=dali_threads)
        self.num_workers, self.dali_threads = num_workers, dali_threads
        self.on_error = check_on_error(on_error)
        self.flips, self.return_info, self.train = flips, return_info, train
        self.dtype = index.dtype
        if self.dtype is None:
            raise DataError("corrupt_image", "no readable site among the first sites of the index to learn its bit depth",
                            index.sites[0].well_id, index.sites[0].source_name(0))
        self.summary = ErrorSummary()
        self._reported: set[tuple] = set()
        self.epoch, self._batch = int(epoch), 0
        self._plan_cache: tuple[int, object] | None = None
        self._plan(self.epoch)  # validates the configuration now, not at the first batch

    def _dali_device_id(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _check_dali(self, forced: bool, dtype, threads) -> None:
        """Start a DALI pipeline once now; under backend="auto" fall back to torch (with a warning) if it fails."""

        try:
            DaliDecoder(1, dtype if dtype is not None else np.uint8, self._dali_device_id(), threads).check()
        except Exception as err:  # noqa: BLE001 - any DALI start-up failure
            if forced:
                raise
            logger.warning("DALI pipeline could not start (%s); using the torch DataLoader path", err)
            self.backend = "torch"

    # -- plan and state --------------------------------------------------------------------------------------
    def _plan(self, epoch: int):
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            if self.train:
                plan = TrainPlan(len(self.index), self.batch_size, self.k, self.shuffle_sites, self.seed, epoch,
                                 self.rank, self.world_size)
            else:
                plan = ValPlan(len(self.index), self.batch_size, self.shuffle_sites, self.rank, self.world_size)
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def __len__(self) -> int:
        return self._plan(self.epoch).steps

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self._batch = int(epoch), 0

    def _config(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "crops_per_image": self.k, "shuffle_sites": self.shuffle_sites, "crop_size": self.crop_size,
                "flips": self.flips, "train": self.train, "n_sites": len(self.index), "index": self.index.fingerprint()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self._batch, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._config()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r}, this loader has {value!r}; "
                                 "an exact resume needs the same index and loader settings")
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= self._batch <= len(self):
            raise ValueError(f"loader state batch {self._batch} is outside the epoch's {len(self)} batches")

    # -- iteration -------------------------------------------------------------------------------------------
    def _window_results(self, plan, windows):
        common = dict(crop=self.crop_size, seed=self.seed, dtype=self.dtype, flips=self.flips, center=not self.train)
        if self.backend == "dali":

            return dali_window_results(self.index, plan, windows, **common, device_id=self._dali_device_id(),
                                       num_threads=self.dali_threads, sites_per_run=min(self.shuffle_sites, 8))
        return torch_window_results(self.index, plan, windows, **common, num_workers=self.num_workers)

    def _record(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        key = (err.reason, err.well, err.file)
        if key not in self._reported:
            self._reported.add(key)
            self.summary.record(err)
            logger.warning("skipping: %s", err)

    def _assemble(self, window, results) -> tuple[list, CropInfo] | None:
        """The window's crops in slot order, as (array, row) references (failed sites' slots refilled in
        training, dropped in validation), and where each crop came from."""
        failed = {m for m, r in results.items() if r.error is not None}
        for m in sorted(failed):
            self._record(results[m].error)
        if len(failed) == len(results):
            if self.train:
                err = results[min(results)].error
                raise DataError(err.reason, f"every site of window {window.number} failed; nothing to refill its "
                                f"crops from (first: {err.detail})", err.well, err.file)
            return None
        views = {m: _host_view(r.crops) for m, r in results.items() if m not in failed}
        refs: list = []   # per slot: (crops array of the site, row) or None for a failed site
        rows: list = []   # per slot: (index position, y, x, hflip, vflip) or None
        for m, j in zip(window.slot_member.tolist(), window.slot_crop.tolist()):
            if m in failed:
                refs.append(None)
                rows.append(None)
                continue
            r = results[m]
            row = int(np.searchsorted(r.crop_ids, j))
            refs.append((views[m], row))
            rows.append((window.members[m], r.boxes.y[row], r.boxes.x[row], r.boxes.hflip[row], r.boxes.vflip[row]))
        bad_slots = [i for i, ref in enumerate(refs) if ref is None]
        if bad_slots:
            good_slots = [i for i, ref in enumerate(refs) if ref is not None]
            if self.train:  # refill from the good slots, in order, so the batch count stays fixed on every rank
                for t, i in enumerate(bad_slots):
                    k = good_slots[t % len(good_slots)]
                    refs[i], rows[i] = refs[k], rows[k]
                self.summary.replaced_crops += len(bad_slots)
            else:
                refs, rows = [refs[i] for i in good_slots], [rows[i] for i in good_slots]
        info = CropInfo(*(np.array(column) for column in zip(*rows)))
        return refs, info

    def _batch_buffer(self, n: int, like) -> tuple[torch.Tensor, object]:
        """An empty (n, C, crop, crop) batch (pinned when it goes to a GPU) and a writable view of it."""
        shape = (n,) + tuple(like.shape[1:])
        if isinstance(like, torch.Tensor):
            return torch.empty(shape, dtype=like.dtype, device=like.device), None
        dtype = torch.from_numpy(np.empty(0, like.dtype)).dtype
        tensor = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        return tensor, tensor.numpy()

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.device == self.device:
            return batch
        return batch.to(self.device, non_blocking=batch.is_pinned())

    def __iter__(self):
        plan = self._plan(self.epoch)
        windows = plan.windows_from(self._batch)
        carry: list = []
        carry_info: list[CropInfo] = []
        for window, results in self._window_results(plan, windows):
            assembled = self._assemble(window, results)
            if assembled is None:
                continue
            refs, info = assembled
            carry.extend(refs)
            carry_info.append(info)
            while len(carry) >= self.batch_size:
                yield self._emit(carry, carry_info, self.batch_size)
        if carry and not self.train:
            yield self._emit(carry, carry_info, len(carry))
        if self.train:
            self.epoch, self._batch = self.epoch + 1, 0
        else:
            self._batch = 0

    def _emit(self, carry: list, carry_info: list, n: int):
        """Copy the first n referenced crops of the carry into one batch (and count it as yielded)."""
        refs = carry[:n]
        del carry[:n]
        info = CropInfo.concat(carry_info) if len(carry_info) > 1 else carry_info[0]
        carry_info[:] = [info.take(slice(n, None))] if carry else []
        first = refs[0][0]
        batch, view = self._batch_buffer(n, first)
        if view is not None:  # host crops: numpy copies (torch.cat/stack of uint16 is ~10x slower on CPU)
            for i, (array, row) in enumerate(refs):
                view[i] = array[row]
        else:  # device crops (DALI mixed)
            torch.stack([array[row] for array, row in refs], out=batch)
        self._batch += 1
        batch = self._to_device(batch)
        return (batch, info.take(slice(0, n))) if self.return_info else batch


def _host_view(crops: torch.Tensor):
    """CPU crops as a numpy view (no copy); device crops stay tensors."""
    return crops.numpy() if crops.device.type == "cpu" else crops


def _auto_workers(num_workers: int | None) -> int:
    return min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)


def make_train_loader(
    index: SiteIndex,
    crop_size: int = 256,
    batch_size: int = 256,
    crops_per_image: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    backend: str = "auto",
    device="cpu",
    num_workers: int | None = None,
    shuffle_sites: int | None = None,
    on_error: str = "raise",
    flips: bool = True,
    return_info: bool = False,
    dali_threads: int | None = None,
) -> CropLoader:
    """Random crop_size² crops with random horizontal/vertical flips, k = crops_per_image per decoded site
    (default: the crops that fit, at most 16), shuffled across windows of `shuffle_sites` sites (default: enough
    for two batches), sharded over `world_size` ranks, deterministic in (seed, epoch). Yields (B, C, crop, crop)
    uint8/uint16 tensors on `device` (with a CropInfo when return_info=True). backend="auto" uses DALI with GPU
    decoding when `device` is CUDA, DALI is installed and the files are JPEG/JPEG 2000, else torch DataLoader
    workers (num_workers; 0 = main process); see resolve_backend."""
    k = crops_per_image if crops_per_image is not None else default_crops_per_image(index, crop_size)
    per_rank = max(1, len(index) // max(1, world_size))
    window = shuffle_sites if shuffle_sites is not None else max(2, min(per_rank, math.ceil(2 * batch_size / k)))
    return CropLoader(index, crop_size=crop_size, batch_size=batch_size, crops_per_image=k, shuffle_sites=window,
                      seed=seed, epoch=epoch, rank=rank, world_size=world_size, backend=backend, device=device,
                      num_workers=_auto_workers(num_workers), on_error=on_error, flips=flips, return_info=return_info,
                      train=True, dali_threads=dali_threads)


def make_val_loader(
    index: SiteIndex,
    crop_size: int = 256,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    backend: str = "auto",
    device="cpu",
    num_workers: int | None = None,
    on_error: str = "raise",
    return_info: bool = False,
    dali_threads: int | None = None,
) -> CropLoader:
    """One centre crop per site, sites rank, rank + world_size, ... in index order, no flips, last batch kept
    (possibly smaller). Sites that fail with on_error="skip" are left out and counted in `loader.summary`."""
    window = max(1, min(len(index), batch_size))
    return CropLoader(index, crop_size=crop_size, batch_size=batch_size, crops_per_image=1, shuffle_sites=window,
                      seed=0, epoch=0, rank=rank, world_size=world_size, backend=backend, device=device,
                      num_workers=_auto_workers(num_workers), on_error=on_error, flips=False, return_info=return_info,
                      train=False, dali_threads=dali_threads)
