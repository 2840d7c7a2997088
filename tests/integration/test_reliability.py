"""Issue 13, case by case: one writer per output (real second processes), finite settings and checkpoints, resume
after any start, one clear error line for every bad input (no traceback), and what kills at chosen points leave
behind. Tiny everything: the micro preset on 64 px crops of a tiny synthetic screen, one CPU thread. The kill
cases run the real CLI in a subprocess with one function patched to SIGKILL the process at the chosen point."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mae_fast import cli
from mae_fast.cli.common import run_command
from mae_fast.checkpoint import CheckpointError
from mae_fast.interop import load_any
from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
from mae_fast.io import LOCK_NAME, OutputBusyError, OutputLock, beside_lock_path, folder_lock_path
from tests.helpers import ROOT, run_as_if_killed_after
from mae_fast.training.checkpointing import list_checkpoints, read_train_state, write_checkpoint
from mae_fast.training.metrics import MetricsLog

ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
MICRO = "mae_vit_micro_patch16_256"
HOLD = ("import sys, time\nfrom mae_fast.io import OutputLock\nlock = OutputLock(sys.argv[1], 'held by a test')\n"
        "print('ready', flush=True)\ntime.sleep(600)\n")


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    cfg = SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=2, complex_size=2, n_singletons=1,
                                n_empty_controls=1, n_crispr_controls=1, site_size=256, seed=3)
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), cfg)


def train_args(data: str, out, steps: int = 3, *extra: str) -> list[str]:
    return ["train", "--preset", MICRO, "--data", data, "--out", str(out), "--steps", str(steps),
            "--global-batch", "4", "--micro-batch", "4", "--lr", "1e-3", "--no-progress",
            "--set", "model.img_size=64", "--set", "data.num_workers=0", "--set", "data.crops_per_image=2",
            "--set", "checkpoint_every=1", "--set", "threads=1", "--set", "peak_tflops=1",
            "--set", "tensorboard=false", "--set", "val_crops=1", "--set", "log_every=1", *extra]


@pytest.fixture(scope="module")
def finished_run(screen, tmp_path_factory):
    """A 3-step run (checkpoints after every step) started with --overwrite."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert cli.main(train_args(screen.root, out, 3, "--overwrite")) == 0
    return out


def hold_lock(path: str) -> subprocess.Popen:
    """A second process (cheap: no torch) holding the output lock `path`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, path], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def run_cli_killed_at(patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`mae-fast ARGV` in a subprocess after `patch` (which SIGKILLs the process at the chosen point)."""
    code = f"{patch}\nimport sys\nfrom mae_fast.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *argv], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"mae-fast {command}: error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


# ------------------------------------------------------------------------------------------------------------
# 1. one writer per output
# ------------------------------------------------------------------------------------------------------------

def test_lock_names_the_holder_and_takes_over_a_dead_ones(tmp_path, caplog):
    path = folder_lock_path(str(tmp_path / "out"))
    holder = hold_lock(path)
    try:
        with pytest.raises(OutputBusyError, match=rf"in use by pid {holder.pid} on {os.uname().nodename} \(started "):
            OutputLock(path, "the output")
    finally:
        kill(holder)  # SIGKILL: the lock file stays, naming a dead process
    assert json.loads(open(path).read())["pid"] == holder.pid
    with OutputLock(path, "the output") as lock:
        assert lock.took_over and f"pid {holder.pid}" in lock.took_over
        assert json.loads(open(path).read())["pid"] == os.getpid()
    assert f"took over the stale lock of pid {holder.pid}" in caplog.text  # a warning of mae_fast.io
    assert not os.path.exists(path)  # released
    with OutputLock(folder_lock_path(str(tmp_path / "new")), "a new output"):
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()  # the folder made for the lock is not left behind empty


def test_dead_holder_whose_lock_is_still_held_is_taken_over(tmp_path, monkeypatch):
    """A killed run's forked worker may still hold the flock: a holder dead on this host is replaced anyway."""
    path = str(tmp_path / "x.lock")
    holder = hold_lock(path)
    try:
        record = json.loads(open(path).read())
        with open(path, "w") as f:  # the file names a pid that no longer runs, while `holder` keeps the flock
            json.dump({**record, "pid": 2 ** 22 + 12345}, f)
        with OutputLock(path, "x") as lock:
            assert "pid 4206649" in lock.took_over
    finally:
        kill(holder)


