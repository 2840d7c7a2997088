"""Dataset readers (RxRx1, RxRx3, RxRx3-core parquet, JUMP), selection, ordering, sharding, and the index-level
bad inputs: missing channel file, metadata row without files, files without metadata rows, duplicate keys."""
import io
import os
import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mae_fast.data.errors import DataError
from mae_fast.data.index import SiteIndex
from mae_fast.data.sites import natural_key
from mae_fast.data.loader import make_val_loader
from mae_fast.data.loading import load_site

RXRX3_HEADER = "well_id,experiment_name,plate,address,gene,treatment,SMILES,concentration,perturbation_type,cell_type"


def write_png(path, array):
    Image.fromarray(array).save(path)


def make_rxrx3(root, wells, channels=3, size=(24, 20), dtype=np.uint16, seed=0, shuffle_order=True):
    """wells: list of (experiment, plate, address, gene). Files are written in a random order."""
    rng = np.random.default_rng(seed)
    jobs = []
    rows = []
    for exp, plate, address, gene in wells:
        folder = os.path.join(root, "images", exp, f"Plate{plate}")
        os.makedirs(folder, exist_ok=True)
        for c in range(1, channels + 1):
            jobs.append((os.path.join(folder, f"{address}_s1_w{c}.png"), rng.integers(1, 60000, size, dtype=np.uint16).astype(dtype)))
        rows.append(f"{exp}_{plate}_{address},{exp},{plate},{address},{gene},{gene}_g1,,,CRISPR,HUVEC")
    if shuffle_order:
        random.Random(seed).shuffle(jobs)
    for path, array in jobs:
        write_png(path, array)
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.write(RXRX3_HEADER + "\n" + "\n".join(rows) + "\n")
    return rows


WELLS = [("exp-2", 10, "B10", "EMPTY_control"), ("exp-2", 2, "B02", "G1"), ("exp-10", 1, "A03", "G2"),
         ("exp-2", 2, "A11", "G1"), ("exp-2", 2, "A2", "G3"), ("exp-1", 1, "P24", "CRISPR_control")]


def test_rxrx3_layout_metadata_order_and_channels(tmp_path):
    make_rxrx3(str(tmp_path), WELLS)
    index = SiteIndex.from_rxrx(str(tmp_path))
    assert len(index) == 6 and not index.summary
    # natural order: exp-1 < exp-2 < exp-10; Plate2 < Plate10; A2 < A11 < B02
    assert [s.well_id for s in index] == ["exp-1_1_P24", "exp-2_2_A2", "exp-2_2_A11", "exp-2_2_B02", "exp-2_10_B10", "exp-10_1_A03"]
    site = index[3]
    assert site.channels == ("w1", "w2", "w3") and site.site == 1 and site.plate == "2" and site.address == "B02"
    assert [os.path.basename(p) for p in site.sources] == ["B02_s1_w1.png", "B02_s1_w2.png", "B02_s1_w3.png"]
    assert site.perturbation == "G1" and site.metadata["treatment"] == "G1_g1" and site.metadata["cell_type"] == "HUVEC"
    assert index.dtype == np.uint16
    frame = index.metadata_frame()
    assert list(frame["well_id"]) == [s.well_id for s in index] and "gene" in frame.columns


def test_order_does_not_depend_on_file_creation_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_rxrx3(str(a), WELLS, seed=1)
    make_rxrx3(str(b), WELLS[::-1], seed=2)
    assert [s.key for s in SiteIndex.from_rxrx(str(a))] == [s.key for s in SiteIndex.from_rxrx(str(b))]


def test_natural_key():
    assert sorted(["Plate10", "Plate2", "Plate1"], key=natural_key) == ["Plate1", "Plate2", "Plate10"]


def test_select_and_shard(tmp_path):
    make_rxrx3(str(tmp_path), WELLS)
    index = SiteIndex.from_rxrx(str(tmp_path))
    assert len(index.select(experiment="exp-2")) == 4
    assert len(index.select(experiment="exp-2", plate=2)) == 3  # int matches the "2" of the folder name
    assert len(index.select(perturbation=["EMPTY_control", "CRISPR_control"])) == 2
    assert [s.well_id for s in index.select(well="A03")] == ["exp-10_1_A03"]
    assert len(index.select(where=lambda s: s.address.startswith("A"))) == 3
    assert len(index.select(experiment="nope")) == 0
    for world in (1, 2, 4, 7):
        shards = [index.shard(r, world) for r in range(world)]
        keys = [s.key for sh in shards for s in sh]
        assert sorted(keys) == sorted(s.key for s in index)  # every site exactly once
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        index.shard(2, 2)


