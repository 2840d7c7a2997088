"""Two ranks on the CPU (gloo, spawned as torchrun would: RANK/WORLD_SIZE/MASTER_* in the environment) against one
process with the same global batch and the same data shards.

Why this can match exactly: micro-batch j of a step always comes from data shard j % S (S = data.shards = 2 here in
both runs) and the global RNG is seeded from (seed, step, j) before it, so both runs see the same crops, the same
masks and the same stochastic-depth draws (drop_path is on, 0.1). The gradients differ only in how the two
micro-batch gradients are summed (one process: accumulation of two loss/2 backward passes; two ranks: DDP's or
FSDP's average of two gradients): exact halvings and one commutative addition, so with one thread per process the
runs agree bit for bit.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
from mae_fast.training.config import DataConfig, TrainConfig
from mae_fast.training.checkpointing import read_train_state
from mae_fast.training.loop import train
from safetensors.torch import load_file
from tests.helpers import free_ports, run_as_if_killed_after


def _config(root: str, out: str, distributed: str = "ddp", **overrides) -> TrainConfig:
    cfg = TrainConfig(
        preset="mae_vit_micro_patch16_256", model={"img_size": 64, "drop_path": 0.1},
        data=DataConfig(root=root, num_workers=0, crops_per_image=2, shards=2), out_dir=out,
        global_batch=8, micro_batch=4, steps=3, lr=1e-3, checkpoint_every=2, log_every=1, recon_every=0,
        val_crops=1, threads=1, progress=False, peak_tflops=1.0, tensorboard=False, distributed=distributed,
        # FSDP writes sharded checkpoints by default; the full format is what these runs compare
        checkpoint_format="full",
        amp="fp32",  # compared with a single-process run; `auto` would be bf16 on CPUs with native bf16
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _rank_main(rank: int, world: int, runs: dict, result_dir: str) -> None:
    """One spawned rank: each run gets its own MASTER_PORT (re-creating the default group on the same port can meet
    the other rank's not yet destroyed store of the previous run)."""
    for name, (port, cfg_dict) in runs.items():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        result = train(TrainConfig.from_dict(cfg_dict))  # creates and destroys its process group
        state = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()} if result.model else None
        torch.save({"weights": state, "losses": result.losses}, os.path.join(result_dir, f"{name}_rank{rank}.pt"))


def _spawn(runs: dict, result_dir: str, timeout_s: float = 600) -> None:
    """mp.spawn with a deadline: a hung collective fails the test instead of blocking the suite."""
    context = mp.spawn(_rank_main, args=(2, runs, result_dir), nprocs=2, join=False)
    deadline = time.time() + timeout_s
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-rank run did not finish within {timeout_s} s")


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    cfg = SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=2, complex_size=2, n_singletons=1,
                                n_empty_controls=1, n_crispr_controls=1, site_size=256, seed=5)
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), cfg)


K3 = dict(global_batch=12, micro_batch=2)  # three micro-batches per rank (six in one process)


@pytest.fixture(scope="module")
def runs(screen, tmp_path_factory):
    """One process, then two spawned ranks running the same configuration with DDP and with FSDP; the same with three
    micro-batches per rank (DDP, FSDP reducing per micro-batch and per step); FSDP with its default sharded
    checkpoints; and two ranks resuming a single process's sharded checkpoint (1 -> 2 ranks)."""
    tmp = tmp_path_factory.mktemp("dist")
    single = train(_config(screen.root, str(tmp / "single")))
    train(_config(screen.root, str(tmp / "single_k3"), **K3))
    train(_config(screen.root, str(tmp / "single_sharded"), checkpoint_format="sharded"))
    from_one = run_as_if_killed_after(str(tmp / "single_sharded"), tmp / "from_one_rank", 2)
    specs = {
        "ddp": _config(screen.root, str(tmp / "ddp_run"), "ddp"),
        "fsdp": _config(screen.root, str(tmp / "fsdp_run"), "fsdp"),
        "ddp_k3": _config(screen.root, str(tmp / "ddp_k3"), "ddp", **K3),
        "fsdp_k3": _config(screen.root, str(tmp / "fsdp_k3"), "fsdp", **K3),
        "fsdp_k3_step": _config(screen.root, str(tmp / "fsdp_k3_step"), "fsdp", fsdp_reduce="step", **K3),
        "fsdp_sharded": _config(screen.root, str(tmp / "fsdp_sharded"), "fsdp", checkpoint_format="auto"),
        "resumed_on_two": _config(screen.root, from_one, "fsdp", checkpoint_format="sharded", resume=True),
    }
    runs = {name: (port, cfg.to_dict()) for (name, cfg), port in zip(specs.items(), free_ports(len(specs)))}
    _spawn(runs, str(tmp))
    ranks = {mode: [torch.load(tmp / f"{mode}_rank{r}.pt", weights_only=True) for r in range(2)] for mode in runs}
    return single, ranks, tmp