def test_two_train_processes_on_one_folder(screen, tmp_path, capsys):
    out = tmp_path / "race"
    first = subprocess.Popen([sys.executable, "-m", "mae_fast.cli", *train_args(screen.root, out, 500)], env=ENV,
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not list_checkpoints(str(out)):
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        before = set(os.listdir(out))
        assert cli.main(train_args(screen.root, out, 8, "--seed", "1")) == 2
        line = one_error_line(capsys, "train")
        assert f"run folder {out} is in use by pid {first.pid}" in line
        assert cli.main(train_args(screen.root, out, 8, "--overwrite")) == 2  # nothing deleted under the runner
        assert f"pid {first.pid}" in one_error_line(capsys, "train")
        assert before <= set(os.listdir(out)) and first.poll() is None
        assert json.loads((out / "train_config.json").read_text())["seed"] == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stderr.close()
    assert cli.main(train_args(screen.root, out, 2, "--overwrite")) == 0  # the dead runner's lock is taken over
    assert f"took over the stale lock of pid {first.pid}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


def test_embed_pack_and_evaluate_refuse_a_held_output(screen, finished_run, tmp_path, capsys):
    table = str(tmp_path / "emb" / "e.parquet")
    cases = [
        ("embed", beside_lock_path(table), ["embed", "--checkpoint", str(finished_run / "model"), "--data",
                                            screen.root, "--out", table, "--no-progress"]),
        ("pack", beside_lock_path(str(tmp_path / "packed")), ["pack", "--source", screen.root, "--out",
                                                              str(tmp_path / "packed"), "--codec", "raw"]),
        ("evaluate", folder_lock_path(str(tmp_path / "eval")),
         ["evaluate", table, "--relationships", screen.relationships_csv, "--out", str(tmp_path / "eval")]),
    ]
    for command, lock, argv in cases:
        holder = hold_lock(lock)
        try:
            assert cli.main(argv) == 2
            assert f"is in use by pid {holder.pid}" in one_error_line(capsys, command)
        finally:
            kill(holder)
    assert not os.path.exists(table) and not os.path.exists(tmp_path / "packed")


# ------------------------------------------------------------------------------------------------------------
# 2. finite settings, finite checkpoints, strict JSON metrics
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
    (["--lr", "inf"], "argument --lr: must be a finite number, got 'inf'"),
    (["--lr", "-1"], "argument --lr: must be > 0"),
    (["--set", "lr=.nan"], "config key 'lr' must be finite, got nan"),
    (["--set", "weight_decay=.nan"], "config key 'weight_decay' must be finite"),
    (["--set", "betas=[0.9,.nan]"], "config key 'betas' must be finite"),
    (["--set", "model.mask_ratio=.nan"], "config key 'model.mask_ratio' must be finite"),
    (["--set", "max_seconds=.inf"], "config key 'max_seconds' must be finite"),
])
def test_non_finite_settings_are_refused_before_any_work(screen, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    try:
        rc = cli.main(train_args(screen.root, out, 2, *extra))
    except SystemExit as exit_:  # argparse refuses a flag's value itself
        rc = exit_.code
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_value_in_a_config_file_names_the_file(screen, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("weight_decay: .nan\n")
    assert cli.main(train_args(screen.root, tmp_path / "never", 2, "--config", str(config))) == 2
    assert f"{config}: config key 'weight_decay' must be finite" in one_error_line(capsys, "train")


def test_weights_turned_nan_are_never_a_good_checkpoint(screen, tmp_path, monkeypatch, capsys):
    """A NaN lr from step 2 on (as `--lr nan` once gave): the loss of step 2 is still finite, the weights after it
    are not; checkpoint 2 is refused and the error names checkpoint 1, whose weights are finite, and a way on
    that works (a resume needs the same lr)."""
    from mae_fast.training import step as loop  # where the train step looks the schedule up

    schedule = loop.one_cycle_cosine
    monkeypatch.setattr(loop, "one_cycle_cosine",
                        lambda step, *a, **k: float("nan") if step >= 1 else schedule(step, *a, **k))
    out = tmp_path / "nan"
    assert cli.main(train_args(str(screen.root), out, 4)) == 3
    err = capsys.readouterr().err
    good = out / "checkpoints" / "step_00000001"
    assert "the weights became non-finite by step 2 of 4" in err
    assert f"the last good checkpoint is {good} (its weights are finite)" in err
    assert f"--set init_from={good} --lr LOWER" in err
    assert [s for s, _ in list_checkpoints(str(out))] == [1]
    weights = load_file(str(good / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
               for line in open(out / "metrics.jsonl")]
    assert records[-1] == {"event": "non_finite_weights", "step": 2}
    assert records[1]["lr"] == "nan"  # the NaN lr of step 2, written as text: the file stays strict JSON
    monkeypatch.setattr(loop, "one_cycle_cosine", schedule)
    assert cli.main(train_args(str(screen.root), tmp_path / "again", 4, "--set", f"init_from={good}")) == 0


def test_write_checkpoint_refuses_non_finite_weights(tmp_path):
    from mae_fast.models import model_config

    cfg = model_config(MICRO)
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf"), float("nan")]), "n": torch.tensor(3)}
    with pytest.raises(CheckpointError, match=r"step 5 hold 2 non-finite values in 1 tensor\(s\) \(e.g. b\)"):
        write_checkpoint(str(tmp_path), 5, cfg, state, {"step": 5}, keep_last=3)
    assert not os.path.exists(tmp_path / "checkpoints" / "step_00000005")


def test_metrics_log_is_strict_json(tmp_path):
    log = MetricsLog(str(tmp_path), None, tensorboard=False)
    log.write({"step": 1, "loss": float("nan"), "lr": float("inf"), "mfu": None})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {"step": 1, "loss": "nan", "lr": "inf",
                                                                          "mfu": None}


# ------------------------------------------------------------------------------------------------------------
# 3. --resume after any start, in its short form
# ------------------------------------------------------------------------------------------------------------

def test_resume_of_a_run_started_with_overwrite_in_short_forms(finished_run, tmp_path, capsys):
    saved = json.loads((finished_run / "train_config.json").read_text())
    assert saved["overwrite"] is False and saved["resume"] is False
    for i, extra in enumerate(([], ["--preset", MICRO])):
        copy = run_as_if_killed_after(str(finished_run), tmp_path / f"killed{i}", 1)
        assert cli.main(["train", "--resume", "--out", copy, "--no-progress", *extra]) == 0
        assert json.loads(open(os.path.join(copy, "train_summary.json")).read())["resumed_from"] == 1
    # a run folder of an older version stored `overwrite: true`: the one-shot flag is not part of the run
    copy = run_as_if_killed_after(str(finished_run), tmp_path / "old", 1)
    path = os.path.join(copy, "train_config.json")
    json.dump({**saved, "overwrite": True}, open(path, "w"))
    assert cli.main(["train", "--resume", "--out", copy, "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--preset", MICRO]) == 2
    assert "--resume: give the run folder to continue with --out DIR" in one_error_line(capsys, "train")
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "none"), "--preset", MICRO]) == 2
    assert "train_config.json does not exist" in one_error_line(capsys, "train")


