"""CellProfiler-style baseline: segment nuclei and cells, measure per-cell features with `cp-measure`, median per well.

Per site (C, H, W), intensities scaled to [0, 1] (uint8 / 255, uint16 / 65535, float as is):
    nuclei   DNA channel (`dna_channel`, RxRx3 w1 Hoechst), Gaussian smoothing (sigma 1), Otsu threshold, holes
             filled, objects under `min_nucleus_area` pixels removed, touching nuclei split by a watershed on the
             distance transform from its local maxima (CellProfiler IdentifyPrimaryObjects: Otsu, shape declumping);
    cells    a watershed of the smoothed cytoplasm image (mean of `cell_channels`, default all but DNA) seeded by
             the nuclei, inside the Otsu foreground of that image plus the nuclei (IdentifySecondaryObjects
             with the watershed-gradient method: every cell has exactly one nucleus);
    features cp-measure on the cells: intensity (21 per channel) and Haralick texture at scale 3 with 16 gray
             levels (52 per channel; CellProfiler's default is 256 levels, which costs ~4 s per channel of a 512^2
             site in cp-measure 0.3 against ~0.07 s with 16),
             granularity (16 per channel) when `granularity=True`, size/shape of cells and of nuclei (one
             `sizeshape` each, without Zernike moments).
Per well: the median of each feature over all cells of all its sites (or, with `cells_per_site=N`, over at most N
cells of each site drawn by seed: every cell is segmented, the drawn ones are measured, each exactly as it would be
among all; the demo's default, stated under its table). Sites are measured in forked worker processes. Feature
columns that are not finite in some well (e.g. a texture statistic undefined for every cell of a well) are dropped
and counted in `table.attrs["dropped_features"]`; wells without any cell are an error naming them.

Optional dependencies: scikit-image (segmentation) and cp-measure (features); a missing one is an
`EvaluationInputError` saying what to install. cp-measure 0.3 requires centrosome, whose metadata pins pillow < 12.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings

import numpy as np
import pandas as pd

from mae_fast.data.loading import load_site
from mae_fast.processes import default_workers, map_in_processes, worker_state

from .null_models import INTEGER_SCALE, site_index
from .table import EvaluationInputError, name_some

MEASUREMENTS = ("intensity", "texture", "sizeshape")
OPTIONAL_PACKAGES = {"skimage": "scikit-image", "cp_measure": "cp-measure"}   # module -> package to install


def missing_packages() -> list[str]:
    """The optional packages the baseline needs that are not installed (located only, nothing is imported)."""
    missing = []
    for module, package in OPTIONAL_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise EvaluationInputError(
            f"the cellprofiler baseline needs the optional package {package} ({err}); pip install {package}"
        ) from None


def _as_unit_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype in INTEGER_SCALE:
        return image.astype(np.float32) / np.float32(INTEGER_SCALE[image.dtype])
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32)
    raise EvaluationInputError(f"cellprofiler baseline: unsupported image dtype {image.dtype}")


def segment_site(image: np.ndarray, dna_channel: int = 0, cell_channels=None, min_nucleus_area: int = 20,
                 min_distance: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) image -> (nuclei labels, cell labels), int32 (H, W); cell k grows from nucleus k."""
    filters = _require("skimage.filters", "scikit-image")
    morphology = _require("skimage.morphology", "scikit-image")
    segmentation = _require("skimage.segmentation", "scikit-image")
    feature = _require("skimage.feature", "scikit-image")
    ndimage = _require("scipy.ndimage", "scipy")
    image = _as_unit_float(image)
    if image.ndim != 3:
        raise EvaluationInputError(f"segment_site expects (C, H, W), got {image.shape}")
    channels = image.shape[0]
    cell_channels = [c for c in range(channels) if c != dna_channel] if cell_channels is None else list(cell_channels)

    dna = filters.gaussian(image[dna_channel], sigma=1.0, preserve_range=True)
    if float(dna.max()) == float(dna.min()):
        empty = np.zeros(dna.shape, dtype=np.int32)
        return empty, empty
    foreground = ndimage.binary_fill_holes(dna > filters.threshold_otsu(dna))
    foreground = morphology.remove_small_objects(foreground, max_size=min_nucleus_area - 1)
    distance = ndimage.distance_transform_edt(foreground)
    blobs, _ = ndimage.label(foreground)
    peaks = feature.peak_local_max(distance, min_distance=min_distance, labels=blobs, exclude_border=False)
    markers = np.zeros(dna.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    nuclei = segmentation.watershed(-distance, markers, mask=foreground).astype(np.int32)

    cytoplasm = filters.gaussian(image[cell_channels].mean(axis=0), sigma=1.0, preserve_range=True)
    if float(cytoplasm.max()) > float(cytoplasm.min()):
        cell_area = (cytoplasm > filters.threshold_otsu(cytoplasm)) | (nuclei > 0)
    else:
        cell_area = nuclei > 0
    cells = segmentation.watershed(-cytoplasm, nuclei, mask=cell_area).astype(np.int32)
    return nuclei, cells


def _measured_cells(cells: np.ndarray, nuclei: np.ndarray, max_cells: int | None, rng: np.random.Generator | None):
    """Contiguous 1..N labels of the cells to measure and their nuclei (nucleus k seeded cell k and lies inside
    it: watershed markers keep their label, so one relabelling serves both). With `max_cells`, a site with more
    cells keeps `max_cells` of them drawn by `rng` and the others become background; cp-measure measures each
    object on its own pixels, so a kept cell's features are those it has when every cell is measured."""
    ids = np.unique(cells[cells > 0])
    if max_cells is not None and ids.size > max_cells:
        ids = np.sort(rng.choice(ids, max_cells, replace=False))
    lookup = np.zeros(int(max(nuclei.max(), cells.max())) + 1, dtype=np.int32)
    lookup[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lookup[cells], lookup[nuclei], ids.size


def site_feature_matrix(image: np.ndarray, dna_channel: int = 0, cell_channels=None, granularity: bool = False,
                        texture_scale: int = 3, texture_gray_levels: int = 16, max_cells: int | None = None,
                        rng: np.random.Generator | None = None) -> tuple[list[str], np.ndarray]:
    """(feature names, float64 (cells, features)) of one (C, H, W) site: one row per measured cell (cells with a
    nucleus; at most `max_cells`, drawn by `rng`, see `_measured_cells`). No cell: ([], (0, 0))."""
    bulk = _require("cp_measure.bulk", "cp-measure")
    measure = bulk.get_core_measurements()
    image = _as_unit_float(image)
    nuclei, cells = segment_site(image, dna_channel, cell_channels)
    cells, nuclei, n = _measured_cells(cells, nuclei, max_cells, rng)
    if n == 0:
        return [], np.zeros((0, 0))
    names: list[str] = []
    columns: list[np.ndarray] = []

    def add(prefix: str, values: dict):
        for key, column in values.items():
            names.append(f"{prefix}_{key}")
            columns.append(np.asarray(column, dtype=np.float64))

    add("Cells_AreaShape", measure["sizeshape"](cells, None))
    add("Nuclei_AreaShape", measure["sizeshape"](nuclei, None))
    for c in range(image.shape[0]):
        plane = image[c]
        add(f"Cells_Intensity_w{c + 1}", measure["intensity"](cells, plane))
        add(f"Cells_Texture_w{c + 1}", measure["texture"](cells, plane, scale=texture_scale,
                                                                    gray_levels=texture_gray_levels))
        if granularity:
            add(f"Cells_Granularity_w{c + 1}", measure["granularity"](cells, plane))
    return names, np.stack(columns, axis=1)


def site_cell_features(image: np.ndarray, dna_channel: int = 0, cell_channels=None, granularity: bool = False,
                       texture_scale: int = 3, texture_gray_levels: int = 16, max_cells: int | None = None,
                       seed=0) -> pd.DataFrame:
    """Per-cell CellProfiler features of one (C, H, W) site: one row per cell (cells with a nucleus; at most
    `max_cells`, drawn with `seed`, an int or sequence of ints)."""
    names, matrix = site_feature_matrix(image, dna_channel, cell_channels, granularity, texture_scale,
                                        texture_gray_levels, max_cells, np.random.default_rng(seed))
    return pd.DataFrame(matrix, columns=names)


def _site_in_worker(k: int) -> tuple[list[str], np.ndarray]:
    """Site k of the running `cellprofiler_table` (its state inherited by the forked worker)."""
    sites, dna_channel, cell_channels, granularity, cells_per_site, seed = worker_state()
    return site_feature_matrix(load_site(sites[k]).full(), dna_channel, cell_channels, granularity,
                               max_cells=cells_per_site, rng=np.random.default_rng([seed, k]))


def cellprofiler_table(source, channels: int = 6, metadata: pd.DataFrame | None = None, dna_channel: int = 0,
                       cell_channels=None, granularity: bool = False, num_workers: int | None = None,
                       cells_per_site: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Per-well medians of per-cell CellProfiler features: the well's metadata columns + feature_0.. (names in
    `table.attrs["feature_names"]`). `source`: an RxRx-layout root or a `SiteIndex` (see pixel_statistics_table).
    `cells_per_site`: measure at most this many segmented cells of each site, drawn with (`seed`, site number)
    (every cell is segmented; None: measure all). Sites are measured in `num_workers` forked processes (default:
    up to 2 cores; `mae_fast.processes`); the table does not depend on it."""
    _require("skimage", "scikit-image")
    _require("cp_measure.bulk", "cp-measure")
    if cells_per_site is not None and cells_per_site < 1:
        raise EvaluationInputError(f"cellprofiler baseline: cells_per_site must be >= 1, got {cells_per_site}")

    index = site_index(source, channels, metadata)
    sites = list(index)
    workers = num_workers or default_workers()
    per_site = map_in_processes(_site_in_worker, range(len(sites)), workers,
                                state=(sites, dna_channel, cell_channels, granularity, cells_per_site, seed))
    names = next((n for n, m in per_site if len(m)), [])
    wells = pd.unique(pd.Series([s.well_id for s in sites]))
    cells_by_well: dict[str, list[np.ndarray]] = {w: [] for w in wells}
    for site, (site_names, matrix) in zip(sites, per_site):
        if len(matrix):
            if site_names != names:
                raise EvaluationInputError(f"cellprofiler baseline: site {site.well_id} gave other feature columns")
            cells_by_well[site.well_id].append(matrix)
    empty = [w for w, frames in cells_by_well.items() if not frames]
    if empty:
        raise EvaluationInputError(f"cellprofiler baseline: no cells segmented in well(s) {name_some(empty)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)         # all-NaN columns give NaN, dropped below
        medians = np.stack([np.nanmedian(np.concatenate(cells_by_well[w]), axis=0) for w in wells])
    finite = np.isfinite(medians).all(axis=0)
    dropped = [n for n, ok in zip(names, finite) if not ok]
    medians = medians[:, finite]
    first_site = {}
    for site in sites:
        first_site.setdefault(site.well_id, site)
    meta = pd.DataFrame([{"well_id": w, **dict(first_site[w].metadata)} for w in wells])
    features = pd.DataFrame(medians.astype(np.float32), columns=[f"feature_{k}" for k in range(medians.shape[1])])
    table = pd.concat([meta, features], axis=1)
    table.attrs["feature_names"] = [n for n, ok in zip(names, finite) if ok]
    table.attrs["dropped_features"] = dropped
    table.attrs["cells_per_site"] = cells_per_site
    table.attrs["cells_per_well_median"] = float(np.median([sum(len(m) for m in cells_by_well[w]) for w in wells]))
    return table
