"""`mae-fast train` on a tiny synthetic screen: configuration errors, outputs, exact resume (in process and after a
SIGKILL), non-finite loss handling. Tiny everything: micro preset with 64 px crops, 2 crops per decoded site (so
epochs roll over within a few steps), one CPU thread."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mae_fast.cli import train as train_cli
from mae_fast.training.checkpointing import list_checkpoints, read_train_state
from mae_fast.training.config import _toml_reader, validate
from mae_fast.checkpoint import CheckpointError, load_model, save_model
from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
from mae_fast.models import MaskedAutoencoder, create_model
from mae_fast.training.config import ConfigError, DataConfig, TrainConfig, build_config, set_key
from mae_fast.training.loop import NonFiniteLossError, train
from mae_fast.training.recipes import optimizer_recipe
from tests.helpers import ROOT, run_as_if_killed_after



@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    cfg = SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=2, complex_size=2, n_singletons=1,
                                n_empty_controls=1, n_crispr_controls=1, site_size=256, seed=3)
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), cfg)


def tiny_config(root: str, out, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        preset="mae_vit_micro_patch16_256", model={"img_size": 64, "drop_path": 0.1},
        data=DataConfig(root=root, num_workers=0, crops_per_image=2), out_dir=str(out),
        global_batch=8, micro_batch=4, steps=6, lr=1e-3, checkpoint_every=3, keep_last=10, log_every=1,
        recon_every=4, val_crops=2, threads=1, progress=False, peak_tflops=1.0, tensorboard=False,
        amp="fp32",  # numbers compared across runs; `auto` is bf16 on CPUs with native bf16 (its own test)
    )
    for key, value in overrides.items():
        set_key(cfg, key.replace("__", "."), value)
    return cfg


@pytest.fixture(scope="module")
def reference_run(screen, tmp_path_factory):
    """One uninterrupted 6-step run (2 micro-batches per step, checkpoints at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    return train(tiny_config(screen.root, out))


# ------------------------------------------------------------------------------------------------------------
# configuration errors, all before any work (the output folder is never created)
# ------------------------------------------------------------------------------------------------------------

def test_unknown_preset_and_keys_list_the_valid_ones(screen, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="unknown preset 'mae_vit_huge'.*mae_vit_small_patch16_256"):
        train(tiny_config(screen.root, out, preset="mae_vit_huge"))
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'; valid keys: .*global_batch.*model.img"):
        build_config(overrides=["learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="unknown config key 'model.imgsize'"):
        build_config(overrides=["model.imgsize=64"])
    with pytest.raises(ConfigError, match="unknown config key 'data.rooot'"):
        build_config(overrides=["data.rooot=/x"])
    with pytest.raises(ConfigError, match="'global_batch': expected int, got 'many'"):
        build_config(overrides=["global_batch=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: mae_vit_micro_patch16_256\nmodel:\n  depht: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.depht'"):
        build_config(config_file=str(bad))
    assert not out.exists()


def test_config_file_yaml_toml_and_overrides(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("preset: mae_vit_micro_patch8_256\nglobal_batch: 64\nmodel:\n  img_size: 128\n"
                   "data:\n  root: /data/a\n  plates: [1, 2]\n")
    cfg = build_config(config_file=str(yml), overrides=["global_batch=32", "model.mask_ratio=0.25", "data.root=/b"])
    assert (cfg.preset, cfg.global_batch, cfg.data.root) == ("mae_vit_micro_patch8_256", 32, "/b")
    assert cfg.data.plates == ["1", "2"]
    assert cfg.model == {"img_size": 128, "mask_ratio": 0.25}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # round trip through the saved JSON form
    cfg.micro_batch, cfg.crops = 8, 100
    plan = validate(cfg)
    assert (plan.model_cfg.img_size, plan.model_cfg.patch_size, plan.n_micro, plan.total_steps) == (128, 8, 4, 4)
    assert plan.lr == 1e-4 and optimizer_recipe(plan.model_cfg).lr == 1e-4  # the preset's paper lr
    try:
        _toml_reader()
    except ConfigError:
        return  # Python 3.10 without tomli: TOML files are refused with a clear message
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "camae_vit_micro_patch16_256"\nsteps = 5\n[model]\nin_chans = 5\n[data]\nroot = "/c"\n')
    cfg2 = build_config(config_file=str(toml))
    assert (cfg2.preset, cfg2.steps, cfg2.data.root) == ("camae_vit_micro_patch16_256", 5, "/c")
    assert cfg2.model == {"in_chans": 5}


@pytest.mark.parametrize("overrides, message", [
    ({"global_batch": 10, "micro_batch": 4}, "global_batch 10 is not a multiple of micro_batch 4"),
    ({"steps": 5, "crops": 100}, "exactly one of steps or crops"),
    ({"data__shards": 3}, "do not split evenly over 3 data shards"),
    ({"compile": True, "compile_backend": "cudagraphs"}, "needs a CUDA device"),
    ({"device": "cuda"}, "sees no CUDA device"),
    ({"data__plates": [99]}, r"matches no site.*plates \['1', '2'\]"),
    ({"data__root": "/no/such/screen"}, "does not exist"),
    ({"amp": "fp16"}, "valid values: auto, bf16, fp32"),
    ({"compile_mode": "everything"}, "valid values: regional, model"),
    ({"activation_checkpointing_policy": "some"}, "valid values: full, selective"),
    ({"schedule_clock": "wall"}, "valid values: steps, time"),
    ({"schedule_clock": "time"}, "schedule_clock=time needs max_seconds > 0"),
    ({"schedule_clock": "time", "max_seconds": 60.0, "resume": True}, "schedule_clock=time cannot resume"),
])
def test_bad_settings_fail_before_work(screen, tmp_path, overrides, message):
    if "cuda" in message.lower() or "CUDA" in message:
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(screen.root, out, **overrides))
    assert not out.exists()


def test_cli_reports_errors_with_exit_code(screen, tmp_path, capsys):
    rc = train_cli.main(["--preset", "nope", "--data", screen.root, "--out", str(tmp_path / "x"), "--steps", "1"])
    assert rc == 2 and "unknown preset 'nope'" in capsys.readouterr().err
    assert train_cli.main(["--list-presets"]) == 0
    assert "mae_vit_large_patch8_256" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# a few steps: outputs
# ------------------------------------------------------------------------------------------------------------

def test_few_steps_write_every_output(reference_run):
    r = reference_run
    out = r.out_dir
    assert r.steps == 6 and r.crops == 48 and len(r.losses) == 6 and r.resumed_from is None
    assert all(0 < x < 10 for x in r.losses)
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == [3, 6]
    lines = [json.loads(x) for x in open(r.metrics_path)]
    logged = [x for x in lines if "event" not in x]
    assert [x["step"] for x in logged] == list(range(1, 7))
    assert [x["loss"] for x in logged] == r.losses
    assert lines[-1]["event"] == "finished"
    assert all(x["crops_per_s"] > 0 and x["mfu"] is not None for x in logged)  # flops module + given ceiling
    assert os.path.getsize(r.loss_curve_path) > 1000
    assert [os.path.basename(p) for p in r.recon_paths] == ["step_00000004.png", "step_00000006.png"]
    # the final weights load as a plain mae_fast checkpoint and equal the returned model's
    loaded = load_model(r.model_dir)
    assert loaded.cfg.img_size == 64
    for k, v in r.model.state_dict().items():
        assert torch.equal(v.cpu(), loaded.state_dict()[k]), k
    # the step-6 checkpoint holds the same weights; its train state loads with weights_only
    last = load_file(os.path.join(out, "checkpoints", "step_00000006", "model.safetensors"))
    assert all(torch.equal(last[k], v) for k, v in loaded.state_dict().items())
    state = read_train_state(os.path.join(out, "checkpoints", "step_00000006"))
    assert state["step"] == 6 and state["losses"].tolist() == r.losses and 0 in state["loader"]


def test_existing_output_is_refused_unless_overwrite(screen, reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run.out_dir, out)
    with pytest.raises(ConfigError, match="exists and is not empty; pass --overwrite"):
        train(tiny_config(screen.root, out))
    r = train(tiny_config(screen.root, out, overwrite=True, steps=1, recon_every=0))
    assert r.steps == 1 and [s for s, _ in list_checkpoints(out)] == [1]


def test_auto_amp_trains_in_the_cpus_native_dtype_and_says_so(screen, tmp_path, capsys):
    """amp=auto: bf16 autocast where the CPU has native bf16 units (fp32 elsewhere), named in the header line and
    the summary; the MFU ceiling is measured in that dtype."""
    from mae_fast.device import amp_label, default_amp

    amp = default_amp(torch.device("cpu"))
    r = train(tiny_config(screen.root, tmp_path / "auto", amp="auto", steps=2, recon_every=0, peak_tflops=0.0))
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("training "))
    assert f"cpu {amp_label(amp, 'auto', torch.device('cpu'))} -> " in header and "(auto: " in header
    summary = json.loads(open(os.path.join(r.out_dir, "train_summary.json")).read())
    assert summary["amp"] == ("bf16" if amp else "fp32") and all(0 < x < 10 for x in r.losses)


def test_keep_last_checkpoints(screen, tmp_path):
    r = train(tiny_config(screen.root, tmp_path / "k", steps=4, checkpoint_every=1, keep_last=2, recon_every=0,
                          global_batch=4))
    assert [s for s, _ in list_checkpoints(r.out_dir)] == [3, 4]


# ------------------------------------------------------------------------------------------------------------
# exact resume
# ------------------------------------------------------------------------------------------------------------

SHORT = dict(steps=2, checkpoint_every=2, recon_every=0)


@pytest.fixture(scope="module")
def short_run(screen, tmp_path_factory):
    return train(tiny_config(screen.root, tmp_path_factory.mktemp("runs") / "short", **SHORT))


def test_regional_compilation_trains_like_eager(screen, short_run, tmp_path):
    """compile=True compiles each transformer block (compile_mode regional, the default); the run computes what the
    eager run computes."""
    from mae_fast.compiling import repeated_blocks

    short, eager = SHORT, short_run
    torch._dynamo.reset()
    compiled = train(tiny_config(screen.root, tmp_path / "compiled", compile=True, compile_backend="aot_eager",
                                 **short))
    blocks = repeated_blocks(compiled.model)
    assert len(blocks) == 4 + 2 and all(b._compiled_call_impl is not None for b in blocks)
    assert all(b._compiled_call_impl is None for b in repeated_blocks(eager.model))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], v, atol=1e-5, rtol=1e-5)


def test_selective_activation_checkpointing_trains_like_eager(screen, short_run, tmp_path):
    r = train(tiny_config(screen.root, tmp_path / "sac", activation_checkpointing=True,
                          activation_checkpointing_policy="selective", **SHORT))
    assert r.losses == pytest.approx(short_run.losses, rel=1e-6)  # recomputation preserves the drop-path draws
    for k, v in short_run.model.state_dict().items():
        torch.testing.assert_close(r.model.state_dict()[k], v, atol=1e-6, rtol=1e-6)


def test_resume_continues_exactly(screen, reference_run, tmp_path):
    out = run_as_if_killed_after(reference_run.out_dir, tmp_path / "resumed", 3)
    r = train(tiny_config(screen.root, out, resume=True))
    assert r.resumed_from == 3 and r.steps == 6
    assert r.losses == reference_run.losses  # steps 1-3 restored, 4-6 recomputed: bit for bit
    for k, v in reference_run.model.state_dict().items():
        assert torch.equal(v, r.model.state_dict()[k]), k
    metrics = [json.loads(x) for x in open(r.metrics_path)]
    assert [x["step"] for x in metrics if "event" not in x] == list(range(1, 7))


def test_a_run_saved_before_the_optimiser_left_the_model_config_resumes_exactly(screen, reference_run, tmp_path):
    """A run folder as the earlier version wrote it: its lr under `model` (train_config.json and the checkpoints'
    train state) and the optimiser settings in the checkpoints' config.json. `--resume --out` maps model.lr onto lr
    and goes on bit for bit."""
    from mae_fast.training.checkpointing import read_run_config

    out = run_as_if_killed_after(reference_run.out_dir, tmp_path / "old", 3)

    def old_style(config: dict) -> dict:
        return {**config, "lr": None, "model": {**config["model"], "lr": config["lr"]}}

    run_config = os.path.join(out, "train_config.json")
    json.dump(old_style(json.load(open(run_config))), open(run_config, "w"))
    for _, path in list_checkpoints(out):
        state = read_train_state(path)
        state["config"] = json.dumps(old_style(json.loads(state["config"])))
        torch.save(state, os.path.join(path, "train_state.pt"))
        meta = json.load(open(os.path.join(path, "config.json")))
        json.dump({**meta, "lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]},
                  open(os.path.join(path, "config.json"), "w"))
    assert json.load(open(run_config))["model"]["lr"] == 1e-3
    cfg = build_config(overrides=[f"out_dir={out}", "resume=true"], base=read_run_config(out))  # as the CLI does
    assert cfg.lr == 1e-3 and "lr" not in cfg.model
    r = train(cfg)
    assert r.resumed_from == 3 and r.losses == reference_run.losses
    for k, v in reference_run.model.state_dict().items():
        assert torch.equal(v, r.model.state_dict()[k]), k


def test_time_budget_stops_with_a_checkpoint_that_resumes_exactly(screen, reference_run, tmp_path):
    out = tmp_path / "budget"
    first = train(tiny_config(screen.root, out, max_seconds=1e-9))  # over budget after the first step
    assert first.stopped_early and first.steps == 1 and first.total_steps == 6
    assert [s for s, _ in list_checkpoints(str(out))] == [1] and os.path.exists(first.model_dir)
    rest = train(tiny_config(screen.root, out, resume=True))
    assert rest.resumed_from == 1 and not rest.stopped_early and rest.losses == reference_run.losses


def test_time_clock_schedule_warms_up_and_anneals_within_the_budget(screen, tmp_path, capsys):
    """schedule_clock=time (the demo's): a schedule planned far longer than the budget still warms up and anneals
    by max_seconds, and reaching the budget is the run's planned end, not an early stop."""
    from mae_fast.logs import configure_logging

    configure_logging(0)  # the run's lines to stdout, as the command line prints them
    out = tmp_path / "clock"
    r = train(tiny_config(screen.root, out, steps=100_000, max_seconds=3.0, schedule_clock="time", recon_every=0,
                          checkpoint_every=100_000))
    assert 3 < r.steps < 100_000 and not r.stopped_early and r.seconds >= 3.0
    lrs = [row["lr"] for row in map(json.loads, open(r.metrics_path)) if "lr" in row]
    peak = max(lrs)
    assert lrs[0] < 0.1 * 1e-3 and peak > 0.9 * 1e-3     # warmed up from lr/25 to the peak...
    assert lrs.index(peak) < len(lrs) // 2 and lrs[-1] < 0.05 * 1e-3   # ...and annealed by the budget
    assert all(a >= b for a, b in zip(lrs[lrs.index(peak):], lrs[lrs.index(peak) + 1:]))
    summary = json.load(open(out / "train_summary.json"))
    assert summary["schedule_clock"] == "time" and summary["stopped_early"] is False
    assert "the schedule followed the clock: annealed in the 3 s budget" in capsys.readouterr().out


def test_resume_refuses_changed_settings_and_other_architectures(screen, reference_run, tmp_path):
    out = run_as_if_killed_after(reference_run.out_dir, tmp_path / "resumed", 3)
    changed = r"differs from the saved run \(.*step_00000003\) in .*lr \(saved 0.001, now 0.002\)"
    with pytest.raises(ConfigError, match=changed):
        train(tiny_config(screen.root, out, resume=True, lr=2e-3))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(tiny_config(screen.root, tmp_path / "empty", resume=True))
    # weights of another architecture: every mismatched key is named
    other = tmp_path / "other"
    save_model(create_model("mae_vit_micro_patch16_256", img_size=64, depth=2), str(other))
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.blocks\.2\..*"):
        train(tiny_config(screen.root, tmp_path / "init", init_from=str(other)))


def test_init_from_loads_the_weights(screen, reference_run, tmp_path):
    r = train(tiny_config(screen.root, tmp_path / "init", init_from=reference_run.model_dir, steps=1, lr=1e-30,
                          recon_every=0, weight_decay=0.0))
    for k, v in reference_run.model.state_dict().items():  # lr ~0: the loaded weights come back unchanged
        assert torch.allclose(v, r.model.state_dict()[k], atol=1e-20), k


def _command(args: list[str]) -> list[str]:
    from mae_fast.cli import COMMANDS

    if "train" in COMMANDS:
        return [sys.executable, "-m", "mae_fast.cli", "train", *args]
    return [sys.executable, "-m", "mae_fast.cli.train", *args]


def _logged_losses(run_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in open(run_dir / "metrics.jsonl") if '"event"' not in x]


def test_sigkill_then_resume_matches_uninterrupted(screen, tmp_path):
    args = ["--preset", "mae_vit_micro_patch16_256", "--data", screen.root, "--steps", "8",
            "--global-batch", "4", "--micro-batch", "4", "--lr", "1e-3", "--no-progress",
            "--set", "model.img_size=64", "--set", "data.num_workers=0", "--set", "data.crops_per_image=2",
            "--set", "checkpoint_every=2", "--set", "threads=1", "--set", "peak_tflops=1",
            "--set", "tensorboard=false", "--set", "val_crops=1", "--set", "log_every=1"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(args + ["--out", str(killed)]), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list_checkpoints(str(killed)):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    at_kill = list_checkpoints(str(killed))[-1][0]
    assert at_kill < 8 and not (killed / "model").exists()  # killed mid-run

    resumed = subprocess.run(_command(args + ["--out", str(killed), "--resume"]), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from"] == at_kill and summary["steps"] == 8

    # the uninterrupted run, in this process from the same command line (one thread either way: same arithmetic)
    straight = tmp_path / "straight"
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    train(train_cli.config_from_args(parser.parse_args(args + ["--out", str(straight)])))
    a = load_file(str(killed / "model" / "model.safetensors"))
    b = load_file(str(straight / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _logged_losses(killed) == _logged_losses(straight) and len(_logged_losses(killed)) == 8
    final = [read_train_state(str(d / "checkpoints" / "step_00000008"))["losses"].tolist()
             for d in (killed, straight)]
    assert final[0] == final[1] == _logged_losses(straight)


# ------------------------------------------------------------------------------------------------------------
# non-finite loss
# ------------------------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_naming_the_step(screen, tmp_path, monkeypatch):
    original = MaskedAutoencoder.forward
    calls = {"n": 0}

    def poisoned(self, images, *args, **kwargs):
        out = original(self, images, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:  # second micro-batch of step 4
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MaskedAutoencoder, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4 of 6.*last good checkpoint is "
                                                 r".*step_00000003"):
        train(tiny_config(screen.root, out, checkpoint_every=3, recon_every=0))
    assert [s for s, _ in list_checkpoints(str(out))] == [3]
    assert load_model(os.path.join(out, "checkpoints", "step_00000003")).cfg.img_size == 64
    events = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert events[-1] == {"event": "non_finite_loss", "step": 4, "loss": "nan"}
    monkeypatch.setattr(MaskedAutoencoder, "forward", original)
    r = train(tiny_config(screen.root, out, resume=True, recon_every=0))  # the kept checkpoint resumes
    assert r.resumed_from == 3 and r.steps == 6
