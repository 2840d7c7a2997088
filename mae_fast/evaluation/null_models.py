"""Baselines run through the same TVN and recall as the model: random embeddings and pixel statistics.

Pixel statistics: for every channel of a well's image, 5 numbers of its intensities scaled to [0, 1]
(uint8 / 255, uint16 / 65535; float images are taken as already in [0, 1]):
    mean, standard deviation (population), 5th, 50th and 95th percentile (numpy's 'linear' method),
ordered channel-major: [w1 mean, w1 std, w1 p5, w1 p50, w1 p95, w2 mean, ...] -> 30 numbers for 6 channels.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch

from mae_fast.data.index import SiteIndex
from mae_fast.data.loading import load_site

from .table import EvaluationInputError, WellTable

PIXEL_STATISTICS = ("mean", "std", "p5", "p50", "p95")
PIXEL_PERCENTILES = (5.0, 50.0, 95.0)
INTEGER_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def random_embeddings_like(table: WellTable, seed: int = 0, source: str = "random") -> WellTable:
    """The same wells with standard-normal float32 features of the same shape (fixed seed)."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal(table.features.shape, dtype=np.float32)
    return table.with_features(features, source)


def pixel_feature_names(channels: int) -> list[str]:
    """Readable names of the pixel-statistics features: w1_mean, w1_std, ..., w6_p95."""
    return [f"w{c + 1}_{stat}" for c in range(channels) for stat in PIXEL_STATISTICS]


def _histogram_statistics(plane: np.ndarray, levels: int) -> np.ndarray:
    """(5,) statistics of one integer plane via its histogram: exact, and O(pixels) instead of a sort."""
    counts = np.bincount(plane.ravel(), minlength=levels).astype(np.int64)
    values = np.arange(levels, dtype=np.float64)
    n = int(counts.sum())
    mean = float(counts @ values) / n
    std = float(np.sqrt(max(counts @ (values - mean) ** 2 / n, 0.0)))
    # numpy 'linear' percentiles from the cumulative histogram: value at rank r = first level with cum > r.
    q = np.asarray(PIXEL_PERCENTILES) / 100
    virtual = (n - 1) * q
    previous = np.floor(virtual).astype(np.int64)
    nxt = np.minimum(previous + 1, n - 1)
    cumulative = np.cumsum(counts)
    low = np.searchsorted(cumulative, previous, side="right").astype(np.float64)
    high = np.searchsorted(cumulative, nxt, side="right").astype(np.float64)
    gamma = virtual - previous
    percentiles = np.where(gamma >= 0.5, high - (high - low) * (1 - gamma), low + (high - low) * gamma)
    return np.concatenate([[mean, std], percentiles])


def pixel_statistics(images) -> np.ndarray:
    """Per-channel intensity statistics. images (B, C, H, W) uint8/uint16/float (tensor or array) -> (B, 5*C) float32."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4:
        raise EvaluationInputError(f"pixel_statistics expects images of shape (B, C, H, W), got {images.shape}")
    b, c = images.shape[:2]
    out = np.empty((b, c, len(PIXEL_STATISTICS)), dtype=np.float64)
    if images.dtype in INTEGER_SCALE:
        scale = INTEGER_SCALE[images.dtype]
        levels = int(scale) + 1
        for i in range(b):
            for j in range(c):
                out[i, j] = _histogram_statistics(images[i, j], levels) / scale
    elif np.issubdtype(images.dtype, np.floating):
        flat = images.reshape(b, c, -1).astype(np.float64)
        out[..., 0] = flat.mean(axis=-1)
        out[..., 1] = flat.std(axis=-1)
        out[..., 2:] = np.moveaxis(np.percentile(flat, PIXEL_PERCENTILES, axis=-1), 0, -1)
    else:
        raise EvaluationInputError(f"pixel_statistics: unsupported image dtype {images.dtype} (uint8, uint16 or float)")
    return out.reshape(b, c * len(PIXEL_STATISTICS)).astype(np.float32)


def site_index(source, channels: int = 6, metadata: pd.DataFrame | None = None):
    """The image sites of `source`: a `SiteIndex` passes through; a folder is read as the RxRx layout (joined
    with `{root}/metadata.csv`, or `metadata`). No site at all is an error naming the source."""
    if isinstance(source, SiteIndex):
        index = source
    else:
        metadata_csv = None
        if metadata is not None:
            metadata_csv = os.path.join(source, ".pixel_stats_metadata.csv")
            metadata.to_csv(metadata_csv, index=False)
        try:
            index = SiteIndex.from_rxrx(source, metadata_csv=metadata_csv, channels=list(range(1, channels + 1)))
        finally:
            if metadata_csv is not None:
                os.remove(metadata_csv)
    if len(index) == 0:
        raise EvaluationInputError(f"no image sites found in {source}")
    return index


def pixel_statistics_table(
    source, channels: int = 6, metadata: pd.DataFrame | None = None, num_workers: int | None = None
) -> pd.DataFrame:
    """Pixel statistics of every well: its metadata columns + feature_0..feature_{5C-1}.

    `source` is an RxRx-layout root (read with `mae_fast.data.SiteIndex.from_rxrx`, joined with
    `{root}/metadata.csv` or `metadata`) or any `SiteIndex` (RxRx3-core parquet, JUMP, packed). Images are decoded
    by the data layer, so a missing or corrupt file is a `DataError` naming the file and the well. Wells with
    several sites get the mean of their sites' statistics.
    """
    index = site_index(source, channels, metadata)

    def site_statistics(site) -> np.ndarray:
        return pixel_statistics(load_site(site).full()[None])[0]

    workers = num_workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:   # PNG decoding releases the GIL
        rows = list(pool.map(site_statistics, index))
    n_features = len(rows[0])
    features = pd.DataFrame(np.stack(rows), columns=[f"feature_{k}" for k in range(n_features)])
    meta = pd.DataFrame([{"well_id": s.well_id, **dict(s.metadata)} for s in index])
    table = pd.concat([meta, features], axis=1)
    feature_columns = list(features.columns)
    meta_columns = [c for c in meta.columns]
    table = (table.groupby("well_id", sort=False, dropna=False)
             .agg({**{c: "first" for c in meta_columns if c != "well_id"}, **{c: "mean" for c in feature_columns}})
             .reset_index())
    table.attrs["feature_names"] = pixel_feature_names(n_features // len(PIXEL_STATISTICS))
    return table