def test_rxrx1_schema_two_sites_per_well_no_images_folder(tmp_path):
    rows = []
    rng = np.random.default_rng(0)
    for exp, plate, well, sirna in [("HEPG2-01", 1, "B03", "sirna_12"), ("HEPG2-01", 2, "C04", "EMPTY")]:
        folder = tmp_path / exp / f"Plate{plate}"
        folder.mkdir(parents=True, exist_ok=True)
        for site in (1, 2):
            for c in range(1, 7):
                write_png(str(folder / f"{well}_s{site}_w{c}.png"), rng.integers(0, 255, (16, 16), dtype=np.uint8))
            rows.append(f"{exp}_{plate}_{well}_{site},{exp}_{plate}_{well},HEPG2,train,{exp},{plate},{well},{site},treatment,{sirna}")
    (tmp_path / "metadata.csv").write_text("site_id,well_id,cell_type,dataset,experiment,plate,well,site,well_type,sirna\n"
                                           + "\n".join(rows) + "\n")
    index = SiteIndex.from_rxrx(str(tmp_path))
    assert len(index) == 4 and not index.summary
    assert [s.key for s in index][:2] == [("HEPG2-01_1_B03", 1), ("HEPG2-01_1_B03", 2)]
    assert index[0].channels == tuple(f"w{c}" for c in range(1, 7))
    assert index[0].perturbation == "sirna_12" and index[0].metadata["site_id"] == "HEPG2-01_1_B03_1"
    assert index.dtype == np.uint8


def test_files_only_without_metadata(tmp_path):
    make_rxrx3(str(tmp_path), WELLS[:2])
    os.remove(tmp_path / "metadata.csv")
    index = SiteIndex.from_rxrx(str(tmp_path))
    assert len(index) == 2 and index[0].perturbation is None
    assert index[0].metadata["address"] == index[0].address


def test_unrecognised_files_are_listed_not_dropped_silently(tmp_path):
    make_rxrx3(str(tmp_path), WELLS[:2])
    (tmp_path / "images" / "exp-2" / "Plate10" / "notes.txt").write_text("x")
    (tmp_path / "images" / "exp-2" / "thumbs").mkdir()
    index = SiteIndex.from_rxrx(str(tmp_path))
    assert len(index) == 2
    assert sorted(os.path.basename(p) for p in index.summary.ignored_files) == ["notes.txt", "thumbs"]


# -- index-level bad input --------------------------------------------------------------------------------------


def test_missing_channel_file(tmp_path):
    make_rxrx3(str(tmp_path), WELLS)
    os.remove(tmp_path / "images" / "exp-2" / "Plate2" / "B02_s1_w2.png")
    with pytest.raises(DataError) as err:
        SiteIndex.from_rxrx(str(tmp_path))
    assert err.value.reason == "missing_file" and err.value.well == "exp-2_2_B02"
    assert err.value.file.endswith("B02_s1_w2.png") and "B02_s1_w2.png" in str(err.value)
    index = SiteIndex.from_rxrx(str(tmp_path), on_error="skip")
    assert len(index) == 5 and dict(index.summary.counts) == {"missing_file": 1}
    assert index.summary.skipped[0].well == "exp-2_2_B02"


def test_metadata_row_without_files(tmp_path):
    make_rxrx3(str(tmp_path), WELLS)
    with open(tmp_path / "metadata.csv", "a") as f:
        f.write("exp-2_2_H07,exp-2,2,H07,G9,G9_g1,,,CRISPR,HUVEC\n")
    with pytest.raises(DataError) as err:
        SiteIndex.from_rxrx(str(tmp_path))
    assert err.value.reason == "no_files" and err.value.well == "exp-2_2_H07" and err.value.file.endswith("metadata.csv")
    index = SiteIndex.from_rxrx(str(tmp_path), on_error="skip")
    assert len(index) == 6 and dict(index.summary.counts) == {"no_files": 1}


def test_files_without_metadata_row(tmp_path):
    make_rxrx3(str(tmp_path), WELLS)
    folder = tmp_path / "images" / "exp-2" / "Plate2"
    for c in (1, 2, 3):
        write_png(str(folder / f"O05_s1_w{c}.png"), np.ones((24, 20), np.uint16))
    with pytest.raises(DataError) as err:
        SiteIndex.from_rxrx(str(tmp_path))
    assert err.value.reason == "no_metadata" and err.value.well == "exp-2_2_O05" and "O05_s1_w1.png" in err.value.file
    index = SiteIndex.from_rxrx(str(tmp_path), on_error="skip")
    assert len(index) == 6 and dict(index.summary.counts) == {"no_metadata": 1}