# ------------------------------------------------------------------------------------------------------------
# 4. one error line (file named, exit code 2), never a traceback
# ------------------------------------------------------------------------------------------------------------

def _screen_copy(screen, tmp_path, name: str):
    import shutil

    copy = tmp_path / name
    shutil.copytree(screen.root, copy)
    return copy


def test_train_and_pack_on_bad_data(screen, tmp_path, capsys):
    bad = _screen_copy(screen, tmp_path, "bad")
    victim = sorted((bad / "images").rglob("*_w3.png"))[0]
    victim.unlink()
    assert cli.main(train_args(str(bad), tmp_path / "run", 2)) == 2
    assert "[missing_file]" in (line := one_error_line(capsys, "train")) and str(victim) in line
    assert cli.main(["pack", "--source", str(bad), "--out", str(tmp_path / "p"), "--codec", "raw"]) == 2
    assert str(victim) in one_error_line(capsys, "pack")
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()


def test_unwritable_output(screen, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(train_args(screen.root, blocker / "run", 2)) == 2
    assert f"{blocker / 'run'}: Not a directory" in one_error_line(capsys, "train")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the permission case needs another user")
    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert cli.main(train_args(screen.root, locked / "run", 2)) == 2
        assert "Permission denied" in one_error_line(capsys, "train")
    finally:
        locked.chmod(0o700)


def test_error_handler_one_line_and_debug_traceback(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "/out/model/config.json")

    assert run_command(denied, None, "mae-fast x") == 2
    assert capsys.readouterr().err == "mae-fast x: error: /out/model/config.json: Permission denied\n"
    monkeypatch.setenv("MAE_FAST_DEBUG", "1")
    assert run_command(denied, None, "mae-fast x") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("mae-fast x: error: /out/model/config.json: Permission denied\n")

    def bug(args):
        raise KeyError("a programming error")  # not a user error: its traceback is not hidden

    with pytest.raises(KeyError):
        run_command(bug, None, "mae-fast x")


def test_evaluate_on_malformed_tables(screen, finished_run, tmp_path, capsys):
    table = str(tmp_path / "e.parquet")
    assert cli.main(["embed", "--checkpoint", str(finished_run / "model"), "--data", screen.root, "--out", table,
                     "--no-progress"]) == 0
    not_parquet = tmp_path / "png.parquet"
    not_parquet.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("entity1,entity2\nGÈNE1,b\n".encode("latin-1"))
    out = str(tmp_path / "eval")
    rel = screen.relationships_csv
    for embeddings, relationships, expected in [
        (str(not_parquet), rel, f"{not_parquet}: table is not a readable parquet file"),
        (table, str(empty), f"{empty}: relationship file is empty"),
        (table, str(latin), f"{latin}: relationship file is not UTF-8 text (it holds the byte 0xc8)"),
    ]:
        capsys.readouterr()
        assert cli.main(["evaluate", embeddings, "--relationships", relationships, "--out", out]) == 2
        assert expected in one_error_line(capsys, "evaluate")
    assert not os.path.exists(out)


@pytest.mark.parametrize("flag, value, message", [
    ("--seconds", "-1", "argument --seconds: must be > 0, got -1"),
    ("--seconds", "nan", "argument --seconds: must be a finite number"),
    ("--batch-size", "0", "argument --batch-size: must be >= 1, got 0"),
    ("--lr", "inf", "argument --lr: must be a finite number"),
])
def test_demo_options_checked_before_the_screen_is_generated(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--tiny", "--out", str(tmp_path / "d"), flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_settings_checked_as_a_whole_before_the_screen(tmp_path, capsys):
    assert cli.main(["demo", "--tiny", "--out", str(tmp_path / "d"), "--models", "wsl_densenet_micro_256,nope"]) == 2
    assert "unknown model preset(s) nope" in one_error_line(capsys, "demo")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------------------------
# 5. unclear errors made clear
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"", "metadata CSV is empty (no header line)"),
    ("well_id,experiment_name,plate,address,gene\nx,synth-001,1,B02,GÈNE\n".encode("latin-1"),
     "metadata CSV is not UTF-8 text (it holds the byte 0xc8)"),
])
def test_bad_metadata_csv_is_named(screen, tmp_path, capsys, content, message):
    copy = _screen_copy(screen, tmp_path, "m")
    (copy / "metadata.csv").write_bytes(content)
    assert cli.main(train_args(str(copy), tmp_path / "never", 2)) == 2
    assert f"{copy / 'metadata.csv'}: {message}" in one_error_line(capsys, "train")


