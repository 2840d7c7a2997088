"""Training/validation crop loaders: crops equal the source slices, flips, channel order, 16-bit values,
determinism, sharding, exact mid-epoch resume, torch == DALI, and skip-mode refilling."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.data.crops import TrainPlan, sample_boxes
from mae_fast.data.dali import dali_available
from mae_fast.data.errors import DataError
from mae_fast.data.index import SiteIndex
from mae_fast.data.loader import make_train_loader, make_val_loader

CHANNELS = 3
CROP = 32


def write_png(path, array):
    Image.fromarray(array).save(path)  # uint16 -> 16-bit grayscale PNG (mode I;16), uint8 -> 8-bit


def write_rxrx3(root, n_wells, size, dtype, seed, channels=CHANNELS):
    """RxRx3 layout with random pixels; returns {well_id: (C, H, W) array}."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    images, rows = {}, []
    for i in range(n_wells):
        exp, plate = f"exp-{i % 2 + 1}", i // 6 + 1
        address = f"{'BCDEFG'[i % 6]}{i // 2 % 9 + 2:02d}"
        folder = os.path.join(root, "images", exp, f"Plate{plate}")
        os.makedirs(folder, exist_ok=True)
        h, w = size if not callable(size) else size(i)
        image = rng.integers(0, top, (channels, h, w), dtype=dtype, endpoint=True)
        for c in range(channels):
            write_png(os.path.join(folder, f"{address}_s1_w{c + 1}.png"), image[c])
        well_id = f"{exp}_{plate}_{address}"
        images[well_id] = image
        rows.append(f"{well_id},{exp},{plate},{address},G{i % 4},G{i % 4}_guide,,,CRISPR,HUVEC")
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.write("well_id,experiment_name,plate,address,gene,treatment,SMILES,concentration,perturbation_type,cell_type\n")
        f.write("\n".join(rows) + "\n")
    return images


@pytest.fixture(scope="module")
def screen16(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("screen16"))
    # odd sizes, different per site (sizes only need to agree within a site)
    images = write_rxrx3(root, 11, lambda i: (45 + 3 * i, 53 + 5 * (i % 3)), np.uint16, seed=1)
    return SiteIndex.from_rxrx(root), images


def collect(loader):
    return [(b.clone(), info) for b, info in loader]


def expected_crop(image, y, x, hflip, vflip):
    crop = image[:, y:y + CROP, x:x + CROP]
    if hflip:
        crop = crop[:, :, ::-1]
    if vflip:
        crop = crop[:, ::-1, :]
    return crop


def test_crops_equal_source_slices_with_flips_channels_and_16bit(screen16):
    index, images = screen16
    loader = make_train_loader(index, crop_size=CROP, batch_size=6, crops_per_image=3, seed=5, backend="torch",
                               num_workers=0, return_info=True)
    batches = collect(loader)
    assert len(batches) == len(index) * 3 // 6
    flips = set()
    for batch, info in batches:
        assert batch.dtype == torch.uint16 and batch.shape == (6, CHANNELS, CROP, CROP)
        for i in range(len(batch)):
            image = images[index[int(info.site_index[i])].well_id]
            want = expected_crop(image, info.y[i], info.x[i], info.hflip[i], info.vflip[i])
            assert np.array_equal(batch[i].numpy(), want)
            flips.add((bool(info.hflip[i]), bool(info.vflip[i])))
    assert flips == {(False, False), (True, False), (False, True), (True, True)}  # every flip combination occurs
    values = torch.cat([b for b, _ in batches]).numpy()
    assert values.max() > 255 and values.dtype == np.uint16  # 16-bit range kept, no rescaling


