"""`mae-fast embed` on a tiny synthetic screen: table schema, per-site/per-well means against tiles cut and embedded
here independently, resuming by plate, the three checkpoint kinds, and bad input."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mae_fast.cli import embed as embed_cli
from mae_fast.inference import tables as embed_tables
from mae_fast.checkpoint import CheckpointError, save_model
from mae_fast.interop import to_timm_state_dict
from mae_fast.evaluation import evaluate
from mae_fast.data.synthetic import METADATA_COLUMNS, SyntheticScreenConfig, make_synthetic_screen
from mae_fast.inference.embed import embed_dataset
from mae_fast.models import create_model
from mae_fast.training.config import ConfigError
from tests.helpers import openphenom_layout_state

TILE = 64


def _perturbed(name: str, **overrides):
    """A model with random (not initial) weights everywhere, so every loaded tensor matters."""
    torch.manual_seed(11)
    model = create_model(name, img_size=TILE, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    cfg = SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=2, complex_size=2, n_singletons=1,
                                n_empty_controls=1, n_crispr_controls=1, site_size=192, seed=7)
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), cfg)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    model = _perturbed("mae_vit_micro_patch16_256")
    path = str(tmp_path_factory.mktemp("ckpt") / "ours")
    save_model(model, path)
    return model, path


def _embed(checkpoint, screen, out, **kw):
    kw = {"num_workers": 0, "threads": 1, "progress": False, "batch_size": 20, "amp": "fp32", **kw}
    return embed_dataset(str(checkpoint), screen.root, str(out), **kw)


def _expected(model, screen, per_channel=False) -> dict[str, np.ndarray]:
    """Per well: the mean embedding of its 3x3 grid of 64-px tiles, decoded and cut here, not by the data layer."""
    meta = pd.read_csv(screen.metadata_csv)
    out = {}
    for row in meta.itertuples():
        folder = os.path.join(screen.images_dir, row.experiment_name, f"Plate{row.plate}")
        planes = [np.asarray(Image.open(os.path.join(folder, f"{row.address}_s1_w{c}.png"))) for c in range(1, 7)]
        image = torch.from_numpy(np.stack(planes))  # (6, 192, 192) uint8
        tiles = image.unfold(1, TILE, TILE).unfold(2, TILE, TILE)  # (6, 3, 3, 64, 64)
        tiles = tiles.permute(1, 2, 0, 3, 4).reshape(-1, 6, TILE, TILE)
        out[row.well_id] = model.embed(tiles, per_channel=per_channel).double().mean(0).numpy()
    return out


def _features(frame: pd.DataFrame) -> np.ndarray:
    return frame[[c for c in frame.columns if c.startswith("feature_")]].to_numpy()


def test_table_schema_and_means(screen, ours, tmp_path):
    model, path = ours
    result = _embed(path, screen, tmp_path / "emb.parquet", sites=True)
    wells = pd.read_parquet(result.out)
    meta = pd.read_csv(screen.metadata_csv)
    D = model.cfg.embed_dim
    assert list(wells.columns[:len(METADATA_COLUMNS)]) == list(METADATA_COLUMNS)
    assert list(wells.columns[-D:]) == [f"feature_{i}" for i in range(D)]
    assert all(wells[f"feature_{i}"].dtype == np.float32 for i in range(D))
    assert sorted(wells["well_id"]) == sorted(meta["well_id"]) and len(wells) == result.n_wells == 14
    assert (wells["n_tiles"] == 9).all() and (wells["n_sites"] == 1).all()
    assert result.n_tiles == 14 * 9 and result.dims == D
    merged = wells.merge(meta, on="well_id", suffixes=("", "_csv"))
    for column in ("gene", "treatment", "plate", "address", "experiment_name"):
        assert (merged[column] == merged[column + "_csv"]).all(), column
    # a well's embedding is the mean of its tiles' embeddings
    expected = _expected(model, screen)
    got = _features(wells)
    for i, well in enumerate(wells["well_id"]):
        np.testing.assert_allclose(got[i], expected[well], rtol=1e-4, atol=1e-5)
    sites = pd.read_parquet(result.sites_path)
    assert (sites["site"] == 1).all() and len(sites) == 14
    np.testing.assert_allclose(_features(sites.set_index("well_id").loc[wells["well_id"]]), got, rtol=1e-6)


def test_well_mean_is_over_all_tiles_of_all_sites():
    """Two sites of one well with different tile counts: the well is the tile-weighted mean."""
    from mae_fast.data.sites import Site

    sites = [Site("w1", s, "e", "1", "A01", "G", ("w1",), metadata={"well_id": "w1", "site": s}) for s in (1, 2)]
    sums = {("w1", 1): np.array([2.0, 4.0]), ("w1", 2): np.array([9.0, 3.0])}
    counts = {("w1", 1): 2, ("w1", 2): 3}
    table = embed_tables.plate_table(sites, sums, counts, 2)
    well = table[table["level"] == "well"]
    np.testing.assert_allclose(_features(well)[0], [11 / 5, 7 / 5])
    assert int(well["n_tiles"].iloc[0]) == 5 and "site" not in well.dropna(axis=1).columns
    np.testing.assert_allclose(_features(table[table["level"] == "site"]), [[1.0, 2.0], [3.0, 1.0]])


def test_rerun_skips_finished_plates_and_refuses_existing_output(screen, ours, tmp_path):
    path = str(tmp_path / "checkpoint")
    shutil.copytree(ours[1], path)  # this test rewrites its checkpoint
    out = tmp_path / "emb.parquet"
    first = _embed(path, screen, out)
    table = pd.read_parquet(out)
    parts = sorted(p for p in os.listdir(first.parts_dir) if p.endswith(".parquet"))
    assert len(parts) == 2 and first.plates_done == ["synth-001/Plate1", "synth-001/Plate2"]
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        _embed(path, screen, out)
    # as if killed after plate 1: its part stays, plate 2 and the merged table are gone
    kept = os.path.join(first.parts_dir, parts[0])
    stamp = os.stat(kept).st_mtime_ns
    os.remove(out)
    os.remove(os.path.join(first.parts_dir, parts[1]))
    second = _embed(path, screen, out)
    assert second.plates_skipped == ["synth-001/Plate1"] and second.plates_done == ["synth-001/Plate2"]
    assert second.n_tiles == 7 * 9 and os.stat(kept).st_mtime_ns == stamp
    pd.testing.assert_frame_equal(pd.read_parquet(out), table)
    # parts of other settings are not mixed in
    os.remove(out)
    with pytest.raises(ConfigError, match="parts of a run with other settings.*edge"):
        _embed(path, screen, out, edge="center")
    third = _embed(path, screen, out, overwrite=True, edge="center")
    assert third.plates_skipped == [] and len(third.plates_done) == 2
    # ... nor parts of other weights saved at the same path (a retrained checkpoint)
    os.remove(out)
    retrained = _perturbed("mae_vit_micro_patch16_256")
    with torch.no_grad():
        retrained.encoder.norm.bias.add_(0.01)
    save_model(retrained, path)
    with pytest.raises(ConfigError, match="other settings: weights"):
        _embed(path, screen, out, edge="center")


def test_openphenom_and_timm_checkpoints(screen, tmp_path):
    # OpenPhenom: a CA-MAE torch pickle named model.safetensors holding {"state_dict": ...} in its key layout
    # an OpenPhenom-layout checkpoint imports with the released code's computation (timm 0.9.7 bias routing, mean of
    # the un-normalised tokens): the model that wrote it must compute the same for the round trip to hold
    ca = _perturbed("camae_vit_micro_patch16_256", legacy_parallel_bias=True, pooling="openphenom", fc_norm=True)
    state = openphenom_layout_state(ca)
    folder = tmp_path / "openphenom"
    folder.mkdir()
    torch.save({"state_dict": state}, folder / "model.safetensors")
    pooled = _embed(folder, screen, tmp_path / "op.parquet")
    per_channel = _embed(folder, screen, tmp_path / "op_channels.parquet", per_channel=True)
    a, b = pd.read_parquet(pooled.out), pd.read_parquet(per_channel.out)
    assert per_channel.dims == 6 * 192 and a.shape[1] - 192 == b.shape[1] - 6 * 192
    expected = _expected(ca, screen, per_channel=True)
    for i, well in enumerate(b["well_id"]):
        np.testing.assert_allclose(_features(b)[i], expected[well], rtol=1e-4, atol=1e-5)
    # all CA tokens pooled = the mean of the per-channel means (equal tokens per channel, no norm after pooling)
    np.testing.assert_allclose(_features(b).reshape(len(b), 6, 192).mean(1), _features(a), rtol=1e-4, atol=1e-5)

    # timm: an encoder state dict file + the preset it was built from
    std = _perturbed("mae_vit_micro_patch16_256")
    timm_file = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in to_timm_state_dict(std).items()}, str(timm_file))
    r = _embed(timm_file, screen, tmp_path / "timm.parquet", preset="mae_vit_micro_patch16_256",
               model={"img_size": TILE})
    got = pd.read_parquet(r.out)
    expected = _expected(std, screen)
    for i, well in enumerate(got["well_id"]):
        np.testing.assert_allclose(_features(got)[i], expected[well], rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="give the preset"):
        _embed(timm_file, screen, tmp_path / "x.parquet")
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.2\."):
        _embed(timm_file, screen, tmp_path / "x.parquet", preset="mae_vit_micro_patch16_256",
               model={"img_size": TILE, "depth": 2})


@pytest.mark.parametrize("kwargs, message", [
    ({"per_channel": True}, "needs a channel-agnostic"),
    ({"plates": ["9"]}, "matches no site"),
    ({"channels": [1, 2, 3]}, "expects 6 channels, the dataset has 3"),
])
def test_bad_input_fails_before_work(screen, ours, tmp_path, kwargs, message):
    _, path = ours
    with pytest.raises(ConfigError, match=message):
        _embed(path, screen, tmp_path / "emb.parquet", **kwargs)
    assert not os.path.exists(tmp_path / "emb_parts")


def test_bf16_embeddings_agree_with_fp32_per_well(screen, ours, tmp_path):
    """bf16 autocast (amp=auto on CPUs with native bf16) against fp32, per well: cosine of the embeddings and of
    the embeddings centred on the mean well (what TVN's centring leaves to compare) -- median >= 0.999 each. At this
    toy size (micro ViT with perturbed weights, 14 wells of 9 tiles) the medians measure 0.99999+; the bound leaves
    room for a trained model's larger activations."""
    _, path = ours
    tables = {amp: pd.read_parquet(_embed(path, screen, tmp_path / f"{amp}.parquet", amp=amp).out)
              for amp in ("fp32", "bf16")}
    a, b = (_features(tables[amp]).astype(np.float64) for amp in ("fp32", "bf16"))
    assert not np.array_equal(a, b)  # bf16 really ran

    def cosine(x, y):
        return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)

    centre = a.mean(axis=0)
    assert np.median(cosine(a, b)) >= 0.999
    assert np.median(cosine(a - centre, b - centre)) >= 0.999 and cosine(a - centre, b - centre).min() >= 0.99