def _final_weights(run_dir) -> dict:
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def test_three_micro_batches_per_rank_match_one_process(runs):
    """FSDP2 accumulation (reduce-scatter per micro-batch, or once per step) and DDP's no_sync with three
    micro-batches per rank equal one process running all six. Not bit for bit: a rank sums its three gradients
    before the ranks' average, one process sums all six in order (float addition in another order, ~1e-7
    relative); Lion's sign turns an update within rounding of zero into a +-lr step. So: losses within 1e-5
    relative; weights within 2*lr*steps everywhere, at most 0.1% of the elements further apart than 1e-6."""
    single, ranks, tmp = runs
    want_losses = read_train_state(str(tmp / "single_k3" / "checkpoints" / "step_00000003"))["losses"].tolist()
    want = _final_weights(tmp / "single_k3")
    for name in ("ddp_k3", "fsdp_k3", "fsdp_k3_step"):
        losses = ranks[name][0]["losses"]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0, msg=name)
        got = _final_weights(tmp / name)
        far = sum(int(((got[k] - want[k]).abs() > 1e-6).sum()) for k in want)
        assert far <= 1e-3 * sum(v.numel() for v in want.values()), (name, far)
        assert _max_difference(got, want) <= 2 * 1e-3 * 3 + 1e-6, name
    # the two FSDP reduce modes differ only in when the same sums are communicated
    torch.testing.assert_close(torch.tensor(ranks["fsdp_k3"][0]["losses"]),
                               torch.tensor(ranks["fsdp_k3_step"][0]["losses"]), rtol=1e-6, atol=0)


