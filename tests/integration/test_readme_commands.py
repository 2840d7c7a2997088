"""Every train / torchrun / export / embed / evaluate / pack command the README prints, run as printed, in order, on
a toy synthetic screen -- so a README recipe cannot break unseen.

The commands are read from README.md's ```bash blocks at test time. Toy sizes come from one documented mechanism
(also stated in the README): the placeholders are filled in (SCREEN -> the toy screen, HOST0:PORT -> 127.0.0.1 and
a free port, corum.csv -> the screen's planted complexes), the sizes are shrunk (--nproc_per_node -> 2, or 1 per node
on the two-node line; --steps -> 2; global batch -> 8 and micro-batch -> 2, so every rank still accumulates two
micro-batches; torch.compile's backend -> aot_eager, the CPU-fast one) and `--set` overrides are appended (model
widths and crop size, one loader thread, no TensorBoard). Everything else -- presets, distributed mode, activation
checkpointing, output paths -- is the README's.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
from tests.helpers import ROOT, free_ports

ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
RUNNERS = ("mae-fast train", "mae-fast embed", "mae-fast evaluate", "mae-fast export", "mae-fast pack", "torchrun ")

SMALL_MAE = ["model.img_size=32", "model.embed_dim=64", "model.depth=2", "model.num_heads=4", "model.decoder_dim=32",
             "model.decoder_depth=1", "model.decoder_heads=4"]
TOY_MODEL = {"mae": SMALL_MAE, "wsl": ["model.img_size=64", "model.virtual_batch_size=2"],
             "munet": ["model.img_size=64"]}
TOY_RUN = ["data.num_workers=0", "data.crops_per_image=2", "threads=1", "tensorboard=false", "val_crops=1",
           "checkpoint_every=1", "peak_tflops=1", "log_every=1"]
SIZES = {"--steps": "2", "--global-batch": "8", "--micro-batch": "2"}
SET_SIZES = {"global_batch": "8", "micro_batch": "2"}


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    commands = [line.split("  #")[0].strip() for line in lines]
    return [c for c in commands if c.startswith(RUNNERS)]


def _executable(name: str) -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(beside):
        return [beside]
    return [sys.executable, "-m", {"mae-fast": "mae_fast.cli", "torchrun": "torch.distributed.run"}[name]]


def _family(preset: str) -> str:
    return "wsl" if preset.startswith("wsl") else "munet" if preset.startswith("munet") else "mae"


def toy(command: str, screen: str, port: int, node_rank: int | None = None) -> list[str]:
    """The README command as this test runs it (see the module doc)."""
    tokens = shlex.split(command.replace("SCREEN", screen).replace("HOST0:29500", f"127.0.0.1:{port}"))
    out, preset, i = [], None, 0
    while i < len(tokens):
        t = tokens[i]
        if t in SIZES or t == "--nproc_per_node" or t == "--node_rank":
            value = SIZES.get(t) or ("1" if "--nnodes" in tokens else "2")
            if t == "--node_rank":
                value = str(node_rank or 0)
            out += [t, value]
            i += 2
            continue
        if t == "--preset":
            preset = tokens[i + 1]
        if t == "--set" and "=" in tokens[i + 1]:
            key, value = tokens[i + 1].split("=", 1)
            out += [t, f"{key}={SET_SIZES.get(key, value)}"]
            if key == "compile" and value == "true":
                out += ["--set", "compile_backend=aot_eager"]
            i += 2
            continue
        out.append(t)
        i += 1
    if out[0] == "torchrun":
        out = _executable("torchrun") + ["--master_port", str(port)] * ("--nnodes" not in out) + out[1:]
    else:
        out = _executable("mae-fast") + out[1:]
    if "train" in out and preset:
        given = " ".join(out)
        sizes = [f"{k}={v}" for k, v in SET_SIZES.items()
                 if f"{k}=" not in given and f"--{k.replace('_', '-')}" not in given]
        for override in TOY_MODEL[_family(preset)] + TOY_RUN + sizes:
            out += ["--set", override]
        out.append("--no-progress")
    if "embed" in out:
        out += ["--num-workers", "0", "--batch-size", "32"]
    return out


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    cfg = SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=2, complex_size=2, n_singletons=1,
                                n_empty_controls=1, n_crispr_controls=1, site_size=256, seed=11)
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), cfg)


def test_the_readme_prints_the_recipes():
    commands = readme_commands()
    for needed in ("mae-fast train", "torchrun --nproc_per_node", "torchrun --nnodes 2", "mae-fast export",
                   "mae-fast embed", "mae-fast evaluate", "mae-fast pack"):
        assert any(c.startswith(needed) for c in commands), needed
    assert any("distributed=fsdp" in c and "global_batch=16384" in c and "micro_batch=256" in c for c in commands)


def test_every_readme_command_runs_as_printed(screen, tmp_path):
    shutil.copy(os.path.join(screen.root, "relationships", "planted_complexes.csv"), tmp_path / "corum.csv")
    for command in readme_commands():
        port = free_ports(1)[0]
        if "--nnodes 2" in command:  # both nodes' launchers on this machine, loopback only
            procs = [subprocess.Popen(toy(command, screen.root, port, node), cwd=tmp_path, env=ENV, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for node in (0, 1)]
            results = [(p, *p.communicate(timeout=600)) for p in procs]
            for p, _, err in results:
                assert p.returncode == 0, f"{command}\n{err[-3000:]}"
            continue
        proc = subprocess.run(toy(command, screen.root, port), cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    for made in ("runs/s16/model/model.safetensors", "runs/l8/model/model.safetensors", "runs/l8x2/model",
                 "models/l8/model.safetensors", "emb/embeddings.parquet", "runs/wsl_adabn/model", "runs/munet_m/model",
                 "packed/pack.json", "runs/s16_packed/model/model.safetensors"):
        assert (tmp_path / made).exists(), made
    assert any(p.suffix == ".json" for p in (tmp_path / "eval").iterdir())
    # the ViT-L line trained under FSDP with two micro-batches per rank and wrote sharded checkpoints
    assert (tmp_path / "runs/l8/checkpoints/step_00000002/sharded/.metadata").exists()