def test_block_wise_embeddings_in_one_table_with_a_block_column(screen, ours, tmp_path, capsys):
    """--blocks all: rows per (well, block), `block` first; the last block's rows are the plain table; the
    evaluation reads it as one source per block; a subset and the CLI's flag give the same rows; bad blocks and a
    CNN baseline are refused before any work."""
    model, path = ours
    depth = model.cfg.depth
    plain = pd.read_parquet(_embed(path, screen, tmp_path / "plain.parquet").out)
    result = _embed(path, screen, tmp_path / "blocks.parquet", blocks="all")
    table = pd.read_parquet(result.out)
    assert result.blocks == list(range(1, depth + 1)) and table.columns[0] == "block"
    assert len(table) == depth * len(plain) and sorted(table["block"].unique()) == result.blocks
    last = table[table["block"] == depth].drop(columns=["block"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(last, plain)
    first = _features(table[table["block"] == 1])
    assert not np.allclose(first, _features(plain))
    subset = pd.read_parquet(_embed(path, screen, tmp_path / "two.parquet", blocks=[depth, 1]).out)
    assert sorted(subset["block"].unique()) == [1, depth]
    np.testing.assert_array_equal(_features(subset[subset["block"] == 1]), first)
    evaluation = evaluate(result.out, {"planted": screen.relationships_csv}, name="m")
    assert list(evaluation.sources) == [f"m block {b}" for b in result.blocks]
    assert evaluation.block_choice["last_block"] == depth and evaluation.block_choice["block"] in result.blocks
    argv = ["--checkpoint", path, "--data", screen.root, "--out", str(tmp_path / "cli.parquet"), "--num-workers",
            "0", "--no-progress", "--threads", "1", "--amp", "fp32", "--blocks", f"1,{depth}"]
    assert embed_cli.main(argv) == 0
    assert f"for each of blocks 1,{depth}" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cli.parquet"), subset)
    for bad in ("0", f"{depth + 1}", "two"):
        with pytest.raises(ConfigError, match=f"block numbers 1..{depth}"):
            _embed(path, screen, tmp_path / "bad.parquet", blocks=bad)
    assert not os.path.exists(tmp_path / "bad_parts")
    wsl = create_model("wsl_densenet_micro_256", in_chans=6)
    save_model(wsl.eval(), str(tmp_path / "wsl"))
    with pytest.raises(ConfigError, match="block-wise embeddings need a ViT"):
        _embed(str(tmp_path / "wsl"), screen, tmp_path / "cnn.parquet", blocks="all")


def test_cli(screen, ours, tmp_path, capsys):
    _, path = ours
    out = tmp_path / "cli.parquet"
    argv = ["--checkpoint", path, "--data", screen.root, "--out", str(out), "--num-workers", "0", "--no-progress",
            "--plates", "2", "--threads", "1"]
    assert embed_cli.main(argv) == 0
    assert len(pd.read_parquet(out)) == 7 and str(out) in capsys.readouterr().out
    assert embed_cli.main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def _embed_rank(rank: int, port: int, checkpoint: str, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    result = embed_dataset(checkpoint, root, out, num_workers=0, threads=1, progress=False, batch_size=20, amp="fp32")
    assert result.plates_done == [["synth-001/Plate1"], ["synth-001/Plate2"]][rank]  # by plate, one each
    assert result.n_wells == 14  # every rank learns the merged counts


def test_two_ranks_share_plates_and_merge(screen, ours, tmp_path):
    import socket
    import time

    import torch.multiprocessing as mp

    _, path = ours
    single = pd.read_parquet(_embed(path, screen, tmp_path / "single.parquet").out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "two.parquet")
    context = mp.spawn(_embed_rank, args=(port, path, screen.root, out), nprocs=2, join=False)
    deadline = time.time() + 300
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank embedding did not finish")
    pd.testing.assert_frame_equal(pd.read_parquet(out), single)