def test_fsdp_writes_sharded_checkpoints_that_resume_on_another_world_size(runs, screen, tmp_path):
    from mae_fast.cli import main as cli_main
    from mae_fast.checkpoint import load_model
    from mae_fast.training.checkpointing import is_sharded, list_checkpoints

    single, ranks, tmp = runs
    sharded = tmp / "fsdp_sharded"
    steps = [s for s, _ in list_checkpoints(str(sharded))]
    assert steps == [2, 3] and all(is_sharded(p) for _, p in list_checkpoints(str(sharded)))
    assert not (sharded / "checkpoints" / "step_00000003" / "model.safetensors").exists()  # no full gather
    assert {p.name for p in (sharded / "checkpoints" / "step_00000003" / "sharded").iterdir()} >= {".metadata"}
    assert ranks["fsdp_sharded"][0]["losses"] == single.losses
    # 2 ranks -> 1: a single process resumes the sharded checkpoint of step 2 and ends where the others did
    copy = run_as_if_killed_after(str(sharded), tmp_path / "to_one_rank", 2)
    resumed = train(_config(screen.root, copy, "ddp", checkpoint_format="sharded", resume=True))
    assert resumed.resumed_from == 2 and resumed.losses == single.losses
    assert _max_difference(resumed.model.state_dict(), single.model.state_dict()) == 0.0
    # 1 rank -> 2: two FSDP ranks resumed a single process's sharded checkpoint of step 2
    assert ranks["resumed_on_two"][0]["losses"] == single.losses
    assert _max_difference(ranks["resumed_on_two"][0]["weights"], single.model.state_dict()) == 0.0
    # export: the sharded step-2 checkpoint as the single-file model embed reads, equal to the full one
    out = tmp_path / "exported"
    assert cli_main(["export", str(sharded / "checkpoints" / "step_00000002"), "--out", str(out)]) == 0
    full = load_file(str(tmp / "fsdp_run" / "checkpoints" / "step_00000002" / "model.safetensors"))
    exported = load_model(str(out)).state_dict()
    assert _max_difference(exported, full) == 0.0
    # embed's loader reads a run that has only sharded checkpoints (killed before its final model/)
    from mae_fast.training.pretrained import load_pretrained

    killed = run_as_if_killed_after(str(sharded), tmp_path / "killed", 3)
    model, kind = load_pretrained(killed)
    assert kind == "ours" and _max_difference(model.state_dict(), _final_weights(sharded)) == 0.0


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_gloo_ranks_match_one_process(runs):
    single, ranks, tmp = runs
    w0, w1 = ranks["ddp"][0]["weights"], ranks["ddp"][1]["weights"]
    for k in w0:  # DDP: both ranks hold identical weights
        assert torch.equal(w0[k], w1[k]), k
    assert ranks["ddp"][0]["losses"] == ranks["ddp"][1]["losses"]
    # ... and they are the single process's (same crops, masks, drop-path draws)
    assert ranks["ddp"][0]["losses"] == single.losses
    assert _max_difference(w0, single.model.state_dict()) == 0.0
    # the run folder is complete and written once (rank 0)
    out = tmp / "ddp_run"
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000003"]
    assert (out / "model" / "model.safetensors").exists()


def test_two_fsdp_ranks_match_one_process(runs):
    single, ranks, tmp = runs
    assert ranks["fsdp"][0]["losses"] == single.losses
    assert ranks["fsdp"][1]["weights"] is None  # FSDP: the gathered model lives on rank 0
    assert _max_difference(ranks["fsdp"][0]["weights"], single.model.state_dict()) == 0.0
    # a sharded run's checkpoint holds full weights and optimiser state keyed by name, like any other
    from mae_fast.training.checkpointing import read_train_state

    state = read_train_state(str(tmp / "fsdp_run" / "checkpoints" / "step_00000003"))
    assert "encoder.blocks.0.in_proj.weight" in state["optimizer"]["state"]



def test_fsdp2_shards_every_block_and_lion_updates_the_shards():
    """shard_model is FSDP2: the root and every transformer block are FSDPModules holding DTensor parameters, and a
    Lion step on the sharded model (one gloo rank) equals the step on a plain copy."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from mae_fast.compiling import repeated_blocks
    from mae_fast.models import MaskedAutoencoder, model_config
    from mae_fast.optim import Lion, lion_param_groups
    from mae_fast.training.distributed import DistInfo, shard_model

    cfg = model_config("mae_vit_micro_patch16_256", img_size=32, drop_path=0.0)
    torch.manual_seed(0)
    plain, sharded = MaskedAutoencoder(cfg), MaskedAutoencoder(cfg)
    sharded.load_state_dict(plain.state_dict())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_model(sharded, DistInfo(0, 1, 0, 1), torch.device("cpu"))
        assert isinstance(sharded, FSDPModule)
        assert all(isinstance(b, FSDPModule) for b in repeated_blocks(sharded))
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        images = torch.randint(0, 256, (2, cfg.in_chans, 32, 32), dtype=torch.uint8)
        for model in (plain, sharded):
            opt = Lion(lion_param_groups(model, 0.05), lr=1e-3, weight_decay=0.05)
            model(images, generator=torch.Generator().manual_seed(1)).loss.backward()
            opt.step()
        for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
            torch.testing.assert_close(q.full_tensor(), p, msg=name)
    finally:
        dist.destroy_process_group()
