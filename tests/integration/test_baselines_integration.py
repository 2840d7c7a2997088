"""The baselines as presets of `mae-fast train` / `embed` / `evaluate`, on a tiny synthetic screen (site 256 px,
micro presets): a few training steps per family, checkpoints that load through `interop.load_any`, exact resume,
single-plate AdaBN micro-batches (training) and batches (embedding), per-well parquet tables that the evaluation
reads, and the configuration errors. MU-Net trains on 64 px crops to keep its full-resolution convolutions cheap."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mae_fast.cli import train as train_cli
from mae_fast.training.checkpointing import list_checkpoints, read_train_state
from mae_fast.training.pretrained import load_pretrained
from mae_fast.training.config import set_key, validate
from mae_fast.training.data import build_site_index, make_plate_streams, wsl_labels
from mae_fast.training.step import micro_inputs
from mae_fast.models import create_model
from mae_fast.models.munet import MaskedUNet
from mae_fast.models.wsl import WSLClassifier
from mae_fast.checkpoint import CheckpointError, save_model
from mae_fast.interop import load_any
from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
from mae_fast.inference.adabn import AdaBNPlateTiles, adabn_batch_sizes
from mae_fast.inference.embed import EmbedConfig, embed_dataset
from mae_fast.evaluation import evaluate
from mae_fast.training.config import ConfigError, DataConfig, TrainConfig, build_config
from mae_fast.training.loop import train
from mae_fast.training.recipes import optimizer_recipe
from tests.helpers import run_as_if_killed_after

FAMILIES = {  # preset -> (model overrides, model class)
    "wsl_densenet_micro_256": ({}, WSLClassifier),
    "wsl_densenet_micro_adabn_256": ({"virtual_batch_size": 2}, WSLClassifier),
    "munet_micro_256": ({"img_size": 64, "encoder_units": [1, 1, 2, 1]}, MaskedUNet),  # a tuple key: resume compares
}


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    cfg = SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=2, complex_size=3, n_singletons=2,
                                n_empty_controls=3, n_crispr_controls=1, site_size=256, seed=5)
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), cfg)  # 12 wells (sites) per plate


def config(preset: str, root: str, out, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        preset=preset, data=DataConfig(root=root, num_workers=0),
        out_dir=str(out), global_batch=8, micro_batch=4, steps=5, lr=0.05 if preset.startswith("wsl") else 1e-3,
        checkpoint_every=2, keep_last=10, log_every=1, val_crops=2, threads=1, progress=False, tensorboard=False,
    )
    for key, value in FAMILIES.get(preset, ({},))[0].items():  # typed as from the command line (lists -> tuples)
        set_key(cfg, f"model.{key}", value)
    for key, value in overrides.items():
        set_key(cfg, key.replace("__", "."), value)
    return cfg


@pytest.fixture(scope="module")
def runs(screen, tmp_path_factory):
    """One uninterrupted 5-step run per family (2 micro-batches a step, checkpoints at steps 2, 4 and 5)."""
    root = tmp_path_factory.mktemp("runs")
    return {preset: train(config(preset, screen.root, root / preset)) for preset in FAMILIES}


# ------------------------------------------------------------------------------------------------------------
# train -> checkpoint -> resume -> embed -> evaluate, per family
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_trains_and_writes_checkpoints_that_load(preset, runs):
    r = runs[preset]
    cls = FAMILIES[preset][1]
    assert r.steps == 5 and len(r.losses) == 5 and all(np.isfinite(r.losses))
    assert [s for s, _ in list_checkpoints(r.out_dir)] == [2, 4, 5]
    loaded = load_any(r.model_dir)  # the saved config's `family` rebuilds the baseline
    assert type(loaded) is cls and loaded.cfg == r.model.cfg
    for k, v in r.model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    state = read_train_state(os.path.join(r.out_dir, "checkpoints", "step_00000005"))
    moments = {k for s in state["optimizer"]["state"].values() for k in s}
    meta = json.load(open(os.path.join(r.model_dir, "config.json")))
    summary = json.load(open(os.path.join(r.out_dir, "train_summary.json")))
    logged = [json.loads(x) for x in open(r.metrics_path) if '"event"' not in x]
    assert all(x["mfu"] is None for x in logged)  # no FLOP count for the baselines: MFU n/a
    if cls is WSLClassifier:
        assert moments == {"momentum_buffer"} and summary["optimizer"] == "SGD (Nesterov)"
        assert meta["classes"] == list(r.classes) == list(state["classes"]) and len(r.classes) == 10  # 8 genes + 2 controls
        assert loaded.cfg.num_classes == 10 and all(0.0 <= x["accuracy"] <= 1.0 for x in logged)
        assert r.recon_paths == []  # a classifier draws no reconstruction
    else:
        assert moments == {"step", "exp_avg", "exp_avg_sq"} and summary["optimizer"] == "AdamW"
        assert "classes" not in meta and [os.path.basename(p) for p in r.recon_paths] == ["step_00000005.png"]
        assert loaded.cfg.img_size == 64 and optimizer_recipe(loaded.cfg).betas == (0.9, 0.95)
        assert loaded.cfg.encoder_units == (1, 1, 2, 1)


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_resume_continues_exactly(preset, runs, screen, tmp_path):
    reference = runs[preset]
    out = run_as_if_killed_after(reference.out_dir, tmp_path / "resumed", 2)
    r = train(config(preset, screen.root, out, resume=True))
    assert r.resumed_from == 2 and r.steps == 5
    assert r.losses == reference.losses  # steps 3-5 recomputed bit for bit (optimiser, loaders, plate sampler)
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, r.model.state_dict()[k]), k


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_embeds_to_parquet_that_the_evaluation_reads(preset, runs, screen, tmp_path):
    r = runs[preset]
    result = embed_dataset(r.model_dir, screen.root, str(tmp_path / "emb.parquet"), num_workers=0, threads=1,
                           progress=False, batch_size=5)
    wells = pd.read_parquet(result.out)
    D = r.model.cfg.embed_dim
    assert len(wells) == result.n_wells == 24 and result.dims == D
    assert list(wells.columns[-D:]) == [f"feature_{i}" for i in range(D)]
    features = wells[[f"feature_{i}" for i in range(D)]].to_numpy()
    assert np.isfinite(features).all() and features.std(axis=0).max() > 0
    n_tiles = (256 // r.model.cfg.img_size) ** 2
    assert (wells["n_tiles"] == n_tiles).all()
    evaluation = evaluate(result.out, {"complexes": screen.relationships_csv}, arms=screen.arms_csv, name=preset)
    recall = evaluation.recall_table().loc[preset, "complexes"]
    assert 0.0 <= recall <= 1.0 and evaluation.sources[preset].n_perturbations == 8


def test_embedding_with_the_preset_of_a_single_weights_file(runs, screen, tmp_path):
    """A baseline's bare safetensors file plus --preset: the WSL head's class count is read from the weights."""
    r = runs["wsl_densenet_micro_256"]
    weights = os.path.join(r.model_dir, "model.safetensors")
    model, kind = load_pretrained(weights, create_model("wsl_densenet_micro_256").cfg)
    assert kind == "ours" and model.cfg.num_classes == 10
    a = embed_dataset(weights, screen.root, str(tmp_path / "a.parquet"), preset="wsl_densenet_micro_256",
                      num_workers=0, threads=1, progress=False, plates=["1"])
    b = embed_dataset(r.model_dir, screen.root, str(tmp_path / "b.parquet"), num_workers=0, threads=1,
                      progress=False, plates=["1"])
    pd.testing.assert_frame_equal(pd.read_parquet(a.out), pd.read_parquet(b.out))
    with pytest.raises(CheckpointError, match="differs from --preset munet_micro_256"):
        embed_dataset(r.model_dir, screen.root, str(tmp_path / "c.parquet"), preset="munet_micro_256",
                      num_workers=0, threads=1, progress=False)


# ------------------------------------------------------------------------------------------------------------
# AdaBN: one plate per batch
# ------------------------------------------------------------------------------------------------------------

def test_adabn_training_micro_batches_are_single_plate(screen, tmp_path, monkeypatch):
    seen = []
    original = micro_inputs

    def recording(batch, labels, device):
        seen.append(batch[1].site_index.copy())
        return original(batch, labels, device)

    monkeypatch.setattr("mae_fast.training.step.micro_inputs", recording)  # where TrainStep looks it up
    preset = "wsl_densenet_micro_adabn_256"
    r = train(config(preset, screen.root, tmp_path / "adabn", steps=7, checkpoint_every=100, data__shards=2))
    index = build_site_index(DataConfig(root=screen.root))
    plates = [{(index[int(i)].experiment, index[int(i)].plate) for i in positions} for positions in seen]
    assert len(seen) == 14 and all(len(p) == 1 and len(positions) == 4 for p, positions in zip(plates, seen))
    assert {next(iter(p)) for p in plates} == {("synth-001", "1"), ("synth-001", "2")}
    # labels follow the crops' own sites
    labels = wsl_labels(index)[1]
    assert [labels.classes[i] for i in labels.for_crops(seen[0])] == [index[int(i)].perturbation for i in seen[0]]
    assert r.steps == 7


def test_plate_streams_follow_the_sampler_and_resume(screen):
    cfg = config("wsl_densenet_micro_adabn_256", screen.root, "/unused", data__shards=2)
    plan = validate(cfg)
    index = build_site_index(cfg.data)
    streams = make_plate_streams(index, cfg, plan, 0, torch.device("cpu"))
    assert sorted(streams) == [0, 1]
    stream = streams[1]
    expected = []
    for epoch in range(3):  # the plate of every micro-batch, from the sampler itself
        stream.sampler.set_epoch(epoch)
        expected += [stream.sampler.plate_of(b) for b in stream.sampler]
    assert len(expected) == 3 * (24 // 4 // 2)  # crops of the shard's plates / micro-batch / shards, per epoch
    batches = [stream.next() for _ in range(7)]  # into the third sampler epoch
    for (images, info), key in zip(batches, expected):
        assert images.shape == (4, 6, 256, 256)
        assert {(index[int(i)].experiment, index[int(i)].plate) for i in info.site_index} == {key}
    assert len(set(expected[:7])) == 2
    state = stream.state_dict()
    after = [stream.next() for _ in range(4)]
    again = make_plate_streams(index, cfg, plan, 1, torch.device("cpu"))[1]
    again.load_state_dict(state)
    for (a, ia), (b, ib) in zip(after, [again.next() for _ in range(4)]):
        assert torch.equal(a, b) and np.array_equal(ia.site_index, ib.site_index)
    bad = dict(state, batch_size=8)
    with pytest.raises(ValueError, match="exact resume needs the same data"):
        again.load_state_dict(bad)


def test_adabn_embedding_batches_are_one_plate_several_sites_and_seeded(screen):
    index = build_site_index(DataConfig(root=screen.root, plates=["2"]))
    cfg = EmbedConfig(batch_size=3, adabn_window=5, seed=4, data=DataConfig(root=screen.root, num_workers=0))
    tiles = AdaBNPlateTiles(index, "synth-001/Plate2", 256, cfg, torch.device("cpu"))
    windows = tiles.windows()
    assert [len(w) for w in windows] == [6, 6]  # 12 one-tile sites, >= 5 tiles a window, balanced
    assert sorted(p for w in windows for p in w) == list(range(12))
    batches = list(tiles)
    keys = [k for _, ks in batches for k in ks]
    assert sorted(keys) == sorted((s.well_id, s.site, 0) for s in index)  # every tile exactly once
    for images, ks in batches:
        assert 2 <= len(ks) <= 3 and images.shape[0] == len(ks)
        assert len({k[0] for k in ks}) == len(ks)  # tiles of several wells (one tile per site here)
    window_of = {index[p].well_id: w for w, ps in enumerate(windows) for p in ps}
    assert all(len({window_of[k[0]] for k in ks}) == 1 for _, ks in batches)
    again = [ks for _, ks in AdaBNPlateTiles(index, "synth-001/Plate2", 256, cfg, torch.device("cpu"))]
    assert again == [ks for _, ks in batches]
    other = EmbedConfig(batch_size=3, adabn_window=5, seed=5, data=cfg.data)
    assert [ks for _, ks in AdaBNPlateTiles(index, "synth-001/Plate2", 256, other, "cpu")] != again
    # each tile is its own site's image (tiles and keys are shuffled together)
    from PIL import Image

    by_well = {s.well_id: s for s in index}
    for images, ks in batches:
        for image, (well, _, _) in zip(images, ks):
            site = by_well[well]
            folder = os.path.join(screen.images_dir, site.experiment, f"Plate{site.plate}")
            planes = [np.asarray(Image.open(os.path.join(folder, f"{site.address}_s1_w{c}.png"))) for c in range(1, 7)]
            assert torch.equal(image, torch.from_numpy(np.stack(planes)))


def test_adabn_batch_sizes():
    assert adabn_batch_sizes(13, 5) == [5, 4, 4] and adabn_batch_sizes(2, 64) == [2]
    assert adabn_batch_sizes(5, 2) == [3, 2] and adabn_batch_sizes(4, 2) == [2, 2]
    for n in range(2, 40):
        for b in range(2, 9):
            sizes = adabn_batch_sizes(n, b)
            assert sum(sizes) == n and min(sizes) >= 2 and max(sizes) - min(sizes) <= 1
            assert max(sizes) <= b or (b == 2 and max(sizes) == 3)
    with pytest.raises(ValueError, match="n >= 2"):
        adabn_batch_sizes(1, 4)


def test_adabn_embeddings_depend_on_the_seed_and_repeat(runs, screen, tmp_path):
    r = runs["wsl_densenet_micro_adabn_256"]
    kw = dict(num_workers=0, threads=1, progress=False, batch_size=4, adabn_window=6, plates=["1"])
    a = pd.read_parquet(embed_dataset(r.model_dir, screen.root, str(tmp_path / "a.parquet"), seed=1, **kw).out)
    b = pd.read_parquet(embed_dataset(r.model_dir, screen.root, str(tmp_path / "b.parquet"), seed=1, **kw).out)
    c = pd.read_parquet(embed_dataset(r.model_dir, screen.root, str(tmp_path / "c.parquet"), seed=2, **kw).out)
    features = [c_ for c_ in a.columns if c_.startswith("feature_")]
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a[features].to_numpy(), c[features].to_numpy())  # batch statistics: companions matter
    parts = os.path.join(tmp_path / "a_parts", "manifest.json")
    assert json.load(open(parts))["adabn_batches"] == {"seed": 1, "window_tiles": 6, "batch_size": 4}


def _ddp_rank(rank: int, port: int, cfg_dict: dict, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    result = train(TrainConfig.from_dict(cfg_dict))
    params = {k: v.detach().clone() for k, v in result.model.named_parameters()}
    torch.save({"params": params, "losses": result.losses}, os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_ddp_ranks_train_an_adabn_baseline_like_one_process(screen, tmp_path):
    """Micro-batch j comes from data shard j % 2 in both runs (same plates, crops and labels), so losses and
    parameters agree bit for bit; batch-norm running statistics are rank 0's under DDP (not compared)."""
    import socket
    import time

    import torch.multiprocessing as mp

    preset = "wsl_densenet_micro_adabn_256"
    single = train(config(preset, screen.root, tmp_path / "single", steps=3, data__shards=2))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = config(preset, screen.root, tmp_path / "ddp", steps=3, data__shards=2)
    context = mp.spawn(_ddp_rank, args=(port, cfg.to_dict(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 300
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank run did not finish")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"] == single.losses
    for name, value in single.model.named_parameters():
        assert torch.equal(ranks[0]["params"][name], value.detach()), name
        assert torch.equal(ranks[1]["params"][name], value.detach()), name
    assert json.load(open(tmp_path / "ddp" / "model" / "config.json"))["classes"] == list(single.classes)


# ------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, overrides, message", [
    ("munet_micro_256", {"model__patch_size": 8},
     r"model.patch_size do not apply to the baseline munet_micro_256 \(MUNetConfig\).*model.widths"),
    ("mae_vit_micro_patch16_256", {"model__widths": [8, 16]},
     r"model.widths do not apply to the MAE preset .*model.patch_size"),
    ("wsl_densenet_micro_256", {"model__num_classes": 4}, "the trainer sets it to the number of perturbation labels"),
    ("wsl_densenet_micro_256", {"distributed": "fsdp"}, "train baselines with DDP"),
    ("munet_micro_256", {"optimizer_impl": "triton"}, "baselines use torch's AdamW"),
    ("wsl_densenet_micro_256", {"betas": [0.9, 0.99]}, "SGD .*no betas"),
    ("munet_micro_256", {"activation_checkpointing": True}, "activation checkpointing"),
    ("wsl_densenet_micro_adabn_256", {"model__virtual_batch_size": 8}, "virtual_batch_size 8 is larger than micro"),
    ("munet_micro_256", {"model__widths": [8, 16, 32]}, r"preset munet_micro_256: encoder_units needs one count"),
])
def test_bad_baseline_settings_fail_before_work(screen, tmp_path, preset, overrides, message):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=message):
        train(config(preset, screen.root, out, **overrides))
    assert not out.exists()


