"""Issue 27, item by item, through the real command line: no command destroys its inputs, an embed rerun never
serves parts made from other inputs, every setting is bounded and refused before anything is created, a full disk,
Ctrl-C and SIGTERM end as one line, and the weak messages of round 3 name what they are about. Tiny everything: the
micro preset on 64 px crops of the tiny synthetic screen of test_reliability, one CPU thread."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mae_fast import cli
from tests.integration.test_reliability import (  # noqa: F401 - fixtures
    ENV,
    MICRO,
    ROOT,
    finished_run,
    one_error_line,
    screen,
    train_args,
)


def screen_copy(screen, tmp_path, name: str = "copy"):
    copy = tmp_path / name
    shutil.copytree(screen.root, copy)
    return copy


def tree(folder) -> dict:
    """Every file under `folder` with its size and modification time."""
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(base, f))
            out[os.path.relpath(os.path.join(base, f), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def refused(capsys, argv: list[str], command: str) -> str:
    """`mae-fast ARGV` ends with exit 2 and one error line (no traceback), returned."""
    try:
        rc = cli.main(argv)
    except SystemExit as exit_:  # argparse refuses a flag's value itself
        rc = exit_.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err and "Traceback" not in "\n".join(err), err
        return err[-1]
    assert rc == 2
    return one_error_line(capsys, command)


def embed_argv(checkpoint, data, out, *extra: str) -> list[str]:
    return ["embed", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--no-progress",
            "--num-workers", "0", *extra]


# ------------------------------------------------------------------------------------------------------------
# 1. no command deletes or overwrites its own inputs; --overwrite removes only what the command wrote
# ------------------------------------------------------------------------------------------------------------

def test_no_command_overwrites_its_inputs_or_a_folder_holding_them(screen, finished_run, tmp_path, capsys):
    parent = tmp_path / "P"
    parent.mkdir()
    data = screen_copy(screen, parent, "screen")
    (parent / "unrelated.txt").write_text("mine")
    before = tree(parent)
    pack = ["pack", "--codec", "raw", "--workers", "0", "--overwrite"]
    line = refused(capsys, pack + ["--source", str(data), "--out", str(data)], "pack")
    assert f"--out {data} is the input --source {data}; refusing to overwrite an input" in line
    line = refused(capsys, pack + ["--source", str(data), "--out", str(parent)], "pack")
    assert f"--out {parent} holds the input --source {data}; refusing to replace a folder" in line
    line = refused(capsys, embed_argv(finished_run / "model", data, data / "metadata.csv", "--overwrite"), "embed")
    assert f"--out {data / 'metadata.csv'} is the input data.metadata (--metadata) {data / 'metadata.csv'}" in line
    line = refused(capsys, embed_argv(finished_run / "model", data, parent / "x.parquet", "--overwrite",
                                      "--metadata", str(parent / "x.parquet")), "embed")
    assert "is the input data.metadata (--metadata)" in line
    line = refused(capsys, train_args(str(data), parent, 1, "--overwrite"), "train")
    assert f"out_dir (--out) {parent} holds the input data.root (--data) {data}" in line
    assert tree(parent) == before  # nothing deleted, nothing written


def test_overwrite_removes_only_what_the_command_wrote(screen, finished_run, tmp_path, capsys):
    out = tmp_path / "packed"
    pack = ["pack", "--source", screen.root, "--out", str(out), "--codec", "raw", "--workers", "0"]
    assert cli.main(pack) == 0
    assert cli.main(pack + ["--overwrite"]) == 0  # a pack replaces its own pack
    (out / "notes.txt").write_text("mine")
    line = refused(capsys, pack + ["--overwrite"], "pack")
    assert f"--out {out} holds files mae-fast pack did not write (notes.txt)" in line
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    line = refused(capsys, ["pack", "--source", screen.root, "--out", str(foreign), "--overwrite"], "pack")
    assert f"--out {foreign} is not a pack folder (no readable pack.json)" in line
    assert (out / "notes.txt").read_text() == "mine" and (foreign / "thesis.tex").read_text() == "mine"

    table = tmp_path / "emb" / "e.parquet"
    table.parent.mkdir()
    table.write_text("a text file, not a table")
    line = refused(capsys, embed_argv(finished_run / "model", screen.root, table, "--overwrite"), "embed")
    assert f"--overwrite: {table} is not a parquet table written by embed; refusing to delete it" in line
    table.unlink()
    assert cli.main(embed_argv(finished_run / "model", screen.root, table)) == 0
    (tmp_path / "emb" / "e_parts" / "keep.txt").write_text("mine")
    line = refused(capsys, embed_argv(finished_run / "model", screen.root, table, "--overwrite"), "embed")
    assert "e_parts holds files embed did not write (keep.txt)" in line
    assert (tmp_path / "emb" / "e_parts" / "keep.txt").exists()


# ------------------------------------------------------------------------------------------------------------
# 2. a part is reused only while what made it is unchanged
# ------------------------------------------------------------------------------------------------------------

def test_embed_rerun_recomputes_the_parts_whose_inputs_changed(screen, finished_run, tmp_path, capsys):
    data = screen_copy(screen, tmp_path, "data")
    out = tmp_path / "emb" / "e.parquet"
    argv = embed_argv(finished_run / "model", data, out)
    assert cli.main(argv) == 0
    first = pd.read_parquet(out)
    # a run killed before its merge: the parts stay, the table does not; meanwhile the inputs change
    out.unlink()
    meta = pd.read_csv(data / "metadata.csv")
    relabelled = meta.well_id.iloc[0]
    meta.loc[0, "gene"] = "RELABELLED"
    meta.to_csv(data / "metadata.csv", index=False)
    plate1 = first[first.well_id == relabelled].plate.iloc[0]
    other = first[first.plate != plate1].well_id.iloc[0]
    address = other.split("_")[-1]
    plate = first[first.well_id == other].plate.iloc[0]
    image = sorted((data / "images").rglob(f"Plate{plate}/{address}_s1_w1.png"))[0]
    pixels = np.asarray(Image.open(image))
    Image.fromarray((255 - pixels).astype(pixels.dtype)).save(image)
    capsys.readouterr()
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("its part was made from other inputs") == 2, printed
    second = pd.read_parquet(out)
    assert second.set_index("well_id").loc[relabelled, "gene"] == "RELABELLED"
    features = [c for c in second.columns if c.startswith("feature_")]
    changed = np.abs(second.set_index("well_id").loc[other, features].to_numpy(float)
                     - first.set_index("well_id").loc[other, features].to_numpy(float)).max()
    assert changed > 1e-4
    straight = tmp_path / "straight.parquet"
    assert cli.main(embed_argv(finished_run / "model", data, straight)) == 0
    pd.testing.assert_frame_equal(second, pd.read_parquet(straight))
    out.unlink()
    capsys.readouterr()
    assert cli.main(argv) == 0  # unchanged inputs: both parts reused
    printed = capsys.readouterr().out
    assert "2 plate(s) already done" in printed and "(0 tiles in" in printed


# ------------------------------------------------------------------------------------------------------------
# 3-6. bounded settings, refused with one line before anything is created
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, message", [
    ("data.num_workers=10000", "config key 'data.num_workers' must be in [0, "),
    ("data.num_workers=-1", "config key 'data.num_workers' must be in [0, "),
    ("model.depth=0", "config key 'model.depth' must be in [1, 1024], got 0"),
    ("model.depth=-2", "config key 'model.depth' must be in [1, 1024], got -2"),
    ("model.embed_dim=0", "config key 'model.embed_dim' must be in [1, 65536], got 0"),
    ("model.num_heads=5", "model.embed_dim 192 is not a multiple of model.num_heads 5"),
    ("model.decoder_depth=0", "config key 'model.decoder_depth' must be in [1, 1024], got 0"),
    ("model.patch_size=0", "config key 'model.patch_size' must be in [1, 1024], got 0"),
    ("model.mlp_ratio=0", "config key 'model.mlp_ratio' must be in [1e-06, 1024]"),
    ("model.drop_path=1", "config key 'model.drop_path' must be in [0, 0.999], got 1"),
    ("global_batch=1000000000000", "config key 'global_batch' must be <= 16777216, got 1000000000000"),
    ("steps=100000000000000000", "config key 'steps' must be <= 1099511627776"),
    ("seed=100000000000000000000", "config key 'seed' must be <= 9223372036854775807"),
    ("seed=-1", "config key 'seed' must be in [0, 9223372036854775807], got -1"),
    ("data.crops_per_image=0", "config key 'data.crops_per_image' must be >= 1"),
    ("model.mask_ratio=0", "model.mask_ratio 0 masks none of the 16 patches of a crop"),
    ("data.channels=[1,1,2,3,4,5]", "channels 1, 1, 2, 3, 4, 5: 1 given more than once"),
    ("distributed=fsdp", "launch it with `torchrun --nproc_per_node N -m mae_fast.cli train"),
])
def test_unbounded_settings_are_refused_before_anything_is_created(screen, tmp_path, capsys, setting, message):
    out = tmp_path / "never"
    line = refused(capsys, train_args(screen.root, out, 1, "--set", setting), "train")
    assert message in line, line
    assert not out.exists()


def test_huge_micro_batch_count_and_seed_flag(screen, tmp_path, capsys):
    out = tmp_path / "never"
    line = refused(capsys, train_args(screen.root, out, 1, "--set", "global_batch=16777216", "--set",
                                      "micro_batch=1"), "train")
    assert "16777216 micro-batches per step (at most 65536)" in line
    line = refused(capsys, train_args(screen.root, out, 1, "--seed", str(10**20)), "train")
    assert "argument --seed: must be <= 9.22337e+18" in line
    assert not out.exists()


def test_mask_ratio_zero_is_a_zero_loss_for_inference():
    from mae_fast.models import MaskedAutoencoder, model_config

    torch.manual_seed(0)
    model = MaskedAutoencoder(model_config(MICRO, img_size=32, depth=1, decoder_depth=1))
    images = torch.rand(2, 6, 32, 32)
    out = model(images, mask_ratio=0.0)
    assert out.loss.item() == 0.0 and not str(out.loss.item()).startswith("-")
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    assert model(images, mask_ratio=0.5).loss.item() > 0


# ------------------------------------------------------------------------------------------------------------
# 7. a screen whose every image is smaller than the crop
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_train_on_images_smaller_than_the_crop(screen, tmp_path, capsys, on_error):
    out = tmp_path / "never"
    args = train_args(screen.root, out, 1, "--set", "model.img_size=512", "--set", f"data.on_error={on_error}")
    line = refused(capsys, args, "train")
    assert "[too_small] none of the 14 selected sites yields a 512x512 crop (skipped: 14 x too_small)" in line
    assert not out.exists()  # nothing half-made: a rerun needs no --overwrite


# ------------------------------------------------------------------------------------------------------------
# 8. a full disk
# ------------------------------------------------------------------------------------------------------------

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_a_checkpoint(screen, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _no_space)
    out = tmp_path / "run"
    line = refused(capsys, train_args(screen.root, out, 1), "train")
    assert line.startswith(f"mae-fast train: error: {out / 'checkpoints'}: no space left on the device writing the "
                           "checkpoint of step 1: about "), line
    assert " MiB needed; " in line and " MiB free; " in line and line.endswith("then continue with --resume")
    assert not [p for p in (out / "checkpoints").iterdir()]  # no empty .tmp-step_* folder


def test_full_disk_in_embed_pack_and_evaluate_names_the_folder(screen, finished_run, tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    from mae_fast.data import pack as pack_module

    real = pq.write_table
    monkeypatch.setattr(pq, "write_table", _no_space)
    out = tmp_path / "emb" / "e.parquet"
    line = refused(capsys, embed_argv(finished_run / "model", screen.root, out), "embed")
    assert f"{tmp_path / 'emb' / 'e_parts'}: no space left on the device writing " in line and "MiB free" in line
    monkeypatch.setattr(pq, "write_table", real)
    monkeypatch.setattr(pack_module, "_write_shards", _no_space)
    packed = tmp_path / "packed"
    line = refused(capsys, ["pack", "--source", screen.root, "--out", str(packed), "--codec", "raw"], "pack")
    assert f"{tmp_path}: no space left on the device packing into {packed}" in line
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("packed")]
    monkeypatch.undo()
    assert cli.main(embed_argv(finished_run / "model", screen.root, out)) == 0
    from mae_fast import io
    from mae_fast.evaluation import report

    # the file's bytes are written, then the device is full: atomic_write's own handling is what is tested
    monkeypatch.setattr(report, "atomic_write", lambda path, write: io.atomic_write(path, _no_space))
    evaluation = tmp_path / "eval"
    line = refused(capsys, ["evaluate", str(out), "--relationships", screen.relationships_csv, "--out",
                            str(evaluation), "--no-heatmap"], "evaluate")
    assert f"{evaluation}: no space left on the device writing evaluation.json: " in line
    assert not evaluation.exists()  # no temporary left, and the folder made for the lock is removed again


# ------------------------------------------------------------------------------------------------------------
# 9. every float spelling, in --set and in config files
# ------------------------------------------------------------------------------------------------------------

def test_float_spellings_in_set_and_yaml(screen, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-4\nweight_decay: 5E-2\nwarmup_fraction: '.25'\n")
    base = ["train", "--preset", MICRO, "--data", screen.root, "--out", str(tmp_path / "r"), "--steps", "1",
            "--print-config"]
    assert cli.main(base + ["--set", "lr=1e-4", "--set", "model.mask_ratio=5e-1", "--set", "betas=[9e-1, 95e-2]"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lr"] == 1e-4 and printed["model"]["mask_ratio"] == 0.5 and printed["betas"] == [0.9, 0.95]
    assert cli.main(base + ["--config", str(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["lr"], printed["weight_decay"], printed["warmup_fraction"]) == (1e-4, 0.05, 0.25)
    assert "config key 'lr' must be finite" in refused(capsys, base + ["--set", "lr=nan"], "train")
    assert "expected float" in refused(capsys, base + ["--set", "lr=fast"], "train")


# ------------------------------------------------------------------------------------------------------------
# 10. Ctrl-C and SIGTERM: one line, exit 130 / 143
# ------------------------------------------------------------------------------------------------------------

def test_ctrl_c_on_train_says_how_to_resume(screen, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mae_fast.cli", *train_args(screen.root, out, 500)], env=ENV,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints").is_dir() or not any(p.name.startswith("step_")
                                                             for p in (out / "checkpoints").iterdir()):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mae-fast train: interrupted (Ctrl-C); the last checkpoint is step "), last
    assert last.endswith(f"resume with: mae-fast train --resume --out {out}")
    assert not (out / ".mae_fast.lock").exists()


def test_ctrl_c_on_embed_keeps_the_finished_plates(screen, finished_run, tmp_path, capsys, monkeypatch):
    from mae_fast.inference import embed as embed_module

    real = embed_module.write_parquet
    written = []

    def write_then_interrupt(frame, path, extra_meta=None):  # Ctrl-C right after the first plate's part
        real(frame, path, extra_meta)
        written.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "write_parquet", write_then_interrupt)
    out = tmp_path / "emb" / "e.parquet"
    assert cli.main(embed_argv(finished_run / "model", screen.root, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"mae-fast embed: interrupted (Ctrl-C); 1 finished plate part(s) kept in "
                       f"{tmp_path / 'emb' / 'e_parts'}; run the same command again to continue")
    assert "Traceback" not in "\n".join(err) and not os.path.exists(str(out) + ".lock")
    monkeypatch.undo()
    assert cli.main(embed_argv(finished_run / "model", screen.root, out)) == 0
    assert "1 plate(s) already done" in capsys.readouterr().out


SLOW_PACK = """
import time
from mae_fast.data import pack
real = pack._encode_site
def slow(position):
    time.sleep(0.3)
    return real(position)