def test_flip_direction_and_channel_order(tmp_path):
    """A gradient image tells left-right from top-bottom and a per-channel constant tells the channel order."""
    h, w = 40, 48
    yy, xx = np.mgrid[0:h, 0:w]
    folder = tmp_path / "images" / "e" / "Plate1"
    folder.mkdir(parents=True)
    for c in range(CHANNELS):
        plane = (1000 * (c + 1) + 10 * yy + xx).astype(np.uint16)
        write_png(str(folder / f"B02_s1_w{c + 1}.png"), plane)
    index = SiteIndex.from_rxrx(str(tmp_path))
    loader = make_train_loader(index, crop_size=CROP, batch_size=1, crops_per_image=16, seed=0, backend="torch",
                               num_workers=0, return_info=True)
    seen = set()
    for batch, info in loader:
        crop = batch[0].numpy().astype(np.int64)
        for c in range(CHANNELS):
            assert crop[c].min() // 1000 == c + 1  # channel c holds file w{c+1}
        dx = crop[0, 0, 1] - crop[0, 0, 0]
        dy = crop[0, 1, 0] - crop[0, 0, 0]
        assert dx == (-1 if info.hflip[0] else 1)   # horizontal flip reverses columns
        assert dy == (-10 if info.vflip[0] else 10)  # vertical flip reverses rows
        seen.add((bool(info.hflip[0]), bool(info.vflip[0])))
    assert len(seen) == 4


