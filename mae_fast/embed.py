"""`mae-fast embed`: embed every site of a screen and write per-well (and per-site) tables.

    mae-fast embed --checkpoint runs/s16/model --data /data/rxrx3 --out emb/embeddings.parquet
    mae-fast embed --checkpoint openphenom/ --data screen/ --out emb.parquet --per-channel
    mae-fast embed --checkpoint vit_s16.safetensors --preset mae_vit_small_patch16_256 --data screen/ --out emb.parquet
    torchrun --nproc_per_node 8 -m mae_fast.cli embed ...       # plates shared out over the ranks

Models: our checkpoints (a `save_model` folder, a training run folder, or a single weights file with --preset), an
OpenPhenom checkpoint (folder or file), or a timm state dict of the encoder (with --preset for the architecture).
The CNN baselines (`mae_fast.models.wsl`, `munet`) embed the same way: WSL DenseNet -> its 128-d neck output, MU-Net -> the
global average of its bottleneck.

AdaBN models (WSL with ghost batch norm) normalise each forward pass with that batch's own statistics, so their
batches must come from one plate and should not be the tiles of one well (whose statistics would remove the
well's own phenotype). Per plate, the sites are taken in a seeded order (`seed`) in windows of about
`adabn_window` tiles (default 8 x batch_size, at least 2 sites a window); a window's tiles are shuffled (seeded)
and cut into near-equal batches of at most batch_size and at least 2 tiles. The result is deterministic in
(seed, adabn_window, batch_size), which the parts' manifest records.

Every site is cut into non-overlapping tiles of the model's crop size (`mae_fast.data.tiling`); each tile is
embedded without masking (mean of the patch tokens; bf16 autocast on GPU, fp32 on CPU); a site's embedding is the
mean of its tiles, a well's the mean of all its tiles (= the mean of its sites when they have the same tile count).

Output: `OUT` (parquet, one row per well): the metadata columns (RxRx3 schema: well_id, experiment_name, plate,
address, gene, treatment, SMILES, concentration, perturbation_type, cell_type -- as far as the metadata has them,
then the dataset's other metadata columns), perturbation, n_sites, n_tiles, then feature_0 .. feature_{D-1}
(float32). With --per-channel (CA-MAE models) the features are the per-channel embeddings, feature index
c * D + i for channel c, dimension i. With --sites also `OUT_STEM_sites.parquet`, one row per site.

Resuming: work is done plate by plate; each finished plate is one part file in `OUT_STEM_parts/`, written
atomically, and a rerun skips the plates that have one (a manifest guards against mixing settings). When every
plate is done the parts are merged into OUT. An existing OUT is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from mae_fast.models import get_baseline_config, is_baseline
from mae_fast.checkpoint import CheckpointError
from mae_fast.io import atomic_write, atomic_write_json, remove_temporaries
from mae_fast.cli import number, run_command
from mae_fast.models import get_config
from mae_fast.io import OutputLock, beside_lock_path
from mae_fast.train import (
    ConfigError, DataConfig, DistInfo, agree, all_gather_objects, barrier, build_site_index, env_world,
    init_distributed, load_pretrained, resolve_amp, resolve_device, torch_threads,
)

RXRX3_COLUMNS = ("well_id", "experiment_name", "plate", "address", "gene", "treatment", "SMILES", "concentration",
                 "perturbation_type", "cell_type")
SITE_ONLY_COLUMNS = ("site", "site_id")  # per-site metadata keys left out of well rows
MANIFEST = "manifest.json"
PART_META_KEY = b"mae_fast_embed"


@dataclass
class EmbedConfig:
    checkpoint: str = ""
    out: str = "embeddings.parquet"
    data: DataConfig = field(default_factory=DataConfig)
    preset: str | None = None            # architecture of a single weights file (timm state dict, or a baseline's)
    model: dict = field(default_factory=dict)  # config overrides for --preset (e.g. img_size)
    edge: str = "drop"                   # tiles at the image border: drop, center, pad, error (see tiling.py)
    batch_size: int = 64                 # tiles per forward pass
    device: str = "auto"
    amp: str = "auto"                    # auto (bf16 on GPU, fp32 on CPU), bf16, fp32
    per_channel: bool = False            # CA-MAE: per-channel embeddings (C * D features)
    sites: bool = False                  # also write the per-site table
    overwrite: bool = False
    progress: bool = True
    threads: int = 0
    seed: int = 0                        # AdaBN models: order of the sites and tiles that share a batch
    adabn_window: int = 0                # AdaBN models: tiles shuffled together (0: 8 x batch_size)


@dataclass
class EmbedResult:
    out: str                             # the per-well table
    sites_path: str | None               # the per-site table (--sites)
    parts_dir: str
    n_wells: int
    n_sites: int
    n_tiles: int                         # tiles embedded in this call (this rank)
    dims: int
    seconds: float
    tiles_per_second: float
    plates_done: list[str]               # plates embedded in this call (this rank)
    plates_skipped: list[str]            # plates found finished from an earlier run
    skipped_sites: dict                  # ErrorSummary.to_dict() of the sites left out (on_error="skip")


def output_paths(out: str) -> tuple[str, str, str]:
    """(well table, site table, parts folder) for OUT."""
    stem = out[:-len(".parquet")] if out.endswith(".parquet") else out
    return out, stem + "_sites.parquet", stem + "_parts"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def plate_part_name(experiment: str, plate: str) -> str:
    digest = hashlib.blake2b(f"{experiment}\x1f{plate}".encode(), digest_size=4).hexdigest()
    return f"{_safe(experiment)}__Plate{_safe(plate)}__{digest}.parquet"


def assign_plates(plates: list[tuple[str, str]], sizes: list[int], world_size: int) -> list[list[int]]:
    """Plates (by position) per rank: largest first to the least-loaded rank (deterministic)."""
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(plates)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owned[r].append(i)
        load[r] += sizes[i]
    return [sorted(o) for o in owned]


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------

# config keys that do not change what a model computes at inference (a --preset may differ from a checkpoint in them)
TRAINING_ONLY_KEYS = {
    "drop_path", "lr", "weight_decay", "betas", "grad_checkpointing",                        # MAE
    "num_classes", "label_smoothing", "virtual_batch_size", "bn_momentum", "optimizer", "lr_batch", "momentum",
    "nesterov", "schedule", "mask_ratio", "mask_patch",                                        # baselines
}


def preset_config(preset: str, overrides: dict):
    """The architecture of `preset` (an MAE or a baseline) with overrides; errors as ConfigError."""
    try:
        if is_baseline(preset):
            return get_baseline_config(preset, **overrides)
        return get_config(preset, **overrides)
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(str(err).strip('"')) from err


def load_embedding_model(cfg: EmbedConfig) -> tuple[torch.nn.Module, str]:
    arch = None
    if cfg.preset:
        arch = preset_config(cfg.preset, cfg.model)
    elif cfg.model:
        raise ConfigError("model overrides need --preset (they describe the architecture of a weights file)")
    model, kind = load_pretrained(cfg.checkpoint, arch)
    if arch is not None and kind != "timm" and model.cfg.to_dict() != arch.to_dict():
        saved = model.cfg.to_dict()
        diffs = sorted(set(k for k, v in arch.to_dict().items() if saved.get(k) != v and k != "name")
                       | (set(saved) ^ set(arch.to_dict())))
        if any(k not in TRAINING_ONLY_KEYS for k in diffs):
            raise CheckpointError(f"{cfg.checkpoint} holds a {model.cfg.name} model that differs from --preset "
                                  f"{cfg.preset} in {diffs}")
    return model, kind


def is_adabn(model: torch.nn.Module) -> bool:
    """Batch statistics at inference: batches must be of one plate (see the module doc)."""
    return bool(getattr(model.cfg, "adabn", False))


def _check_channels(model: torch.nn.Module, index, per_channel: bool) -> None:
    m = model.cfg
    C = len(index.channels)
    channel_agnostic = getattr(m, "channel_agnostic", False)
    if per_channel and not channel_agnostic:
        kind = "a standard MAE" if not hasattr(m, "family") else f"the {m.family.upper()} baseline {m.name}"
        raise ConfigError(f"--per-channel needs a channel-agnostic (CA-MAE) model; this one is {kind}")
    if channel_agnostic:
        if not 1 <= C <= m.max_in_chans:
            raise ConfigError(f"the CA-MAE model takes 1..{m.max_in_chans} channels, the dataset has {C}")
    elif C != m.in_chans:
        raise ConfigError(f"the model expects {m.in_chans} channels, the dataset has {C} "
                          f"({', '.join(index.channels)}); choose channels with --channels")


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------

def _metadata_row(site, well_level: bool) -> dict:
    """RxRx3 columns first (as far as present), the keys every table needs, then the other metadata."""
    meta = dict(site.metadata)
    row = {k: meta[k] for k in RXRX3_COLUMNS if k in meta}
    row.setdefault("well_id", site.well_id)
    row.setdefault("experiment_name", site.experiment)
    row.setdefault("plate", int(site.plate) if str(site.plate).isdigit() else site.plate)
    row.setdefault("address", site.address)
    row["perturbation"] = site.perturbation
    for k, v in meta.items():
        if k not in row and not (well_level and k in SITE_ONLY_COLUMNS):
            row[k] = v
    if not well_level:
        row["site"] = site.site
    return row


def plate_table(sites, sums: dict, counts: dict, dims: int):
    """One plate's rows: a `level` column ("well"/"site"), metadata, n_sites, n_tiles, features."""
    import pandas as pd

    rows, feats = [], []
    wells: dict[str, list] = {}
    for site in sites:
        key = (site.well_id, site.site)
        if counts.get(key, 0) == 0:
            continue
        wells.setdefault(site.well_id, []).append(site)
        rows.append({"level": "site", **_metadata_row(site, False), "n_sites": 1, "n_tiles": counts[key]})
        feats.append(sums[key] / counts[key])
    for well_id, members in wells.items():
        total = sum(sums[(s.well_id, s.site)] for s in members)
        n = sum(counts[(s.well_id, s.site)] for s in members)
        rows.append({"level": "well", **_metadata_row(members[0], True), "n_sites": len(members), "n_tiles": n})
        feats.append(total / n)
    meta = pd.DataFrame(rows)
    features = np.asarray(feats, dtype=np.float32).reshape(len(rows), dims)
    frame = pd.DataFrame(features, columns=[f"feature_{i}" for i in range(dims)])
    return pd.concat([meta.reset_index(drop=True), frame], axis=1)