pack._encode_site = slow
import sys
from mae_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_on_pack_with_workers(screen, tmp_path):
    out = tmp_path / "packed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PACK, "pack", "--source", screen.root, "--out", str(out),
                             "--codec", "raw", "--workers", "2"], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("packing 14 sites")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err.strip().splitlines() == [f"mae-fast pack: terminated (SIGTERM); nothing was written to {out} (the "
                                        "partial pack was removed)"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("packed")]


# ------------------------------------------------------------------------------------------------------------
# 11. duplicate channels
# ------------------------------------------------------------------------------------------------------------

def test_duplicate_channels_are_refused(screen, finished_run, tmp_path, capsys):
    line = refused(capsys, ["pack", "--source", screen.root, "--out", str(tmp_path / "p"), "--channels",
                            "1,1,2,3,4,5"], "pack")
    assert "channels 1, 1, 2, 3, 4, 5: 1 given more than once" in line
    line = refused(capsys, embed_argv(finished_run / "model", screen.root, tmp_path / "e.parquet", "--channels",
                                      "1,2,3,4,5,w5"), "embed")
    assert "5 given more than once" in line
    line = refused(capsys, embed_argv(finished_run / "model", screen.root, tmp_path / "e.parquet", "--channels",
                                      "1,2,x"), "embed")
    assert "channels 1, 2, x: RxRx channels are numbers like 1,2,3" in line
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# 12. output paths checked before any work
# ------------------------------------------------------------------------------------------------------------

