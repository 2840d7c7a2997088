"""Tiling for inference: order, coverage, keys, batching across sites, edge policies, bad sites."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.data.dali import dali_available
from mae_fast.data.errors import DataError
from mae_fast.data.index import SiteIndex
from mae_fast.data.tiling import iter_tiles, tile_grid

T = 32


def test_tile_grid_order_and_counts():
    assert len(tile_grid(2048, 2048, 256)) == 64 and len(tile_grid(512, 512, 256)) == 4
    assert tile_grid(512, 512, 256) == [(0, 0), (0, 256), (256, 0), (256, 256)]  # row-major
    assert tile_grid(600, 520, 256, "drop") == [(0, 0), (0, 256), (256, 0), (256, 256)]
    assert tile_grid(600, 520, 256, "center")[0] == (44, 4)
    assert len(tile_grid(600, 520, 256, "pad")) == 9
    assert tile_grid(200, 520, 256, "drop") == []
    with pytest.raises(ValueError):
        tile_grid(10, 10, 4, "wrap")


@pytest.fixture(scope="module")
def tiled_screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(5)
    images = {}
    for address, (h, w) in [("B02", (64, 96)), ("B03", (70, 75)), ("B04", (32, 32))]:
        folder = root / "images" / "exp" / "Plate1"
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 65535, (2, h, w), dtype=np.uint16)
        for c in range(2):
            Image.fromarray(image[c]).save(str(folder / f"{address}_s1_w{c + 1}.png"))
        images[f"exp_1_{address}"] = image
    return SiteIndex.from_rxrx(str(root)), images


@pytest.mark.parametrize("edge", ["drop", "center", "pad"])
def test_tiles_cover_each_site_in_order_with_keys(tiled_screen, edge):
    index, images = tiled_screen
    batches = list(iter_tiles(index, tile=T, batch_size=5, edge=edge))
    tiles = torch.cat([b for b, _ in batches])
    keys = [k for _, ks in batches for k in ks]
    assert all(len(b) == 5 for b, _ in batches[:-1]) and tiles.dtype == torch.uint16
    assert len(set(keys)) == len(keys)  # keys unique
    mixed = [ks for _, ks in batches if len({k[0] for k in ks}) > 1]
    assert mixed  # batches span sites
    expected_keys = []
    for site in index:
        image = images[site.well_id]
        _, h, w = image.shape
        corners = tile_grid(h, w, T, edge)
        expected_keys += [(site.well_id, 1, t) for t in range(len(corners))]
        for t, (y, x) in enumerate(corners):
            got = tiles[keys.index((site.well_id, 1, t))].numpy()
            want = np.zeros((2, T, T), np.uint16)
            part = image[:, y:y + T, x:x + T]
            want[:, :part.shape[1], :part.shape[2]] = part
            assert np.array_equal(got, want)
    assert keys == expected_keys
    if edge == "drop":
        assert len(keys) == 6 + 4 + 1  # 64x96 -> 2x3, 70x75 -> 2x2, 32x32 -> 1


def test_tiles_with_workers_equal_main_process(tiled_screen):
    index, _ = tiled_screen
    a = list(iter_tiles(index, tile=T, batch_size=4))
    b = list(iter_tiles(index, tile=T, batch_size=4, num_workers=2))
    assert [k for _, k in a] == [k for _, k in b]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))


def test_edge_error_and_too_small(tiled_screen):
    index, _ = tiled_screen
    with pytest.raises(DataError) as err:
        list(iter_tiles(index, tile=T, edge="error"))
    assert err.value.reason == "size_mismatch" and err.value.well == "exp_1_B03"
    with pytest.raises(DataError) as err:
        list(iter_tiles(index, tile=48))
    assert err.value.reason == "too_small" and err.value.well == "exp_1_B04"
    it = iter_tiles(index, tile=48, on_error="skip")
    keys = [k for _, ks in it for k in ks]
    assert {k[0] for k in keys} == {"exp_1_B02", "exp_1_B03"}
    assert dict(it.summary.counts) == {"too_small": 1} and it.summary.skipped[0].well == "exp_1_B04"


def test_tiles_of_the_synthetic_screen(tmp_path):
    from mae_fast.data.synthetic import make_synthetic_screen

    screen = make_synthetic_screen(str(tmp_path), n_experiments=1, n_plates=1, n_complexes=1, complex_size=2,
                                   n_singletons=1, n_empty_controls=1, n_crispr_controls=1, site_size=128,
                                   cells_per_site=4, channels=3)
    index = SiteIndex.from_rxrx(screen.root)
    assert len(index) == 5 and not index.summary and index.channels == ("w1", "w2", "w3")
    keys = [k for _, ks in iter_tiles(index, tile=64, batch_size=6) for k in ks]
    assert len(keys) == 5 * 4
    assert {k[0] for k in keys} == set(index.metadata_frame()["well_id"])
    assert os.path.exists(screen.metadata_csv)


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_tiles_equal_torch_tiles(tiled_screen):
    index, _ = tiled_screen
    for edge in ("drop", "pad"):
        a = list(iter_tiles(index, tile=T, batch_size=4, edge=edge))
        it = iter_tiles(index, tile=T, batch_size=4, edge=edge, backend="dali")
        assert it.backend == "dali"
        b = list(it)
        assert [k for _, k in a] == [k for _, k in b]
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    it = iter_tiles(index, tile=48, on_error="skip", backend="dali")
    assert {k[0] for _, ks in it for k in ks} == {"exp_1_B02", "exp_1_B03"} and it.summary.total == 1
