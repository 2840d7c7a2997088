"""The recipes users run, end to end, through the real `torchrun ... mae_fast.cli train` on 2 gloo ranks of this CPU:

- the recipe matrix: distributed {ddp, fsdp} x micro-batches per rank {1, 3} x compile {off, regional} x activation
  checkpointing {off, selective} x preset {MAE, CA-MAE} (micro sizes). All 32 cells cost too much CPU for CI, so the
  cells form a covering design of strength 2: the 6 rows below hold every pair of settings at least once (checked
  by `test_the_matrix_covers_every_pair`). Each row is one torchrun run killed (SIGKILL, every rank) right after
  its step-2 checkpoint, then resumed with --resume to step 4; its loss sequence and final weights must equal a
  single process's run of the same global batch, and its final checkpoint must embed with `mae-fast embed`.
- two nodes on one machine (two torchrun launchers, --nnodes 2, c10d rendezvous on 127.0.0.1): every site read by
  exactly one rank per epoch, the run equal to the single-node 2-process run;
- errors under torchrun: one `[rank N] mae-fast train: error: ...` line per rank, no mae_fast traceback; a rank
  that dies stops the others within seconds.

Tolerances. One micro-batch per rank: bit for bit (the gradients differ from one process's only by exact halvings
and one commutative addition; one thread per process). Three micro-batches per rank: the same crops, masks and
drop-path draws, but a rank sums its three micro-batch gradients before the ranks' average while one process sums
all six in order -- float addition in another order, ~1e-7 relative per gradient element. Lion then takes the sign
of the update, so an element whose update is within rounding of zero may step the other way (a 2*lr difference in
that weight). Hence: losses within 1e-5 relative, and weights within 2*lr*steps everywhere with at most 0.1% of the
elements further apart than 1e-6.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mae_fast import cli
from mae_fast.cli import train as train_cli
from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
from mae_fast.training.checkpointing import list_checkpoints, read_train_state
from mae_fast.training.loop import train
from tests.helpers import ROOT, free_ports

PROBE = os.path.join(ROOT, "tests", "integration", "torchrun_probe.py")
LR, STEPS = 1e-3, 4
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Recipe:
    preset: str
    distributed: str
    micro_per_rank: int
    compile: bool
    checkpointing: bool

    @property
    def name(self) -> str:
        return (f"{self.preset.split('_')[0]}-{self.distributed}-k{self.micro_per_rank}"
                f"-{'compiled' if self.compile else 'eager'}-{'sac' if self.checkpointing else 'noac'}")

    def settings(self) -> tuple:
        return (self.preset, self.distributed, self.micro_per_rank, self.compile, self.checkpointing)


MAE, CAMAE = "mae_vit_micro_patch16_256", "camae_vit_micro_patch16_256"
MATRIX = [  # a strength-2 covering array of the five two-level settings (6 rows instead of 32)
    Recipe(MAE, "ddp", 1, False, False),
    Recipe(MAE, "ddp", 1, False, True),
    Recipe(MAE, "fsdp", 3, True, False),
    Recipe(CAMAE, "ddp", 3, True, False),
    Recipe(CAMAE, "fsdp", 1, True, True),
    Recipe(CAMAE, "fsdp", 3, False, True),
]


def test_the_matrix_covers_every_pair():
    levels = [(MAE, CAMAE), ("ddp", "fsdp"), (1, 3), (False, True), (False, True)]
    rows = [r.settings() for r in MATRIX]
    for i, j in itertools.combinations(range(len(levels)), 2):
        seen = {(row[i], row[j]) for row in rows}
        assert seen == set(itertools.product(levels[i], levels[j])), (i, j)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    cfg = SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=2, complex_size=2, n_singletons=1,
                                n_empty_controls=1, n_crispr_controls=1, site_size=256, seed=5)
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), cfg)


def train_args(root: str, out, recipe: Recipe, steps: int = STEPS) -> list[str]:
    """The README's torchrun line at toy size: the same flags, toy values by --set (the documented mechanism)."""
    args = ["train", "--preset", recipe.preset, "--data", root, "--out", str(out), "--steps", str(steps),
            "--no-progress", "--lr", str(LR),
            "--set", f"global_batch={2 * 2 * recipe.micro_per_rank}", "--set", "micro_batch=2",
            "--set", "model.img_size=64", "--set", "data.num_workers=0", "--set", "data.crops_per_image=2",
            "--set", "data.shards=2", "--set", "checkpoint_every=2", "--set", "threads=1",
            "--set", "peak_tflops=1", "--set", "tensorboard=false", "--set", "val_crops=1", "--set", "log_every=1",
            "--set", f"distributed={recipe.distributed}"]
    if recipe.compile:
        args += ["--set", "compile=true", "--set", "compile_backend=aot_eager"]
    if recipe.checkpointing:
        args += ["--set", "activation_checkpointing=true", "--set", "activation_checkpointing_policy=selective"]
    return args