def _numeric_metadata(frame):
    """Object columns holding only numbers and missing values (e.g. an empty `concentration`) become float."""
    import pandas as pd

    for column in frame.columns:
        if frame[column].dtype == object:
            values = frame[column].dropna()
            if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
                if column == "concentration" or len(values):
                    frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(np.float64)
    return frame


def write_parquet(frame, path: str, extra_meta: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if extra_meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               PART_META_KEY: json.dumps(extra_meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def merge_parts(parts_dir: str, part_names: list[str], out: str, sites_path: str | None):
    """Concatenate the plates' parts (in plate order) into the well table (and the site table)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from mae_fast.data.errors import ErrorSummary, SkippedItem

    frames, summary = [], ErrorSummary()
    for name in part_names:
        path = os.path.join(parts_dir, name)
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(PART_META_KEY, b"{}"))
        skipped = meta.get("skipped") or {}
        summary.counts.update(skipped.get("counts", {}))
        summary.skipped.extend(SkippedItem(**s) for s in skipped.get("skipped", []))
        frames.append(table.to_pandas())
    frames = [f for f in frames if len(f)]
    if not frames:
        raise ConfigError(f"no site could be embedded ({summary})")
    everything = _numeric_metadata(pd.concat(frames, ignore_index=True))
    features = [c for c in everything.columns if c.startswith("feature_")]
    wells = everything[everything["level"] == "well"].drop(columns=["level", "site"], errors="ignore")
    wells = wells.reset_index(drop=True)
    wells[features] = wells[features].astype(np.float32)
    write_parquet(wells[[c for c in wells.columns if c not in features] + features], out)
    if sites_path:
        sites = everything[everything["level"] == "site"].drop(columns=["level"]).reset_index(drop=True)
        sites[features] = sites[features].astype(np.float32)
        write_parquet(sites[[c for c in sites.columns if c not in features] + features], sites_path)
    return len(wells), int((everything["level"] == "site").sum()), summary


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------

def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every weight's bytes: parts embedded by other weights (a retrained checkpoint) are not mixed in."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)  # 0-d: BN counters
    return h.hexdigest()


def _manifest(cfg: EmbedConfig, model: torch.nn.Module, index, amp) -> dict:
    manifest = {"checkpoint": os.path.abspath(cfg.checkpoint), "weights": weights_fingerprint(model),
                "model": model.cfg.to_dict(), "tile": model.cfg.img_size, "edge": cfg.edge,
                "per_channel": cfg.per_channel, "amp": "bf16" if amp else "fp32", "index": index.fingerprint(),
                "n_sites": len(index)}
    if is_adabn(model):  # the batches' composition changes the embeddings
        manifest["adabn_batches"] = {"seed": cfg.seed, "window_tiles": adabn_window_tiles(cfg),
                                     "batch_size": cfg.batch_size}
    return manifest


def _prepare(cfg: EmbedConfig, info: DistInfo):
    """Every check before work: output, model, data, channels, an earlier run's manifest."""
    out, sites_path, parts_dir = output_paths(cfg.out)
    if not cfg.checkpoint:
        raise ConfigError("give the model: --checkpoint PATH")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.adabn_window < 0:
        raise ConfigError(f"adabn_window must be >= 0 (0: 8 x batch_size), got {cfg.adabn_window}")
    from mae_fast.data.tiling import EDGES

    if cfg.edge not in EDGES:
        raise ConfigError(f"edge is {cfg.edge!r}; valid values: {', '.join(EDGES)}")
    wanted = [p for p in (out, sites_path if cfg.sites else None) if p]
    existing = [p for p in wanted if os.path.exists(p)]
    manifest_path = os.path.join(parts_dir, MANIFEST)
    if existing and not cfg.overwrite and (len(existing) == len(wanted) or not os.path.exists(manifest_path)):
        raise ConfigError(f"output {existing[0]} exists; pass --overwrite to replace it")
    # some but not all tables exist beside their parts (a run killed between its table writes): a rerun with the
    # same settings (the manifest check below) merges the parts again and writes the missing table
    device = resolve_device(cfg.device, info.local_rank)
    amp = resolve_amp(cfg.amp, device)
    model, kind = load_embedding_model(cfg)
    if is_adabn(model) and cfg.batch_size < 2:
        raise ConfigError(f"{model.cfg.name} normalises with batch statistics (AdaBN): batch_size must be >= 2, got "
                          f"{cfg.batch_size}")
    index = build_site_index(cfg.data)
    _check_channels(model, index, cfg.per_channel)
    manifest = _manifest(cfg, model, index, amp)
    if not cfg.overwrite and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            saved = json.load(f)
        diffs = [f"{k} (saved {saved.get(k)!r}, now {v!r})" for k, v in manifest.items() if saved.get(k) != v]
        if diffs:
            raise ConfigError(f"{parts_dir} holds parts of a run with other settings: {'; '.join(diffs)}; "
                              "pass --overwrite to start again")
    return device, amp, model, kind, index, manifest


def embed(cfg: EmbedConfig) -> EmbedResult:
    """Embed the configured dataset; under torchrun every rank calls this (plates are shared out)."""
    info = env_world()
    device = resolve_device(cfg.device, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(info, device)
    lock = None
    try:  # one writer per output (table, site table, parts): rank 0 holds the lock from before any check
        lock = agree(lambda: OutputLock(beside_lock_path(cfg.out), f"embedding output {cfg.out}")
                     if info.is_main else None, info)
        with torch_threads(cfg.threads):
            return _embed(cfg, info)
    finally:
        if lock is not None:
            lock.release()
        if info.created_group and dist.is_initialized():
            dist.destroy_process_group()


def _embed(cfg: EmbedConfig, info: DistInfo) -> EmbedResult:
    from tqdm import tqdm

    from mae_fast.data.errors import ErrorSummary
    from mae_fast.data.tiling import iter_tiles

    out, sites_path, parts_dir = output_paths(cfg.out)
    device, amp, model, kind, index, manifest = agree(lambda: _prepare(cfg, info), info)
    if info.is_main:
        if cfg.overwrite:
            for path in (out, sites_path):
                if os.path.exists(path):
                    os.remove(path)
            shutil.rmtree(parts_dir, ignore_errors=True)
        leftovers = (remove_temporaries(parts_dir)  # of killed runs; this run holds the output's lock
                     + remove_temporaries(os.path.dirname(os.path.abspath(out)),
                                          (os.path.basename(out), os.path.basename(sites_path))))
        if leftovers:
            print(f"removed {len(leftovers)} temporary file(s) of an interrupted run: "
                  + ", ".join(os.path.basename(p) for p in leftovers), flush=True)
        os.makedirs(parts_dir, exist_ok=True)
        if not os.path.exists(os.path.join(parts_dir, MANIFEST)):
            atomic_write_json(os.path.join(parts_dir, MANIFEST), manifest, indent=1)
    barrier(info)

    model = model.to(device).eval()
    dims = model.cfg.embed_dim * (len(index.channels) if cfg.per_channel else 1)
    plates: list[tuple[str, str]] = []
    for s in index:
        if not plates or plates[-1] != (s.experiment, s.plate):
            if (s.experiment, s.plate) not in plates:
                plates.append((s.experiment, s.plate))
    by_plate = {p: index.select(where=lambda s, p=p: (s.experiment, s.plate) == p) for p in plates}
    names = [plate_part_name(*p) for p in plates]
    mine = assign_plates(plates, [len(by_plate[p]) for p in plates], info.world_size)[info.rank]
    done_before = [i for i in mine if os.path.exists(os.path.join(parts_dir, names[i]))]
    todo = [i for i in mine if i not in done_before]
    label = [f"{e}/Plate{p}" for e, p in plates]
    if info.is_main:
        print(f"embedding {len(index)} sites on {len(plates)} plate(s) with {model.cfg.name} ({kind}, "
              f"{model.cfg.img_size}px tiles, {dims} features, {device.type} {'bf16' if amp else 'fp32'})"
              + (f"; {len(done_before)} plate(s) already done" if done_before else "") + f" -> {out}", flush=True)

    bar = tqdm(total=sum(len(by_plate[plates[i]]) for i in todo), desc="embed", unit="site", dynamic_ncols=True,
               disable=not cfg.progress or not info.is_main)
    n_tiles, t0 = 0, time.perf_counter()
    summary = ErrorSummary()
    autocast = torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)
    for i in todo:
        sub = by_plate[plates[i]]
        if is_adabn(model):
            tiles_it = AdaBNPlateTiles(sub, label[i], model.cfg.img_size, cfg, device)
        else:
            tiles_it = iter_tiles(sub, tile=model.cfg.img_size, batch_size=cfg.batch_size, edge=cfg.edge,
                                  on_error=cfg.data.on_error, num_workers=_workers(cfg.data.num_workers),
                                  device=device, backend=cfg.data.backend)
        sums: dict[tuple, np.ndarray] = {}
        counts: dict[tuple, int] = {}
        for tiles, keys in tiles_it:
            with torch.no_grad(), autocast:
                z = model.embed(tiles, per_channel=cfg.per_channel)  # (B, dims)
            z = z.float().cpu().numpy().astype(np.float64)
            new_sites = 0
            for (well, site, _), row in zip(keys, z):
                key = (well, site)
                if key in sums:
                    sums[key] += row
                    counts[key] += 1
                else:
                    sums[key], counts[key] = row.copy(), 1
                    new_sites += 1
            n_tiles += len(keys)
            bar.update(new_sites)
            bar.set_postfix(crops_s=f"{n_tiles / max(time.perf_counter() - t0, 1e-9):.1f}", refresh=False)
        summary.merge(tiles_it.summary)
        frame = plate_table(sub, sums, counts, dims)
        write_parquet(frame, os.path.join(parts_dir, names[i]),
                      {"plate": label[i], "skipped": tiles_it.summary.to_dict(), "n_tiles": int(sum(counts.values()))})
    bar.close()
    seconds = time.perf_counter() - t0
    barrier(info)

    n_wells = n_sites = 0
    merged_summary: dict = summary.to_dict()
    if info.is_main:
        missing = [label[i] for i, n in enumerate(names) if not os.path.exists(os.path.join(parts_dir, n))]
        if missing:
            raise RuntimeError(f"plates {missing} have no part file in {parts_dir}; rerun to finish them")
        n_wells, n_sites, merged = merge_parts(parts_dir, names, out, sites_path if cfg.sites else None)
        merged_summary = merged.to_dict()
        rate = n_tiles / seconds if seconds > 0 else 0.0
        print(f"{n_wells} wells, {n_sites} sites, {dims} features -> {out} ({n_tiles} tiles in {seconds:.1f} s, "
              f"{rate:.1f} crops/s)" + (f"; {merged}" if merged else ""), flush=True)
    counts_all = all_gather_objects((n_wells, n_sites, merged_summary), info)[0]
    barrier(info)
    return EmbedResult(
        out=out, sites_path=sites_path if cfg.sites else None, parts_dir=parts_dir, n_wells=counts_all[0],
        n_sites=counts_all[1], n_tiles=n_tiles, dims=dims, seconds=seconds,
        tiles_per_second=n_tiles / seconds if seconds > 0 else 0.0,
        plates_done=[label[i] for i in todo], plates_skipped=[label[i] for i in done_before],
        skipped_sites=counts_all[2],
    )


def _workers(n: int | None) -> int:
    return min(4, os.cpu_count() or 1) if n is None else int(n)


# ------------------------------------------------------------------------------------------------------------
# AdaBN batches: one plate, tiles of several sites, seeded
# ------------------------------------------------------------------------------------------------------------

_ADABN_SITE_ORDER, _ADABN_TILE_ORDER = 21, 22  # stream tags: independent generators per purpose


def adabn_window_tiles(cfg: EmbedConfig) -> int:
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

    def __init__(self, sites, plate_label: str, tile: int, cfg: EmbedConfig, device):
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
                        num_workers=_workers(cfg.data.num_workers), device=self.device, backend=cfg.data.backend)
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


def embed_dataset(checkpoint: str, data_root: str, out: str, *, preset: str | None = None, model: dict | None = None,
                  metadata: str | None = None, data_format: str = "auto", channels=None, experiments=None,
                  plates=None, perturbations=None, edge: str = "drop", batch_size: int = 64, device: str = "auto",
                  amp: str = "auto", per_channel: bool = False, sites: bool = False, num_workers: int | None = None,
                  backend: str = "auto", on_error: str = "raise", overwrite: bool = False, progress: bool = True,
                  threads: int = 0, seed: int = 0, adabn_window: int = 0) -> EmbedResult:
    """Python API of `mae-fast embed` (see the module doc)."""
    data = DataConfig(root=data_root, format=data_format, metadata=metadata,
                      channels=[str(c) for c in channels] if channels else None,
                      experiments=_strings(experiments), plates=_strings(plates), perturbations=_strings(perturbations),
                      num_workers=num_workers, backend=backend, on_error=on_error)
    return embed(EmbedConfig(checkpoint=checkpoint, out=out, data=data, preset=preset, model=dict(model or {}),
                             edge=edge, batch_size=batch_size, device=device, amp=amp, per_channel=per_channel,
                             sites=sites, overwrite=overwrite, progress=progress, threads=threads, seed=seed,
                             adabn_window=adabn_window))


def _strings(values):
    if values is None:
        return None
    if isinstance(values, (str, int)):
        values = [values]
    return [str(v) for v in values]


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def _csv(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="our checkpoint folder / training run folder, an OpenPhenom folder or file, or a timm state "
                        "dict file (with --preset)")
    p.add_argument("--preset", help="architecture of a single weights file (timm state dict, or a baseline's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="architecture overrides for --preset, e.g. model.img_size=128")
    p.add_argument("--data", required=True, help="dataset root (RxRx folder, RxRx3-core parquet, JUMP table, pack)")
    p.add_argument("--format", default="auto", help="auto, rxrx, rxrx3_core, jump, pack")
    p.add_argument("--metadata", help="metadata CSV (default ROOT/metadata.csv)")
    p.add_argument("--channels", type=_csv, help="comma list: RxRx channel numbers or JUMP channel names")
    p.add_argument("--experiments", type=_csv, help="comma list of experiments to embed")
    p.add_argument("--plates", type=_csv, help="comma list of plates to embed")
    p.add_argument("--out", required=True, help="well table (parquet)")
    p.add_argument("--sites", action="store_true", help="also write OUT_STEM_sites.parquet (one row per site)")
    p.add_argument("--per-channel", action="store_true", help="CA-MAE: per-channel embeddings")
    p.add_argument("--batch-size", type=number(int, minimum=1), default=64, help="tiles per forward pass (default 64)")
    p.add_argument("--edge", default="drop", help="tiles at the border: drop, center, pad, error")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--amp", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    p.add_argument("--num-workers", type=number(int, minimum=0), default=None, help="decode workers (default min(4, cores))")
    p.add_argument("--backend", default="auto", help="image decoding: auto, torch, dali")
    p.add_argument("--on-error", default="raise", choices=("raise", "skip"), help="bad sites: stop, or skip and count")
    p.add_argument("--threads", type=number(int, minimum=0), default=0, help="torch CPU threads (0: default)")
    p.add_argument("--seed", type=int, default=0, help="AdaBN models: seed of which tiles share a batch (default 0)")
    p.add_argument("--adabn-window", type=number(int, minimum=0), default=0,
                   help="AdaBN models: tiles of one plate shuffled together into batches (default 8 x batch size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and its parts)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> EmbedConfig:
    from mae_fast.train import _coerce, _model_fields, parse_override

    model = {}
    fields = _model_fields(args.preset)
    for text in args.overrides:
        key, value = parse_override(text)
        name = key[len("model."):] if key.startswith("model.") else key
        if name not in fields:
            raise ConfigError(f"unknown model key {key!r}; valid keys: {', '.join('model.' + k for k in fields)}")
        model[name] = _coerce(value, fields[name], key)
    data = DataConfig(root=args.data, format=args.format, metadata=args.metadata, channels=args.channels,
                      experiments=args.experiments, plates=args.plates, num_workers=args.num_workers,
                      backend=args.backend, on_error=args.on_error)
    return EmbedConfig(checkpoint=args.checkpoint, out=args.out, data=data, preset=args.preset, model=model,
                       edge=args.edge, batch_size=args.batch_size, device=args.device, amp=args.amp,
                       per_channel=args.per_channel, sites=args.sites, overwrite=args.overwrite,
                       progress=not args.no_progress, threads=args.threads, seed=args.seed,
                       adabn_window=args.adabn_window)


def run(args) -> int:
    result = embed(config_from_args(args))  # errors: the CLI's one handler (mae_fast.cli.run_command)
    if env_world().is_main:
        print(f"embeddings:  {result.out}")
        if result.sites_path:
            print(f"sites:       {result.sites_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae-fast embed", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv), "mae-fast embed")


if __name__ == "__main__":
    sys.exit(main())