def test_output_paths_checked_before_any_work(screen, finished_run, tmp_path, capsys):
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/emb\xff.parquet")
    line = refused(capsys, embed_argv(finished_run / "model", screen.root, bad), "embed")
    assert "is not valid UTF-8 text (it holds the byte 0xff)" in line
    assert "embedding" not in capsys.readouterr().out
    folder = tmp_path / "tables"
    line = refused(capsys, embed_argv(finished_run / "model", screen.root, str(folder) + "/"), "embed")
    assert f"--out {folder}/ is a folder; give a file name" in line
    line = refused(capsys, train_args(screen.root, bad.replace(".parquet", ""), 1), "train")
    assert "out_dir (--out)" in line and "not valid UTF-8" in line
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------------------
# 13. weak messages made clear
# ------------------------------------------------------------------------------------------------------------

def test_bit_depth_error_names_the_odd_channel(screen, tmp_path, capsys):
    data = screen_copy(screen, tmp_path)
    victim = sorted((data / "images").rglob("*_w2.png"))[0]
    Image.fromarray(np.full((256, 256), 300, np.uint16)).save(victim)
    line = refused(capsys, ["pack", "--source", str(data), "--out", str(tmp_path / "p"), "--codec", "raw",
                            "--workers", "0"], "pack")
    assert f"[bit_depth] 16-bit image where the dataset is 8-bit" in line and f"file {victim})" in line
    from mae_fast.data.index import SiteIndex
    from mae_fast.data.loading import probe_site

    site = next(s for s in SiteIndex.from_rxrx(str(data)) if any(str(victim) == str(p) for p in s.sources))
    with pytest.raises(Exception, match=str(victim).replace(".", r"\.")):
        probe_site(site)  # no dataset dtype: the site's majority (8-bit) decides, the odd file is named


