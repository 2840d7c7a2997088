"""Training data: the selected site index, endless per-shard crop streams, the AdaBN single-plate streams, WSL labels
and the fixed validation batch."""
from __future__ import annotations

import glob
import math
import os

import numpy as np
import torch

from mae_fast.data.labels import PerturbationLabels
from mae_fast.data.errors import DataError
from mae_fast.training.config import DATA_FORMATS, ConfigError, DataConfig, RunPlan, TrainConfig


def _detect_format(root: str) -> str:
    if os.path.isdir(root):
        if os.path.exists(os.path.join(root, "pack.json")):
            return "pack"
        if not os.path.isdir(os.path.join(root, "images")) and glob.glob(os.path.join(root, "*.parquet")):
            return "rxrx3_core"
        return "rxrx"
    if root.endswith(".parquet") or any(ch in root for ch in "*?["):
        return "rxrx3_core"
    if root.endswith((".csv", ".csv.gz")):
        return "jump"
    return "rxrx"


def _channel_numbers(channels) -> list[int] | None:
    """RxRx channels given as numbers (1, "2", "w3"), refused with the value named when one is not."""
    if not channels:
        return None
    try:
        return [int(str(c).strip().lstrip("wW")) for c in channels]
    except ValueError:
        raise ConfigError(f"channels {', '.join(map(str, channels))}: RxRx channels are numbers like 1,2,3 (or "
                          "w1,w2,w3)") from None


def build_site_index(data: DataConfig):
    """The selected sites of the dataset; an empty selection is an error naming what exists."""
    from mae_fast.data.index import SiteIndex

    root = data.root
    if data.format not in DATA_FORMATS:
        raise ConfigError(f"data format (--format, data.format) is {data.format!r}; valid values: "
                          f"{', '.join(DATA_FORMATS)}")
    fmt = _detect_format(root) if data.format == "auto" else data.format
    if fmt in ("rxrx", "pack") and not os.path.exists(root):
        raise ConfigError(f"data.root {root!r} does not exist")
    if fmt == "rxrx":
        index = SiteIndex.from_rxrx(root, data.metadata, _channel_numbers(data.channels), on_error=data.on_error)
    elif fmt == "rxrx3_core":
        channels = _channel_numbers(data.channels)
        index = SiteIndex.from_rxrx3_core(root, data.metadata, channels, on_error=data.on_error)
    elif fmt == "jump":
        index = SiteIndex.from_jump(root, data.channels, root=data.images_root, on_error=data.on_error)
    else:
        index = SiteIndex.from_pack(root)
    if len(index) == 0:
        skipped = f" ({index.summary})" if index.summary else ""
        raise ConfigError(f"the dataset at {root!r} ({fmt}) has no sites{skipped}")
    selected = index.select(experiment=data.experiments, plate=data.plates, perturbation=data.perturbations,
                            well=data.wells)
    if len(selected) == 0:
        chosen = {k: v for k, v in (("experiments", data.experiments), ("plates", data.plates),
                                    ("perturbations", data.perturbations), ("wells", data.wells)) if v}
        experiments = sorted({s.experiment for s in index})
        plates = sorted({s.plate for s in index})
        raise ConfigError(f"the selection {chosen} matches no site of {root!r}; it has experiments "
                          f"{experiments[:20]} and plates {plates[:20]}")
    return selected


class ShardStream:
    """Endless batches of one data shard's crop loader, epoch after epoch (with return_info: (batch, CropInfo))."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None

    def next(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:  # the loader moved itself to the next epoch
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:  # a whole epoch without one batch: every site of the shard failed or is too small
            raise DataError("too_small", "a data shard yields no batch: every one of its sites was skipped "
                            f"({getattr(self.loader, 'summary', 'no site')})") from None

    def close(self) -> None:
        """End the live iterator (and its DataLoader workers); the loader's state keeps the position."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def make_shard_streams(index, cfg: TrainConfig, plan: RunPlan, rank: int, device: torch.device,
                       return_info: bool = False) -> dict[int, ShardStream]:
    from mae_fast.data.loader import make_train_loader

    streams = {}
    for s in plan.local_shards(rank):
        try:
            loader = make_train_loader(
                index, crop_size=plan.model_cfg.img_size, batch_size=cfg.micro_batch,
                crops_per_image=cfg.data.crops_per_image, seed=cfg.seed, rank=s, world_size=plan.shards,
                backend=cfg.data.backend, device=device, num_workers=cfg.data.num_workers,
                shuffle_sites=cfg.data.shuffle_sites, on_error=cfg.data.on_error, return_info=return_info)
        except ValueError as err:
            raise ConfigError(f"data shard {s} of {plan.shards}: {err}") from err
        streams[s] = ShardStream(loader)
    return streams