def torchrun(args: list[str], env: dict | None = None, nproc: int = 2, timeout: float = 400,
             launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *(launcher or ["--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_ports(1)[0])]), PROBE, *args]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def single_process(args: list[str], out) -> None:
    """The same command line in this process: one rank, every micro-batch in order (distributed left at ddp: one
    process has nothing to shard)."""
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    cfg = train_cli.config_from_args(parser.parse_args(args[1:] + ["--out", str(out)]))
    cfg.distributed = "ddp"
    torch._dynamo.reset()
    try:
        train(cfg)
    finally:
        torch._dynamo.reset()


def final_losses(run_dir) -> list[float]:
    return read_train_state(list_checkpoints(str(run_dir))[-1][1])["losses"].tolist()


def assert_same_run(got_dir, want_dir, micro_per_rank: int) -> None:
    got, want = final_losses(got_dir), final_losses(want_dir)
    assert len(got) == len(want) == STEPS
    a = load_file(os.path.join(got_dir, "model", "model.safetensors"))
    b = load_file(os.path.join(want_dir, "model", "model.safetensors"))
    assert a.keys() == b.keys()
    if micro_per_rank == 1:
        assert got == want
        for k in a:
            assert torch.equal(a[k], b[k]), k
        return
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    far, total = 0, 0
    for k in a:
        diff = (a[k].float() - b[k].float()).abs()
        assert diff.max().item() <= 2 * LR * STEPS + 1e-6, k
        far += int((diff > 1e-6).sum())
        total += diff.numel()
    assert far <= 1e-3 * total, (far, total)


@pytest.mark.parametrize("recipe", MATRIX, ids=lambda r: r.name)
def test_recipe_trains_resumes_after_sigkill_and_embeds(screen, tmp_path, recipe):
    run = tmp_path / "run"
    args = train_args(screen.root, run, recipe)
    killed = torchrun(args, env={"MAE_FAST_TEST_KILL_AFTER_CHECKPOINT": "2"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(str(run))] == [2] and not (run / "model").exists(), killed.stderr[-3000:]
    resumed = torchrun(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == STEPS and summary["world_size"] == 2
    sharded = recipe.distributed == "fsdp"
    assert (run / "checkpoints" / "step_00000004" / "sharded").is_dir() == sharded

    single_process(args, tmp_path / "single")
    assert_same_run(run, tmp_path / "single", recipe.micro_per_rank)

    emb = tmp_path / "emb" / "embeddings.parquet"
    assert cli.main(["embed", "--checkpoint", str(run), "--data", screen.root, "--out", str(emb),
                     "--num-workers", "0", "--batch-size", "16"]) == 0
    table = pd.read_parquet(emb)
    features = table[[c for c in table.columns if c.startswith("feature_")]]
    assert len(table) == len(pd.read_csv(os.path.join(screen.root, "metadata.csv")))  # one row per well
    assert features.shape[1] > 0 and bool(torch.isfinite(torch.tensor(features.to_numpy())).all())


# ------------------------------------------------------------------------------------------------------------
# more than one machine, on one machine
# ------------------------------------------------------------------------------------------------------------

def test_two_nodes_read_each_site_once_per_epoch_and_match_one_node(screen, tmp_path):
    recipe = Recipe(MAE, "ddp", 1, False, False)
    steps = 7  # 14 sites, 2 crops each, 2 shards of micro-batches of 2: one epoch per shard is 7 steps
    port = free_ports(1)[0]
    trace = tmp_path / "trace"
    trace.mkdir()
    args = train_args(screen.root, tmp_path / "two_nodes", recipe, steps=steps)
    env = {**ENV, "MAE_FAST_TEST_SITE_TRACE": str(trace)}
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "mae-fast-test", PROBE, *args]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=400) for p in nodes]
    for p, (_, err) in zip(nodes, outputs):
        assert p.returncode == 0, err[-3000:]
    sites = sorted(f"{s.plate}/{s.address}/s{s.site}" for s in _index_sites(screen.root))
    first_epoch = {}
    for rank in (0, 1):
        lines = [line.split("\t") for line in (trace / f"rank{rank}.txt").read_text().splitlines()]
        epochs = sorted({int(e) for e, _ in lines})
        first_epoch[rank] = [s for e, s in lines if int(e) == epochs[0]]
        assert len(first_epoch[rank]) == len(set(first_epoch[rank])) == len(sites) // 2  # each site once
    assert not set(first_epoch[0]) & set(first_epoch[1])  # no site read by both ranks
    assert sorted(first_epoch[0] + first_epoch[1]) == sites  # every site read
    # the same run on one node, two processes
    one_node = torchrun(train_args(screen.root, tmp_path / "one_node", recipe, steps=steps))
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    assert final_losses(tmp_path / "two_nodes") == final_losses(tmp_path / "one_node")
    a = load_file(str(tmp_path / "two_nodes" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "one_node" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _index_sites(root: str):
    from mae_fast.training.config import DataConfig
    from mae_fast.training.data import build_site_index

    return list(build_site_index(DataConfig(root=root)))


# ------------------------------------------------------------------------------------------------------------
# errors under torchrun
# ------------------------------------------------------------------------------------------------------------

def test_bad_input_under_torchrun_is_one_line_per_rank(screen, tmp_path):
    recipe = Recipe(MAE, "fsdp", 1, False, False)
    args = train_args(str(tmp_path / "no_such_screen"), tmp_path / "run", recipe)
    proc = torchrun(args)
    assert proc.returncode != 0
    for rank in (0, 1):
        lines = [x for x in proc.stderr.splitlines() if x.startswith(f"[rank {rank}] mae-fast train: error: ")]
        assert len(lines) == 1, proc.stderr[-3000:]
    assert "mae_fast/" not in proc.stderr  # no frame of ours: torchrun's own summary follows the ranks' lines
    debug = torchrun(args, env={"MAE_FAST_DEBUG": "1"})
    assert 'mae_fast/training/' in debug.stderr and "Traceback" in debug.stderr


def test_a_rank_that_dies_stops_the_others(screen, tmp_path):
    recipe = Recipe(MAE, "ddp", 1, False, False)
    args = train_args(screen.root, tmp_path / "run", recipe, steps=200)
    start = time.time()
    proc = torchrun(args, env={"MAE_FAST_TEST_DIE_AT_STEP": "3:1"}, timeout=120)
    assert proc.returncode != 0
    summary = tmp_path / "run" / "train_summary.json"
    assert not summary.exists()
    assert time.time() - start < 90, "the surviving rank did not stop"
    assert "exitcode" in proc.stderr and signal.Signals.SIGKILL.name in proc.stderr