def test_duplicate_metadata_rows(tmp_path):
    make_rxrx3(str(tmp_path), WELLS)
    with open(tmp_path / "metadata.csv", "a") as f:
        f.write("exp-2_2_B02,exp-2,2,B02,G7,G7_g1,,,CRISPR,HUVEC\n")
    with pytest.raises(DataError) as err:
        SiteIndex.from_rxrx(str(tmp_path))
    assert err.value.reason == "duplicate_key" and err.value.well == "exp-2_2_B02"
    index = SiteIndex.from_rxrx(str(tmp_path), on_error="skip")
    assert "exp-2_2_B02" not in {s.well_id for s in index}  # ambiguous: neither row is trusted
    assert len(index) == 5 and dict(index.summary.counts) == {"duplicate_key": 1}


def test_duplicate_channel_files(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="tifffile is not installed")
    make_rxrx3(str(tmp_path), WELLS)
    folder = tmp_path / "images" / "exp-2" / "Plate2"
    tifffile.imwrite(str(folder / "A11_s1_w3.tif"), np.ones((24, 20), np.uint16))
    with pytest.raises(DataError) as err:
        SiteIndex.from_rxrx(str(tmp_path))
    assert err.value.reason == "duplicate_key" and err.value.well == "exp-2_2_A11"
    assert "A11_s1_w3.png" in str(err.value) and "A11_s1_w3.tif" in str(err.value)
    index = SiteIndex.from_rxrx(str(tmp_path), on_error="skip")
    assert len(index) == 5 and dict(index.summary.counts) == {"duplicate_key": 1}