def plate_key(site) -> tuple[str, str]:
    return (site.experiment, site.plate)


class PlateShardStream:
    """One data shard of an AdaBN run: endless (batch, CropInfo) micro-batches, each from a single plate.

    One crop loader per plate (over that plate's sites, sharded like the plain loader: rank s of S); a
    PlateBatchSampler over the same plates' crops (rank s of S, seeded per epoch) gives the plate of each next
    micro-batch -- plates in proportion to their crops, interleaved in a seeded order. CropInfo.site_index is
    mapped back to positions in the full index (labels are looked up there).

    Only `max_open` plate loaders keep a live iterator (and DataLoader workers); a plate whose iterator was closed
    continues exactly where it stopped (the loader counts yielded batches). Plate loaders default to windows of
    ceil(micro_batch / crops_per_image) sites, so a window is one micro-batch and reopening decodes nothing twice.
    State: sampler epoch and position + every plate loader's state."""

    max_open = 2

    def __init__(self, sampler, loaders: dict, positions: dict):
        self.sampler = sampler
        self.streams = {key: ShardStream(loader) for key, loader in loaders.items()}
        self.positions = positions             # plate key -> (n_plate_sites,) positions in the full index
        self.epoch, self.position = sampler.epoch, 0
        self._order: tuple[int, list] | None = None
        self._open: list = []                  # plate keys with a live iterator, least recently used first

    def plates_of_epoch(self) -> list:
        """The plate key of every micro-batch of the current sampler epoch, in order."""
        if self._order is None or self._order[0] != self.epoch:
            self.sampler.set_epoch(self.epoch)
            self._order = (self.epoch, [self.sampler.plate_of(batch) for batch in self.sampler])
        return self._order[1]

    def _touch(self, key) -> None:
        if key in self._open:
            self._open.remove(key)
        self._open.append(key)
        while len(self._open) > self.max_open:
            self.streams[self._open.pop(0)].close()

    def next(self):
        from mae_fast.data.loader import CropInfo

        order = self.plates_of_epoch()
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = self.plates_of_epoch()
        key = order[self.position]
        self.position += 1
        self._touch(key)
        images, info = self.streams[key].next()
        site_index = self.positions[key][info.site_index]
        return images, CropInfo(site_index, info.y, info.x, info.hflip, info.vflip)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.sampler.batch_size,
                "plates": [[key[0], key[1], stream.state_dict()] for key, stream in self.streams.items()]}

    def load_state_dict(self, state: dict) -> None:
        saved = [(e, p) for e, p, _ in state["plates"]]
        if saved != list(self.streams) or state["batch_size"] != self.sampler.batch_size:
            raise ValueError(f"the AdaBN loader state was saved for plates {saved[:5]}{'...' if len(saved) > 5 else ''}"
                             f" (batch {state['batch_size']}), this run has {list(self.streams)[:5]} (batch "
                             f"{self.sampler.batch_size}); an exact resume needs the same data")
        for e, p, loader_state in state["plates"]:
            self.streams[(e, p)].load_state_dict(loader_state)
        self.epoch, self.position, self._order, self._open = int(state["epoch"]), int(state["position"]), None, []


