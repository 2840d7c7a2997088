"""`mae-fast pack`: lossless round trip, same crops and tiles as the source, metadata kept, bad input, atomic
output, the CLI module."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.data.errors import DataError
from mae_fast.data.index import SiteIndex
from mae_fast.data.loader import make_train_loader, make_val_loader
from mae_fast.data.loading import load_site
from mae_fast.data.pack import pack_index
from mae_fast.data.tiling import iter_tiles
from mae_fast.cli import pack as pack_cli

TILE = 32


def write_screen(root, n=6, seed=0):
    rng = np.random.default_rng(seed)
    images, rows = {}, []
    for i in range(n):
        exp, plate, address = "exp-a", 1 + i % 2, f"C{i + 2:02d}"
        folder = os.path.join(root, "images", exp, f"Plate{plate}")
        os.makedirs(folder, exist_ok=True)
        image = rng.integers(0, 65535, (4, 70 + i, 81), dtype=np.uint16)  # not multiples of the tile
        for c in range(4):
            Image.fromarray(image[c]).save(os.path.join(folder, f"{address}_s1_w{c + 1}.png"))
        well = f"{exp}_{plate}_{address}"
        images[well] = image
        rows.append(f"{well},{exp},{plate},{address},G{i},G{i}_g,,{0.5 * i},CRISPR,HUVEC")
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.write("well_id,experiment_name,plate,address,gene,treatment,SMILES,concentration,perturbation_type,cell_type\n")
        f.write("\n".join(rows) + "\n")
    return images


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    images = write_screen(str(root))
    index = SiteIndex.from_rxrx(str(root))
    out = str(tmp_path_factory.mktemp("packs") / "pack")
    result = pack_index(index, out, tile=TILE, num_workers=2, shard_bytes=100_000)
    return index, images, SiteIndex.from_pack(out), result


def test_pack_round_trip_is_lossless_and_keeps_metadata(packed):
    index, images, pindex, result = packed
    assert result.n_sites == len(index) == len(pindex) and not result.summary
    assert len(json.load(open(os.path.join(result.out_dir, "pack.json")))["shards"]) > 1  # shards roll over
    assert [s.key for s in pindex] == [s.key for s in index]
    assert pindex.channels == index.channels and pindex.dtype == np.uint16
    for a, b in zip(index, pindex):
        assert dict(a.metadata) == dict(b.metadata) and a.perturbation == b.perturbation and a.plate == b.plate
        image = load_site(b, dtype=np.uint16)
        assert np.array_equal(image.full(), images[a.well_id])
        rng = np.random.default_rng(0)
        for _ in range(5):  # regions across tile borders
            y, x = rng.integers(0, 40), rng.integers(0, 50)
            assert np.array_equal(image.region(y, x, 30, 31), images[a.well_id][:, y:y + 30, x:x + 31])


def test_packed_crops_and_tiles_equal_the_source(packed):
    index, _, pindex, _ = packed
    kw = dict(crop_size=TILE, batch_size=4, crops_per_image=3, seed=8, num_workers=0, return_info=True)
    src = list(make_train_loader(index, backend="torch", **kw))
    pck = make_train_loader(pindex, backend="auto", **kw)
    assert pck.backend == "torch"
    for (a, ia), (b, ib) in zip(src, pck):
        assert torch.equal(a, b) and np.array_equal(ia.y, ib.y)
    val_a = list(make_val_loader(index, crop_size=TILE, batch_size=4, backend="torch", num_workers=0))
    val_b = list(make_val_loader(pindex, crop_size=TILE, batch_size=4, backend="torch", num_workers=0))
    assert all(torch.equal(a, b) for a, b in zip(val_a, val_b))
    ta = list(iter_tiles(index, tile=TILE, batch_size=5, edge="pad"))
    tb = list(iter_tiles(pindex, tile=TILE, batch_size=5, edge="pad"))
    assert [k for _, k in ta] == [k for _, k in tb] and all(torch.equal(a, b) for (a, _), (b, _) in zip(ta, tb))
    with pytest.raises(ValueError, match="pack"):
        make_train_loader(pindex, backend="dali", **kw)


def test_pack_skips_bad_sites_and_is_atomic(tmp_path):
    write_screen(str(tmp_path / "src"), n=4)
    index = SiteIndex.from_rxrx(str(tmp_path / "src"))
    with open(index[1].sources[2], "r+b") as f:
        f.truncate(300)
    out = str(tmp_path / "pack")
    with pytest.raises(DataError) as err:
        pack_index(index, out, tile=TILE)
    assert err.value.well == index[1].well_id and err.value.file == index[1].sources[2]
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith("pack")] == []  # no temporary folder left
    result = pack_index(index, out, tile=TILE, on_error="skip", codec="raw")
    assert result.n_sites == 3 and dict(result.summary.counts) == {"corrupt_image": 1}
    pindex = SiteIndex.from_pack(out)
    assert len(pindex) == 3 and dict(pindex.summary.counts) == {"corrupt_image": 1}  # the pack remembers
    assert pindex.summary.skipped[0].well == index[1].well_id
    with pytest.raises(FileExistsError):
        pack_index(index, out, tile=TILE, on_error="skip")


def test_corrupt_shard_names_the_shard_and_well(tmp_path):
    write_screen(str(tmp_path / "src"), n=2)
    out = str(tmp_path / "pack")
    pack_index(SiteIndex.from_rxrx(str(tmp_path / "src")), out, tile=TILE)
    pindex = SiteIndex.from_pack(out)
    shard = os.path.join(out, "shard-00000.bin")
    with open(shard, "r+b") as f:
        f.seek(pindex[1].packed.start + 20)
        f.write(b"\xff" * 64)
    with pytest.raises(DataError) as err:
        load_site(pindex[1], dtype=np.uint16).full()
    assert err.value.reason == "corrupt_image" and err.value.well == pindex[1].well_id and shard in err.value.file
    os.remove(shard)
    with pytest.raises(DataError) as err:
        load_site(pindex[0])
    assert err.value.reason == "missing_file"


def test_pack_cli(tmp_path):
    write_screen(str(tmp_path / "src"), n=3)
    parser = argparse.ArgumentParser()
    pack_cli.add_arguments(parser)
    out = str(tmp_path / "p")
    args = parser.parse_args(["--source", str(tmp_path / "src"), "--out", out, "--tile", "32", "--workers", "0",
                              "--plate", "1"])
    assert pack_cli.run(args) == 0
    pindex = SiteIndex.from_pack(out)
    assert len(pindex) == 2 and {s.plate for s in pindex} == {"1"}