def test_model_keys_are_typed_by_the_baseline_and_lr_scales(tmp_path):
    cfg = build_config("munet_micro_256", overrides=["model.widths=[8, 16, 32, 64]", "model.kernel_size=5",
                                                     "data.root=/x", "steps=1"])
    assert cfg.model == {"widths": (8, 16, 32, 64), "kernel_size": 5}
    plan = validate(cfg)
    assert plan.model_cfg.kernel_size == 5 and plan.lr == 1e-3 and plan.betas == (0.9, 0.95)
    wsl = build_config("wsl_densenet161_256", overrides=["data.root=/x", "steps=1", "global_batch=4096",
                                                         "micro_batch=256"])
    plan = validate(wsl)
    assert plan.lr == pytest.approx(1.6) and plan.betas is None and plan.family == "wsl"  # 0.1 per 256 crops
    assert optimizer_recipe(plan.model_cfg).lr == 0.1  # the recipe keeps the base lr (the run's peak lr: plan, state)
    # a YAML file may name the preset after its model keys
    yml = tmp_path / "run.yaml"
    yml.write_text("model:\n  block_config: [2, 2]\npreset: wsl_densenet_micro_256\ndata:\n  root: /x\nsteps: 1\n")
    assert validate(build_config(config_file=str(yml))).model_cfg.block_config == (2, 2)


def test_list_presets_shows_the_baselines(capsys):
    assert train_cli.main(["--list-presets"]) == 0
    printed = capsys.readouterr().out
    for name in ("wsl_densenet161_256", "wsl_densenet161_adabn_256", "munet_m_256", "munet_l_256"):
        assert name in printed


def test_load_any_reads_a_baseline_checkpoint_and_refuses_a_wrong_one(tmp_path):
    model = create_model("munet_micro_256", img_size=64)
    save_model(model, str(tmp_path / "m"))
    loaded = load_any(str(tmp_path / "m"))
    assert isinstance(loaded, MaskedUNet) and loaded.cfg == model.cfg
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    meta = json.load(open(tmp_path / "m" / "config.json"))
    meta["kernel_size"] = 5  # weights of k=3 under a k=5 config
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_any(str(tmp_path / "m"))
