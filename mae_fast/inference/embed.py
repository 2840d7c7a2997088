"""`mae-fast embed`: embed every site of a screen and write per-well (and per-site) tables.

    mae-fast embed --checkpoint runs/s16/model --data /data/rxrx3 --out emb/embeddings.parquet
    mae-fast embed --checkpoint openphenom/ --data screen/ --out emb.parquet --per-channel
    mae-fast embed --checkpoint recursionpharma/OpenPhenom --data screen/ --out emb.parquet   # a Hub repo id
    mae-fast embed --checkpoint vit_s16.safetensors --preset mae_vit_small_patch16_256 --data screen/ --out emb.parquet
    torchrun --nproc_per_node 8 -m mae_fast.cli embed ...       # plates shared out over the ranks

Models: our checkpoints (a `save_model` folder, a training run folder, or a single weights file with --preset), an
OpenPhenom checkpoint (folder or file), a timm encoder folder, or a timm state dict of the encoder (with --preset for
the architecture); a name that is not a local path is a Hugging Face Hub repo id (`mae_fast.hub`).
The CNN baselines (`mae_fast.models.wsl`, `munet`) embed the same way: WSL DenseNet -> its 128-d neck output, MU-Net -> the
global average of its bottleneck.

AdaBN models (WSL with ghost batch norm) normalise each forward pass with that batch's own statistics, so their
batches must come from one plate and should not be the tiles of one well (whose statistics would remove the
well's own phenotype). Per plate, the sites are taken in a seeded order (`seed`) in windows of about
`adabn_window` tiles (default 8 x batch_size, at least 2 sites a window); a window's tiles are shuffled (seeded)
and cut into near-equal batches of at most batch_size and at least 2 tiles. The result is deterministic in
(seed, adabn_window, batch_size), which the parts' manifest records.

Every site is cut into non-overlapping tiles of the model's crop size (`mae_fast.data.tiling`); each tile is
embedded without masking (mean of the patch tokens; bf16 autocast on GPUs and on CPUs with native bf16 units, fp32
on other CPUs: `mae_fast.device.default_amp`); a site's embedding is the
mean of its tiles, a well's the mean of all its tiles (= the mean of its sites when they have the same tile count).

Output: `OUT` (parquet, one row per well): the metadata columns (RxRx3 schema: well_id, experiment_name, plate,
address, gene, treatment, SMILES, concentration, perturbation_type, cell_type -- as far as the metadata has them,
then the dataset's other metadata columns), perturbation, n_sites, n_tiles, then feature_0 .. feature_{D-1}
(float32). With --per-channel (CA-MAE models) the features are the per-channel embeddings, feature index
c * D + i for channel c, dimension i. With --sites also `OUT_STEM_sites.parquet`, one row per site.

Block-wise (`--blocks all` or `--blocks 2,4`, ViTs): one table, a `block` column first (1-based; block `depth` is the
plain embedding), a row per (well, block); each block pooled as the last (`MaskedAutoencoder.embed(blocks=)`).

Resuming: work is done plate by plate; each finished plate is one part file in `OUT_STEM_parts/`, written
atomically, and a rerun skips the plates that have one (a manifest guards against mixing settings). A part records
what made it (settings, weights, the plate's metadata rows, its files' sizes and modification times): a plate whose
record differs now (a relabelled gene, a replaced image) is embedded again, and the rerun says so. When every plate
is done the parts are merged into OUT. An existing OUT is refused unless --overwrite, which removes only what embed
wrote (parquet tables, the parts folder's parts); no output may be an input or a folder holding one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from mae_fast.checkpoint import describe_model
from mae_fast.data.tiling import decode_workers
from mae_fast.device import amp_label
from mae_fast.inference.adabn import AdaBNPlateTiles, adabn_window_tiles, is_adabn
from mae_fast.inference.blocks import embedding_blocks
from mae_fast.inference.model_loading import check_channels, load_embedding_model
from mae_fast.inference.tables import (
    MANIFEST,
    check_own_outputs,
    merge_parts,
    output_paths,
    part_inputs_digest,
    plate_inputs_digest,
    plate_part_name,
    plate_table,
    write_parquet,
)
from mae_fast.io import (
    OutputLock,
    atomic_write_json,
    beside_lock_path,
    check_output_path,
    refuse_overwriting_inputs,
    remove_temporaries,
)
from mae_fast.training.config import (
    MAX_SEED,
    ConfigError,
    DataConfig,
    check_num_workers,
    data_inputs,
    resolve_amp,
    resolve_device,
)
from mae_fast.training.data import build_site_index
from mae_fast.training.distributed import (
    DistInfo,
    agree,
    all_gather_objects,
    barrier,
    env_world,
    init_distributed,
    torch_threads,
)

logger = logging.getLogger(__name__)


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
    amp: str = "auto"                    # auto (bf16 on GPU and on CPUs with native bf16, else fp32), bf16, fp32
    per_channel: bool = False            # CA-MAE: per-channel embeddings (C * D features)
    sites: bool = False                  # also write the per-site table
    overwrite: bool = False
    progress: bool = True
    threads: int = 0
    seed: int = 0                        # AdaBN models: order of the sites and tiles that share a batch
    adabn_window: int = 0                # AdaBN models: tiles shuffled together (0: 8 x batch_size)
    blocks: str | list[int] | None = None  # ViTs: "all" or encoder block numbers (1-based) -> a `block` column


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
    blocks: list[int] | None = None      # the encoder blocks of the `block` column (None: the plain embedding)



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
# Parts: which weights and settings made them
# ------------------------------------------------------------------------------------------------------------

def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every weight's bytes: parts embedded by other weights (a retrained checkpoint) are not mixed in."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)  # 0-d: BN counters
    return h.hexdigest()


def _manifest(cfg: EmbedConfig, model: torch.nn.Module, index, amp) -> dict:
    where = os.path.abspath(cfg.checkpoint) if os.path.exists(cfg.checkpoint) else cfg.checkpoint  # or a repo id
    manifest = {"checkpoint": where, "weights": weights_fingerprint(model),
                "model": model.cfg.to_dict(), "tile": model.cfg.img_size, "edge": cfg.edge,
                "per_channel": cfg.per_channel, "amp": "bf16" if amp else "fp32", "index": index.fingerprint(),
                "n_sites": len(index), "blocks": embedding_blocks(cfg.blocks, model)}
    if is_adabn(model):  # the batches' composition changes the embeddings
        manifest["adabn_batches"] = {"seed": cfg.seed, "window_tiles": adabn_window_tiles(cfg),
                                     "batch_size": cfg.batch_size}
    return manifest


def check_outputs(cfg: EmbedConfig) -> None:
    """Before any work: the table's name is usable, and no output (table, site table, parts folder) is an input or
    a folder holding one."""
    check_output_path(cfg.out, "--out", kind="file")
    inputs = {**data_inputs(cfg.data), "--checkpoint": cfg.checkpoint}
    for path in output_paths(cfg.out):
        refuse_overwriting_inputs(path, inputs, "--out" if path == cfg.out else f"--out's {path}")


def _prepare(cfg: EmbedConfig, info: DistInfo):
    """Every check before work: output, model, data, channels, an earlier run's manifest."""
    out, sites_path, parts_dir = output_paths(cfg.out)
    if not cfg.checkpoint:
        raise ConfigError("give the model: --checkpoint PATH")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    check_num_workers(cfg.data.num_workers, "--num-workers")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed must be in [0, {MAX_SEED}], got {cfg.seed}")
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
    if cfg.overwrite:
        check_own_outputs(out, sites_path, parts_dir)
    # some but not all tables exist beside their parts (a run killed between its table writes): a rerun with the
    # same settings (the manifest check below) merges the parts again and writes the missing table
    device = resolve_device(cfg.device, info.local_rank)
    amp = resolve_amp(cfg.amp, device)
    model, kind = load_embedding_model(cfg)
    if is_adabn(model) and cfg.batch_size < 2:
        raise ConfigError(f"{model.cfg.name} normalises with batch statistics (AdaBN): batch_size must be >= 2, got "
                          f"{cfg.batch_size}")
    embedding_blocks(cfg.blocks, model)  # a ViT, block numbers in range
    index = build_site_index(cfg.data)
    check_channels(model, index, cfg.per_channel)
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
    check_outputs(cfg)
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
            logger.info(f"removed {len(leftovers)} temporary file(s) of an interrupted run: "
                        + ", ".join(os.path.basename(p) for p in leftovers))
        os.makedirs(parts_dir, exist_ok=True)
        if not os.path.exists(os.path.join(parts_dir, MANIFEST)):
            atomic_write_json(os.path.join(parts_dir, MANIFEST), manifest, indent=1)
    barrier(info)

    model = model.to(device).eval()
    dims = model.cfg.embed_dim * (len(index.channels) if cfg.per_channel else 1)
    blocks = manifest["blocks"]
    plates: list[tuple[str, str]] = []
    for s in index:
        if not plates or plates[-1] != (s.experiment, s.plate):
            if (s.experiment, s.plate) not in plates:
                plates.append((s.experiment, s.plate))
    by_plate = {p: index.select(where=lambda s, p=p: (s.experiment, s.plate) == p) for p in plates}
    names = [plate_part_name(*p) for p in plates]
    mine = assign_plates(plates, [len(by_plate[p]) for p in plates], info.world_size)[info.rank]
    label = [f"{e}/Plate{p}" for e, p in plates]
    made_from = {i: plate_inputs_digest(by_plate[plates[i]], manifest) for i in mine}
    done_before, stale = [], []
    for i in mine:
        path = os.path.join(parts_dir, names[i])
        if os.path.exists(path):
            (done_before if part_inputs_digest(path) == made_from[i] else stale).append(i)
    for i in stale:
        logger.info(f"{label[i]}: its part was made from other inputs (metadata rows, image files or settings "
                    f"changed since); embedding the plate again")
    todo = [i for i in mine if i not in done_before]
    if info.is_main:
        logger.info(f"embedding {len(index)} sites on {len(plates)} plate(s) with {describe_model(model.cfg)} "
                    f"({kind}, {model.cfg.img_size}px tiles, {dims} features"
                    + (f" for each of blocks {','.join(map(str, blocks))}" if blocks else "")
                    + f", {device.type} {amp_label(amp, cfg.amp, device)})"
                    + (f"; {len(done_before)} plate(s) already done" if done_before else "") + f" -> {out}")

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
                                  on_error=cfg.data.on_error, num_workers=decode_workers(cfg.data.num_workers),
                                  device=device, backend=cfg.data.backend)
        sums: dict[tuple, np.ndarray] = {}
        counts: dict[tuple, int] = {}
        for tiles, keys in tiles_it:
            with torch.no_grad(), autocast:
                z = (model.embed(tiles, per_channel=cfg.per_channel) if blocks is None  # (B, dims)
                     else model.embed(tiles, per_channel=cfg.per_channel, blocks=blocks))  # (B, blocks, dims)
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
        frame = plate_table(sub, sums, counts, dims, blocks)
        write_parquet(frame, os.path.join(parts_dir, names[i]),
                      {"plate": label[i], "skipped": tiles_it.summary.to_dict(), "n_tiles": int(sum(counts.values())),
                       "inputs": made_from[i]})
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
        logger.info(f"{n_wells} wells, {n_sites} sites, {dims} features -> {out} ({n_tiles} tiles in {seconds:.1f} s, "
                    f"{rate:.1f} crops/s)" + (f"; {merged}" if merged else ""))
    counts_all = all_gather_objects((n_wells, n_sites, merged_summary), info)[0]
    barrier(info)
    return EmbedResult(
        out=out, sites_path=sites_path if cfg.sites else None, parts_dir=parts_dir, n_wells=counts_all[0],
        n_sites=counts_all[1], n_tiles=n_tiles, dims=dims, seconds=seconds,
        tiles_per_second=n_tiles / seconds if seconds > 0 else 0.0,
        plates_done=[label[i] for i in todo], plates_skipped=[label[i] for i in done_before],
        skipped_sites=counts_all[2], blocks=blocks,
    )