def make_plate_streams(index, cfg: TrainConfig, plan: RunPlan, rank: int, device: torch.device,
                       log=None) -> dict[int, PlateShardStream]:
    """The AdaBN data shards (see PlateShardStream). Plates with fewer than micro_batch crops per data shard and
    epoch cannot give a single-plate micro-batch: they are left out (reported through `log`)."""
    from mae_fast.data.loader import default_crops_per_image, make_train_loader
    from mae_fast.data.samplers import PlateBatchSampler

    crop, B, S = plan.model_cfg.img_size, cfg.micro_batch, plan.shards
    k = cfg.data.crops_per_image or default_crops_per_image(index, crop)
    window = cfg.data.shuffle_sites or math.ceil(B / k)
    members: dict[tuple, list[int]] = {}
    for i, site in enumerate(index):
        members.setdefault(plate_key(site), []).append(i)
    usable = {key: m for key, m in members.items() if (len(m) // S) * k >= B}
    left_out = sorted(set(members) - set(usable))
    if not usable:
        largest = max(len(m) for m in members.values())
        raise ConfigError(
            f"AdaBN training needs single-plate micro-batches of {B} crops, but no plate has that many per data shard "
            f"({len(members)} plate(s), largest {largest} sites x {k} crops per site / {S} shard(s)); lower "
            "micro_batch or raise data.crops_per_image")
    if left_out and log is not None:
        log(f"AdaBN: {len(left_out)} plate(s) have fewer than micro_batch={B} crops per data shard and are not "
            f"trained on (first: {left_out[0][0]}/Plate{left_out[0][1]})")
    sub_index = index.select(where=lambda s: plate_key(s) in usable)
    plate_index = {key: _sites_at(index, m) for key, m in usable.items()}
    streams = {}
    for s in plan.local_shards(rank):
        try:
            sampler = PlateBatchSampler.from_index(sub_index, B, repeat=k, train=True, seed=cfg.seed, rank=s,
                                                   world_size=S)
            loaders = {key: make_train_loader(
                plate_index[key], crop_size=crop, batch_size=B, crops_per_image=k, seed=cfg.seed, rank=s,
                world_size=S, backend=cfg.data.backend, device=device, num_workers=cfg.data.num_workers,
                shuffle_sites=window, on_error=cfg.data.on_error, return_info=True) for key in usable}
        except ValueError as err:
            raise ConfigError(f"data shard {s} of {S} (AdaBN, one plate per micro-batch): {err}") from err
        positions = {key: np.asarray(m, dtype=np.int64) for key, m in usable.items()}
        streams[s] = PlateShardStream(sampler, loaders, positions)
    return streams


def _sites_at(index, positions: list[int]):
    """The sub-index of the sites at sorted `positions` (a plate's sites are usually one run of the sorted index)."""
    if positions[-1] - positions[0] + 1 == len(positions):
        return index[positions[0]:positions[-1] + 1]
    wanted = {index[i].key for i in positions}
    return index.select(where=lambda s: s.key in wanted)


def wsl_labels(index, classes=None):
    """The labelled sites of `index` and their PerturbationLabels (classes: a checkpoint's, on resume)."""
    labelled = index.select(where=lambda s: s.perturbation is not None)
    if len(labelled) == 0:
        raise ConfigError(f"the WSL baseline trains on perturbation labels, but none of the {len(index)} selected "
                          "sites has one (metadata gene / treatment / sirna)")
    try:
        labels = PerturbationLabels.from_index(labelled, classes=classes)
    except ValueError as err:
        raise ConfigError(f"WSL labels: {err}") from err
    if len(labels) < 2:
        raise ConfigError(f"the WSL classifier needs at least 2 perturbation classes; the selected sites have "
                          f"{len(labels)} ({', '.join(labels.classes)})")
    return labelled, labels


def validation_batch(index, cfg: TrainConfig, plan: RunPlan, device: torch.device) -> torch.Tensor:
    """The fixed batch for reconstruction figures: centre crops of the first `val_crops` sites."""
    from mae_fast.data.loader import make_val_loader

    # over the whole index, decoded lazily: the first `val_crops` sites that yield a crop (the first ones, unless
    # some are bad or smaller than the crop)
    loader = make_val_loader(index, crop_size=plan.model_cfg.img_size, batch_size=cfg.val_crops, device=device,
                             num_workers=0, backend="torch", on_error="skip")
    for batch in loader:
        return batch
    size = plan.model_cfg.img_size
    raise DataError("too_small", f"none of the {len(index)} selected sites yields a {size}x{size} crop "
                    f"({loader.summary}); choose a smaller model.img_size or other data")