def test_corrupt_pack_json_and_jump_on_a_folder_are_named(screen, finished_run, tmp_path, capsys):
    packed = tmp_path / "packed"
    assert cli.main(["pack", "--source", screen.root, "--out", str(packed), "--codec", "raw", "--workers", "0"]) == 0
    (packed / "pack.json").write_text("{corrupt")
    line = refused(capsys, embed_argv(finished_run / "model", packed, tmp_path / "e.parquet"), "embed")
    assert f"{packed / 'pack.json'}: the pack's manifest is not valid JSON" in line
    line = refused(capsys, embed_argv(finished_run / "model", screen.root, tmp_path / "e.parquet", "--format",
                                      "jump"), "embed")
    assert f"{screen.root} is a folder, not a table: a JUMP source is a load_data CSV or parquet file" in line


def test_flops_and_bench_errors(capsys):
    assert cli.main(["flops", "--no-plot", "--preset", "nope"]) == 2
    assert capsys.readouterr().err.startswith("mae-fast flops: error: ")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--batch", "0"])
    assert exit_.value.code == 2 and "argument --batch: must be >= 1, got 0" in capsys.readouterr().err


def test_evaluate_refuses_tables_without_features_or_with_a_well_twice(screen, finished_run, tmp_path, capsys):
    table = tmp_path / "e.parquet"
    assert cli.main(embed_argv(finished_run / "model", screen.root, table)) == 0
    frame = pd.read_parquet(table)
    counts_only = tmp_path / "counts_only.parquet"
    frame.drop(columns=[c for c in frame.columns if c.startswith("feature_")]).to_parquet(counts_only)
    twice = tmp_path / "twice.parquet"
    pd.concat([frame, frame.iloc[[3]]]).to_parquet(twice)
    evaluate = ["evaluate", "--relationships", screen.relationships_csv, "--out", str(tmp_path / "eval")]
    line = refused(capsys, [evaluate[0], str(counts_only), *evaluate[1:]], "evaluate")
    assert "no feature columns (none named 'feature_*' and no numeric non-metadata columns other than the counts " \
           "n_sites, n_tiles" in line
    line = refused(capsys, [evaluate[0], str(twice), *evaluate[1:]], "evaluate")
    assert f"1 well_id value(s) appear in more than one row, e.g. {frame.well_id.iloc[3]!r} in rows 3, 14" in line