def test_metadata_without_gene_column_says_which_column_is_used(screen, tmp_path, caplog):
    from mae_fast.data.index import SiteIndex

    copy = _screen_copy(screen, tmp_path, "nogene")
    meta = pd.read_csv(copy / "metadata.csv")
    meta.drop(columns=["gene"]).to_csv(copy / "metadata.csv", index=False)
    with caplog.at_level("WARNING", logger="mae_fast.data"):
        index = SiteIndex.from_rxrx(str(copy))
    assert f"{copy / 'metadata.csv'} has no 'gene' column: a site's perturbation is read from 'treatment'" \
        in caplog.text
    assert {s.perturbation for s in index} == set(meta["treatment"].dropna().astype(str))
    caplog.clear()
    meta.drop(columns=["gene", "treatment"]).to_csv(copy / "metadata.csv", index=False)
    with caplog.at_level("WARNING", logger="mae_fast.data"):
        index = SiteIndex.from_rxrx(str(copy))
    assert "none of ('gene', 'treatment', 'sirna', 'sirna_id') is present" in caplog.text
    assert {s.perturbation for s in index} == {None}


def test_config_json_that_is_not_json(finished_run, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(finished_run / "model", model)
    (model / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not JSON \(Expecting property name"):
        load_any(str(model))


@pytest.mark.parametrize("argv, message", [
    (["--in-chans", "0"], "argument --in-chans: must be >= 1, got 0"),
    (["--crops", "-5"], "argument --crops: must be > 0, got -5"),
    (["--mask-ratio", "nan"], "argument --mask-ratio: must be a finite number"),
])
def test_flops_refuses_nonsense(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["flops", "--no-plot", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# 6. what kills leave behind
# ------------------------------------------------------------------------------------------------------------

KILL_WHILE_PRUNING = """
import os, shutil, signal
from mae_fast.training import checkpointing
real_rmtree = shutil.rmtree
def rmtree(path, *args, **kwargs):
    if "discarded-step_00000001" in str(path):  # pruning checkpoint 1: one file gone, then killed
        os.remove(os.path.join(path, "model.safetensors"))
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)
checkpointing.shutil.rmtree = rmtree
"""


def test_kill_while_pruning_then_resume_cleans_up(screen, finished_run, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = train_args(screen.root, out, 3, "--overwrite")  # the same settings as finished_run
    proc = run_cli_killed_at(KILL_WHILE_PRUNING, args + ["--set", "keep_last=1"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = out / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-discarded-step_00000001")]
    assert leftovers and [s for s, _ in list_checkpoints(str(out))] == [2]
    # and what an older version left: a half-deleted step folder, and a 0-byte temporary of an atomic write
    (root / "step_00000000").mkdir()
    (root / "step_00000000" / "config.json").write_text("{}")
    (out / "model").mkdir(exist_ok=True)
    (out / "model" / ".tmp-abc123-model.safetensors").write_bytes(b"")
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(out), "--no-progress", "--set", "keep_last=1"]) == 0
    printed = capsys.readouterr().out
    assert "removed 3 leftover(s) of an interrupted run" in printed
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert not any(p.name.startswith(".tmp-") for p in (out / "model").iterdir())
    ref = load_file(str(finished_run / "model" / "model.safetensors"))
    got = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # resumed to the same weights


def test_resume_falls_back_to_the_newest_intact_checkpoint(finished_run, tmp_path, capsys):
    copy = run_as_if_killed_after(str(finished_run), tmp_path / "corrupt", 2)
    newest = os.path.join(copy, "checkpoints", "step_00000002")
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.truncate(100)  # a disk-full or torn write of the newest checkpoint
    assert cli.main(["train", "--resume", "--out", copy, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {copy}/checkpoints/step_00000001, the newest intact checkpoint; left out (and removed): " \
           "step_00000002 (" in printed
    assert json.load(open(os.path.join(copy, "train_summary.json")))["resumed_from"] == 1
    assert read_train_state(newest)["step"] == 2  # written again by the resumed run
    ref = load_file(str(finished_run / "model" / "model.safetensors"))
    got = load_file(os.path.join(copy, "model", "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


KILL_BETWEEN_TABLES = """
import os, signal
import pyarrow.parquet as pq
real_write = pq.write_table
def write_table(table, where, *args, **kwargs):
    if str(where).endswith("_sites.parquet"):  # the well table is in place; the site table's temporary is empty
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(table, where, *args, **kwargs)
pq.write_table = write_table
"""


def test_embed_sites_killed_between_tables_reruns_to_finish(screen, finished_run, tmp_path, capsys):
    out = tmp_path / "emb" / "e.parquet"
    argv = ["embed", "--checkpoint", str(finished_run / "model"), "--data", screen.root, "--out", str(out),
            "--sites", "--no-progress"]
    proc = run_cli_killed_at(KILL_BETWEEN_TABLES, argv)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    sites = tmp_path / "emb" / "e_sites.parquet"
    temporaries = [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    assert out.exists() and not sites.exists() and temporaries
    capsys.readouterr()
    assert cli.main(argv) == 0  # no --overwrite needed, nothing embedded again
    printed = capsys.readouterr().out
    assert "2 plate(s) already done" in printed and "(0 tiles in" in printed
    assert f"removed 1 temporary file(s) of an interrupted run: {temporaries[0]}" in printed
    assert not any(p.name.startswith(".tmp-") for p in out.parent.iterdir())
    straight = tmp_path / "straight.parquet"
    assert cli.main(["embed", "--checkpoint", str(finished_run / "model"), "--data", screen.root, "--out",
                     str(straight), "--sites", "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(sites), pd.read_parquet(tmp_path / "straight_sites.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(straight))
    capsys.readouterr()
    assert cli.main(argv) == 2  # both tables there: a rerun is refused as before
    assert "exists; pass --overwrite" in one_error_line(capsys, "embed")