def test_metadata_csv_with_unknown_schema(tmp_path):
    make_rxrx3(str(tmp_path), WELLS[:1])
    (tmp_path / "metadata.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="RxRx1 metadata columns"):
        SiteIndex.from_rxrx(str(tmp_path))


# -- RxRx3-core parquet -----------------------------------------------------------------------------------------


def jp2_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG2000", irreversible=False)  # lossless 5/3 wavelet
    return buf.getvalue()


@pytest.fixture(scope="module")
def core_parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    rng = np.random.default_rng(4)
    images, keys, blobs = {}, [], []
    for exp, plate, address in [("gene-079", 3, "K20"), ("gene-001", 1, "B02"), ("gene-001", 1, "AA03")]:
        image = rng.integers(0, 256, (3, 40, 36), dtype=np.uint8)
        images[f"{exp}_{plate}_{address}"] = image
        for c in (3, 1, 2):  # rows in any order
            keys.append(f"{exp}/Plate{plate}/{address}_s1_{c}")
            blobs.append(jp2_bytes(image[c - 1]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    half = len(keys) // 2
    paths = []
    for i, sl in enumerate((slice(0, half), slice(half, None))):
        path = str(root / f"train-{i:05d}.parquet")
        pq.write_table(pa.table({"__key__": keys[sl], "jp2": blobs[sl]}), path, row_group_size=4)
        paths.append(path)
    meta = root / "metadata.csv"
    meta.write_text(RXRX3_HEADER + "\n" + "\n".join(
        f"{w},{w.split('_')[0]},{w.split('_')[1]},{w.split('_')[2]},G{i},G{i}_g,,,CRISPR,HUVEC" for i, w in enumerate(images)) + "\n")
    return root, paths, images, str(meta)


@pytest.mark.parametrize("in_memory", [False, True])
def test_rxrx3_core_parquet_with_real_jpeg2000(core_parquet, in_memory):
    root, paths, images, meta = core_parquet
    index = SiteIndex.from_rxrx3_core(str(root), metadata_csv=meta, in_memory=in_memory)
    assert len(index) == 3 and not index.summary and index.dtype == np.uint8
    assert [s.well_id for s in index] == ["gene-001_1_AA03", "gene-001_1_B02", "gene-079_3_K20"]
    assert index[1].perturbation == "G1" and index[0].channels == ("w1", "w2", "w3")
    for site in index:
        image = load_site(site, dtype=np.uint8)
        assert np.array_equal(image.full(), images[site.well_id])  # channel order follows the key, not row order
    batches = list(make_val_loader(index, crop_size=32, batch_size=2, backend="torch", num_workers=0))
    assert sum(len(b) for b in batches) == 3


def test_rxrx3_core_duplicate_key_and_bad_key(tmp_path, core_parquet):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, paths, _, _ = core_parquet
    table = pq.read_table(paths[0])
    extra = pa.table({"__key__": [table["__key__"][0].as_py(), "not a key"], "jp2": [table["jp2"][0].as_py()] * 2})
    pq.write_table(pa.concat_tables([table, extra]), str(tmp_path / "dup.parquet"))
    with pytest.raises(DataError) as err:
        SiteIndex.from_rxrx3_core(str(tmp_path / "dup.parquet"))
    assert err.value.reason == "duplicate_key"
    index = SiteIndex.from_rxrx3_core(str(tmp_path / "dup.parquet"), on_error="skip")
    assert index.summary.counts["duplicate_key"] == 1 and len(index.summary.ignored_files) == 1


# -- JUMP -------------------------------------------------------------------------------------------------------


@pytest.fixture()
def jump_table(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="tifffile is not installed")
    rng = np.random.default_rng(7)
    rows, images = [], {}
    for plate, well, site in [("BR001", "A01", 1), ("BR001", "A01", 2), ("BR002", "P24", 1)]:
        folder = tmp_path / "images" / plate
        folder.mkdir(parents=True, exist_ok=True)
        row = {"Metadata_Source": "source_4", "Metadata_Batch": "2021_04_26", "Metadata_Plate": plate,
               "Metadata_Well": well, "Metadata_Site": site, "Metadata_JCP2022": f"JCP2022_{well}"}
        image = {}
        for name in ("Mito", "DNA", "AGP", "ER", "RNA"):
            fname = f"{plate}_{well}_s{site}_{name}.tiff"
            image[name] = rng.integers(0, 65535, (30, 28), dtype=np.uint16)
            tifffile.imwrite(str(folder / fname), image[name])
            row[f"FileName_Orig{name}"] = fname
            row[f"PathName_Orig{name}"] = str(folder)
        rows.append(row)
        images[(f"source_4_{plate}_{well}", site)] = image
    return pd.DataFrame(rows), images


def test_jump_channels_mapped_by_name(jump_table, tmp_path):
    df, images = jump_table
    index = SiteIndex.from_jump(df)
    assert len(index) == 3 and index.channels == ("DNA", "ER", "RNA", "AGP", "Mito")
    assert index[0].well_id == "source_4_BR001_A01" and index[0].perturbation == "JCP2022_A01"
    assert index[0].experiment == "2021_04_26" and index.dtype == np.uint16
    for site in index:
        got = load_site(site, dtype=np.uint16).full()
        assert np.array_equal(got, np.stack([images[site.key][n] for n in index.channels]))
    # Recursion-like order chosen by name; a CSV path works too
    df.to_csv(tmp_path / "load_data.csv", index=False)
    order = {"DNA": "FileName_OrigDNA", "ER": "FileName_OrigER", "AGP": "FileName_OrigAGP",
             "RNA": "FileName_OrigRNA", "Mito": "FileName_OrigMito"}
    other = SiteIndex.from_jump(str(tmp_path / "load_data.csv"), order)
    assert other.channels == ("DNA", "ER", "AGP", "RNA", "Mito")
    got = load_site(other[2], dtype=np.uint16).full()
    assert np.array_equal(got, np.stack([images[other[2].key][n] for n in other.channels]))
    with pytest.raises(ValueError, match="FileName_OrigXYZ"):
        SiteIndex.from_jump(df, ["DNA", "XYZ"])


def test_jump_bad_rows(jump_table):
    df, _ = jump_table
    df = pd.concat([df, df.iloc[[0]]], ignore_index=True)  # duplicate plate/well/site
    with pytest.raises(DataError) as err:
        SiteIndex.from_jump(df)
    assert err.value.reason == "duplicate_key" and err.value.well == "BR001_A01"
    df = df.iloc[:3].copy()
    df.loc[1, "FileName_OrigER"] = np.nan                     # one channel without a file name
    df.loc[2, [f"FileName_Orig{n}" for n in ("DNA", "ER", "RNA", "AGP", "Mito")]] = np.nan  # a row without files
    os.remove(os.path.join(df.loc[0, "PathName_OrigRNA"], df.loc[0, "FileName_OrigRNA"]))  # file gone
    with pytest.raises(DataError) as err:
        SiteIndex.from_jump(df)
    assert err.value.reason == "missing_file" and err.value.file.endswith("_RNA.tiff")
    index = SiteIndex.from_jump(df, on_error="skip")
    assert len(index) == 0
    assert dict(index.summary.counts) == {"missing_file": 2, "no_files": 1}


def test_dataerror_pickles_for_worker_processes():
    import pickle

    err = DataError("corrupt_image", "bad", "w1", "/x.png")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.well, back.file, str(back)) == ("corrupt_image", "w1", "/x.png", str(err))
    with pytest.raises(ValueError):
        DataError("nonsense", "x")