def test_config_naming_another_preset_is_reported_as_modified(finished_run, screen, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(finished_run / "model", model)
    config = json.loads((model / "config.json").read_text())
    config["name"] = "mae_vit_small_patch16_256"
    (model / "config.json").write_text(json.dumps(config))
    assert cli.main(embed_argv(model, screen.root, tmp_path / "e.parquet")) == 0
    printed = capsys.readouterr().out
    assert "with mae_vit_small_patch16_256 modified (embed_dim 192 (preset 384), depth 4 (preset 12)" in printed


# ------------------------------------------------------------------------------------------------------------
# found by the hostile pass of round 3
# ------------------------------------------------------------------------------------------------------------

def test_hostile_pass_findings(screen, finished_run, tmp_path, capsys):
    data = screen_copy(screen, tmp_path, "data")
    before = tree(data)
    line = refused(capsys, ["demo", "--tiny", "--out", str(data)], "demo")  # it wrote its outputs into a dataset
    assert f"--out {data} holds files the demo did not write (gene_arms.csv, genes.csv, guides.csv, images, " in line
    assert tree(data) == before
    assert "--out is empty: give a path" in refused(capsys, embed_argv(finished_run / "model", data, ""), "embed")
    line = refused(capsys, embed_argv(finished_run / "model", data, tmp_path / "e.parquet", "--format", "nope"),
                   "embed")
    assert "data format (--format, data.format) is 'nope'; valid values: auto, rxrx, rxrx3_core, jump, pack" in line
    line = refused(capsys, embed_argv(finished_run / "model", data, tmp_path / "e.parquet", "--channels", ","),
                   "embed")
    assert "argument --channels: expected a comma list with at least one item, got ','" in line
    line = refused(capsys, ["pack", "--source", str(data), "--out", str(tmp_path / "p"), "--workers", "100000"],
                   "pack")
    assert f"argument --workers: must be <= {4 * os.cpu_count()}" in line
    line = refused(capsys, embed_argv(finished_run / "model", data, tmp_path / "e.parquet", "--preset", MICRO,
                                      "--set", "model.depth=0"), "embed")
    assert "config key 'model.depth' must be in [1, 1024], got 0" in line
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_output_under_a_file_is_named_once(screen, finished_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = refused(capsys, embed_argv(finished_run / "model", screen.root, blocker / "e.parquet"), "embed")
    assert line == (f"mae-fast embed: error: {blocker}: exists and is not a folder, so embedding output "
                    f"{blocker / 'e.parquet'} cannot be written")