def embed_dataset(checkpoint: str, data_root: str, out: str, *, preset: str | None = None, model: dict | None = None,
                  metadata: str | None = None, data_format: str = "auto", channels=None, experiments=None,
                  plates=None, perturbations=None, edge: str = "drop", batch_size: int = 64, device: str = "auto",
                  amp: str = "auto", per_channel: bool = False, sites: bool = False, num_workers: int | None = None,
                  backend: str = "auto", on_error: str = "raise", overwrite: bool = False, progress: bool = True,
                  threads: int = 0, seed: int = 0, adabn_window: int = 0,
                  blocks: str | list[int] | None = None) -> EmbedResult:
    """Python API of `mae-fast embed` (see the module doc)."""
    data = DataConfig(root=data_root, format=data_format, metadata=metadata,
                      channels=[str(c) for c in channels] if channels else None,
                      experiments=_strings(experiments), plates=_strings(plates), perturbations=_strings(perturbations),
                      num_workers=num_workers, backend=backend, on_error=on_error)
    return embed(EmbedConfig(checkpoint=checkpoint, out=out, data=data, preset=preset, model=dict(model or {}),
                             edge=edge, batch_size=batch_size, device=device, amp=amp, per_channel=per_channel,
                             sites=sites, overwrite=overwrite, progress=progress, threads=threads, seed=seed,
                             adabn_window=adabn_window, blocks=blocks))


def _strings(values):
    if values is None:
        return None
    if isinstance(values, (str, int)):
        values = [values]
    return [str(v) for v in values]