def test_same_seed_same_batches_other_seed_differs(screen16):
    index, _ = screen16
    kw = dict(crop_size=CROP, batch_size=4, crops_per_image=2, backend="torch", num_workers=0)
    a = [b for b in make_train_loader(index, seed=3, **kw)]
    b = [b for b in make_train_loader(index, seed=3, **kw)]
    c = [b for b in make_train_loader(index, seed=4, **kw)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_worker_processes_give_the_same_batches(screen16):
    index, _ = screen16
    kw = dict(crop_size=CROP, batch_size=5, crops_per_image=2, seed=9, backend="torch")
    a = [b for b in make_train_loader(index, num_workers=0, **kw)]
    b = [b for b in make_train_loader(index, num_workers=2, **kw)]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_box_sampling_is_independent_of_rank_and_in_bounds(screen16):
    index, _ = screen16
    site = index[3]
    b1 = sample_boxes(1, 2, site, 50, 70, 90, CROP)
    b2 = sample_boxes(1, 2, site, 50, 70, 90, CROP)
    b3 = sample_boxes(1, 3, site, 50, 70, 90, CROP)
    assert np.array_equal(b1.y, b2.y) and np.array_equal(b1.x, b2.x)
    assert not np.array_equal(b1.y, b3.y)
    assert b1.y.min() >= 0 and b1.y.max() <= 70 - CROP and b1.x.max() <= 90 - CROP
    exact = sample_boxes(0, 0, site, 20, CROP, CROP, CROP)  # image == crop: the only box is (0, 0)
    assert (exact.y == 0).all() and (exact.x == 0).all()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sharding_covers_every_site_once_and_ranks_agree_on_length(world_size):
    n_sites, k, batch = 23, 3, 4
    sites, steps = [], set()
    for rank in range(world_size):
        plan = TrainPlan(n_sites, batch, k, shuffle_sites=5, seed=1, epoch=2, rank=rank, world_size=world_size)
        sites.extend(plan.site_positions.tolist())
        steps.add(plan.steps)
        emitted = sum(len(w.slot_crop) for w in plan.windows)
        assert emitted == plan.steps * batch
    assert sorted(sites) == list(range(n_sites))  # each site on exactly one rank
    assert len(steps) == 1  # every rank yields the same number of batches (no DDP hang)


def test_sharded_loaders_partition_the_epoch(screen16):
    index, _ = screen16
    kw = dict(crop_size=CROP, batch_size=2, crops_per_image=2, seed=2, backend="torch", num_workers=0,
              return_info=True, world_size=2)
    per_rank = [collect(make_train_loader(index, rank=r, **kw)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    sites = [set(np.concatenate([i.site_index for _, i in batches]).tolist()) for batches in per_rank]
    assert not sites[0] & sites[1]


def test_window_shuffle_mixes_sites_within_a_batch(screen16):
    index, _ = screen16
    loader = make_train_loader(index, crop_size=CROP, batch_size=8, crops_per_image=8, seed=0, backend="torch",
                               num_workers=0, return_info=True, shuffle_sites=4)
    for _, info in loader:
        assert len(set(info.site_index.tolist())) > 1


def test_resume_mid_epoch_is_exact(screen16):
    index, _ = screen16
    kw = dict(crop_size=CROP, batch_size=3, crops_per_image=2, seed=11, backend="torch", num_workers=0, shuffle_sites=3)
    full = make_train_loader(index, **kw)
    full.set_epoch(1)
    reference = [b.clone() for b in full]
    first = make_train_loader(index, **kw)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it).clone() for _ in range(4)]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 4
    resumed = make_train_loader(index, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer's loop calls this again after loading: must not restart the epoch
    tail = [b.clone() for b in resumed]
    assert len(head) + len(tail) == len(reference)
    assert all(torch.equal(x, y) for x, y in zip(head + tail, reference))
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batch"] == 0  # epoch done -> next epoch


def test_a_closed_shard_stream_ends_its_workers_and_continues_where_it_stopped(screen16):
    import multiprocessing

    from mae_fast.training.data import ShardStream

    index, _ = screen16
    kw = dict(crop_size=CROP, batch_size=3, crops_per_image=2, seed=11, backend="torch", shuffle_sites=3)
    reference = ShardStream(make_train_loader(index, num_workers=0, **kw))
    expected = [reference.next().clone() for _ in range(9)]  # past the epoch's end (22 crops // 3 = 7 batches)
    stream = ShardStream(make_train_loader(index, num_workers=1, **kw))
    got = [stream.next().clone() for _ in range(2)]
    assert multiprocessing.active_children()  # the DataLoader worker
    stream.close()
    stream.close()  # nothing live: a no-op
    assert stream._it is None and not multiprocessing.active_children()
    got += [stream.next().clone() for _ in range(7)]
    stream.close()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_load_state_dict_rejects_other_settings(screen16):
    index, _ = screen16
    a = make_train_loader(index, crop_size=CROP, batch_size=3, crops_per_image=2, seed=1, backend="torch", num_workers=0)
    b = make_train_loader(index, crop_size=CROP, batch_size=4, crops_per_image=2, seed=1, backend="torch", num_workers=0)
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(a.state_dict())
    c = make_train_loader(index.select(experiment="exp-1"), crop_size=CROP, batch_size=3, crops_per_image=2, seed=1,
                          backend="torch", num_workers=0)
    with pytest.raises(ValueError, match="n_sites|index"):
        c.load_state_dict(a.state_dict())


def test_epochs_differ_and_epoch_advances(screen16):
    index, _ = screen16
    loader = make_train_loader(index, crop_size=CROP, batch_size=4, crops_per_image=2, seed=1, backend="torch", num_workers=0)
    e0 = [b.clone() for b in loader]
    assert loader.epoch == 1
    e1 = [b.clone() for b in loader]
    assert not all(torch.equal(x, y) for x, y in zip(e0, e1))


def test_val_loader_centre_crops_all_sites_in_order(screen16):
    index, images = screen16
    for world_size in (1, 2):
        seen = []
        for rank in range(world_size):
            loader = make_val_loader(index, crop_size=CROP, batch_size=4, rank=rank, world_size=world_size,
                                     backend="torch", num_workers=0, return_info=True)
            for batch, info in loader:
                for i in range(len(batch)):
                    site = index[int(info.site_index[i])]
                    image = images[site.well_id]
                    y, x = (image.shape[1] - CROP) // 2, (image.shape[2] - CROP) // 2
                    assert not info.hflip[i] and not info.vflip[i]
                    assert np.array_equal(batch[i].numpy(), image[:, y:y + CROP, x:x + CROP])
                    seen.append(int(info.site_index[i]))
        assert sorted(seen) == list(range(len(index)))


def test_default_crops_per_image_from_image_size(tmp_path):
    write_rxrx3(str(tmp_path), 4, (130, 100), np.uint8, seed=0)
    index = SiteIndex.from_rxrx(str(tmp_path))
    assert make_train_loader(index, crop_size=CROP, batch_size=2, backend="torch", num_workers=0).k == 12  # 4 x 3 fit
    assert make_train_loader(index, crop_size=16, batch_size=2, backend="torch", num_workers=0).k == 16  # capped


def test_epoch_without_a_batch_is_an_error(screen16):
    index, _ = screen16
    with pytest.raises(ValueError, match="no batch"):
        make_train_loader(index, crop_size=CROP, batch_size=1000, crops_per_image=1, backend="torch", num_workers=0)


# -- bad input during training ----------------------------------------------------------------------------------


@pytest.fixture()
def screen_with_bad_sites(tmp_path):
    images = write_rxrx3(str(tmp_path), 8, (48, 50), np.uint16, seed=3)
    index = SiteIndex.from_rxrx(str(tmp_path))
    corrupt = index[2].sources[1]
    with open(corrupt, "r+b") as f:  # truncate the file: header intact, pixels cut
        f.truncate(os.path.getsize(corrupt) // 2)
    small = index[5]
    for c, path in enumerate(small.sources):
        write_png(path, images[small.well_id][c][:20, :20])  # all channels smaller than the crop
    return index, images, corrupt, small


def test_bad_site_raises_with_file_and_well(screen_with_bad_sites):
    index, _, corrupt, _ = screen_with_bad_sites
    loader = make_train_loader(index, crop_size=CROP, batch_size=4, crops_per_image=2, seed=0, backend="torch", num_workers=0)
    with pytest.raises(DataError) as err:
        list(loader)
    assert err.value.reason in ("corrupt_image", "too_small")
    assert err.value.well in (index[2].well_id, index[5].well_id) and err.value.file


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_mode_refills_crops_and_counts_sites(screen_with_bad_sites, num_workers):
    index, images, corrupt, small = screen_with_bad_sites
    loader = make_train_loader(index, crop_size=CROP, batch_size=4, crops_per_image=2, seed=0, backend="torch",
                               num_workers=num_workers, on_error="skip", return_info=True, shuffle_sites=4)
    batches = collect(loader)
    assert len(batches) == len(index) * 2 // 4  # full epoch length kept
    assert all(len(b) == 4 for b, _ in batches)
    assert loader.summary.counts == {"corrupt_image": 1, "too_small": 1}
    assert {s.well for s in loader.summary.skipped} == {index[2].well_id, small.well_id}
    assert any(s.file == corrupt for s in loader.summary.skipped)
    assert loader.summary.replaced_crops == 4
    bad = {2, 5}
    for batch, info in batches:  # refilled crops are real crops of good sites
        assert not bad & set(info.site_index.tolist())
        for i in range(len(batch)):
            image = images[index[int(info.site_index[i])].well_id]
            assert np.array_equal(batch[i].numpy(), expected_crop(image, info.y[i], info.x[i], info.hflip[i], info.vflip[i]))


def test_val_skip_mode_drops_bad_sites(screen_with_bad_sites):
    index, _, _, _ = screen_with_bad_sites
    loader = make_val_loader(index, crop_size=CROP, batch_size=3, backend="torch", num_workers=0, on_error="skip",
                             return_info=True)
    seen = [int(s) for _, info in loader for s in info.site_index]
    assert sorted(seen) == [i for i in range(len(index)) if i not in (2, 5)]
    assert loader.summary.total == 2


# -- DALI ------------------------------------------------------------------------------------------------------

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")


@needs_dali
def test_dali_cpu_pipeline_equals_torch_path(screen16):
    index, _ = screen16
    kw = dict(crop_size=CROP, batch_size=4, crops_per_image=3, seed=21, num_workers=0, return_info=True, shuffle_sites=4)
    ref = collect(make_train_loader(index, backend="torch", **kw))
    dali = make_train_loader(index, backend="dali", **kw)
    assert dali.backend == "dali"
    out = collect(dali)
    assert len(ref) == len(out)
    for (a, ia), (b, ib) in zip(ref, out):
        assert b.dtype == torch.uint16 and b.device.type == "cpu"
        assert torch.equal(a, b)
        assert np.array_equal(ia.site_index, ib.site_index) and np.array_equal(ia.y, ib.y) and np.array_equal(ia.hflip, ib.hflip)
    val_t = [b for b in make_val_loader(index, crop_size=CROP, batch_size=4, backend="torch", num_workers=0)]
    val_d = [b for b in make_val_loader(index, crop_size=CROP, batch_size=4, backend="dali", num_workers=0)]
    assert all(torch.equal(a, b) for a, b in zip(val_t, val_d))


@needs_dali
def test_dali_skip_mode_names_the_truncated_file(screen_with_bad_sites):
    index, _, corrupt, small = screen_with_bad_sites
    kw = dict(crop_size=CROP, batch_size=4, crops_per_image=2, seed=0, num_workers=0, on_error="skip", shuffle_sites=4)
    ref = [b for b in make_train_loader(index, backend="torch", **kw)]
    loader = make_train_loader(index, backend="dali", **kw)
    out = [b for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(ref, out)) and len(ref) == len(out)
    assert loader.summary.counts == {"corrupt_image": 1, "too_small": 1}
    assert any(s.file == corrupt for s in loader.summary.skipped)
    with pytest.raises(DataError) as err:
        list(make_train_loader(index, backend="dali", **{**kw, "on_error": "raise"}))
    assert err.value.well in (index[2].well_id, small.well_id)


def test_backend_choice(screen16):
    index, _ = screen16
    loader = make_train_loader(index, crop_size=CROP, batch_size=4, crops_per_image=2, backend="auto", num_workers=0)
    assert loader.backend == "torch"  # CPU device: DataLoader workers (DALI is used for CUDA devices)
    with pytest.raises(ValueError, match="backend"):
        make_train_loader(index, crop_size=CROP, batch_size=4, crops_per_image=2, backend="nvjpeg", num_workers=0)


@needs_dali
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["png16", "jpeg", "jp2"])
def test_dali_mixed_gpu_decode_matches_cpu_crops(tmp_path, fmt):
    """GPU decoding (device="mixed"): same boxes as the CPU path; PNG (CPU-decoded inside DALI) and lossless
    JPEG 2000 bit-exact, JPEG within the IDCT differences of nvJPEG vs libjpeg-turbo."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images" / "e" / "Plate1"
    folder.mkdir(parents=True)
    for w in range(6):
        for c in range(CHANNELS):
            smooth = np.add.outer(np.arange(64), np.arange(72)) * (c + 1)
            if fmt == "png16":
                write_png(str(folder / f"B{w + 2:02d}_s1_w{c + 1}.png"), (smooth * 97 + rng.integers(0, 500, (64, 72))).astype(np.uint16))
            else:
                plane = ((smooth + rng.integers(0, 20, (64, 72))) % 256).astype(np.uint8)
                ext, kw = ("jpg", {"quality": 95}) if fmt == "jpeg" else ("jp2", {"irreversible": False})
                Image.fromarray(plane).save(str(folder / f"B{w + 2:02d}_s1_w{c + 1}.{ext}"), **kw)
    index = SiteIndex.from_rxrx(str(tmp_path))
    kw = dict(crop_size=CROP, batch_size=4, crops_per_image=2, seed=3, num_workers=0, return_info=True)
    cpu = collect(make_train_loader(index, backend="torch", device="cpu", **kw))
    gpu = make_train_loader(index, backend="dali", device="cuda", **kw)
    out = collect(gpu)
    assert len(cpu) == len(out)
    for (a, ia), (b, ib) in zip(cpu, out):
        assert b.device.type == "cuda" and b.dtype == a.dtype
        assert np.array_equal(ia.y, ib.y) and np.array_equal(ia.x, ib.x) and np.array_equal(ia.hflip, ib.hflip)
        diff = (a.cpu().to(torch.int32) - b.cpu().to(torch.int32)).abs()
        if fmt == "jpeg":
            assert diff.max() <= 4 and diff.float().mean() < 0.5
        else:
            assert diff.max() == 0
